"""Prompts the way SD users write them: ``<lora:...>`` tags, A1111 weighting, BREAK, past 77 tokens.

The syntax read here is AUTOMATIC1111's (``modules/prompt_parser.py``):

- ``(words)`` multiplies attention by 1.1, ``((words))`` by 1.21, ``[words]`` divides it by 1.1,
  ``(words:1.3)`` multiplies it by 1.3; nesting multiplies; an unclosed bracket closes at the end.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets and ``\\\\`` a literal backslash.
- ``BREAK`` (uppercase, a word of its own) ends the current 75-token chunk: what follows is
  encoded in a chunk of its own.

compel's own syntax (``word+``, ``word-``, ``(words)1.3``, ``.and()``, ``.swap()``, ...) is NOT
read. A prompt can't be both, e.g. ``a dog+`` or ``(dog)1.3`` mean different things in each, so
the A1111 reading wins and those characters are plain text, exactly as A1111 would encode them.

Encoding goes through compel (chunked, never truncated) but not through compel's string parser:
that parser can't keep some text literal (a ``+``/``-`` ending a word is a weight, ``\\,`` keeps
its backslash, it inserts a space after every comma). :func:`encode` hands compel its parsed
form, a conjunction of weighted fragments, built from the A1111 runs. :func:`a1111_to_compel`
writes the same thing as compel text, for people and tools that speak compel.

Differences from A1111 that stay: compel applies a weight above 1 as ``empty + (z - empty) * w``
and one below 1 by blending toward the prompt with those words masked out (A1111 scales ``z`` and
restores its mean), and it splits a long prompt at the last phrase boundary (``, . ; :``) inside
the window (A1111 at the last comma within 20 tokens of the end). Negative weights are read as 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# -- LoRA tags ---------------------------------------------------------------------------------

_LORA_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
_TAG_MARK = "\x00"
# The marks where tags were, with the spaces and commas around them.
_MARKED_GAP = re.compile(r"[\s,]*\x00[\s,\x00]*")
_NAMED_WEIGHTS = ("te", "unet", "dyn")


class PromptSyntaxError(ValueError):
    """A prompt that can't be read; the message names the part that is wrong."""


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<lora:NAME[:WEIGHT[:UNET_WEIGHT]]>`` (and ``<lyco:...>``) tags from a prompt.

    Returns the prompt without them, tidied only where a tag was (no doubled spaces or dangling
    commas), and ``(name, weight)`` in the order written. The weight is the first number (A1111's
    text-encoder weight, which is also its UNet weight unless a second is given), else ``te=``,
    else ``unet=``, else 1.0. Names are returned as written.
    """
    tags: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        tags.append(_read_lora_tag(match.group(0), match.group(2)))
        return _TAG_MARK

    marked = _LORA_TAG.sub(take, prompt)
    if not tags:
        return prompt, []

    def close_gap(match: re.Match[str]) -> str:
        at_edge = match.start() == 0 or match.end() == len(marked)
        gap = match.group(0)
        if at_edge:
            return ""
        if "," in gap:
            return ", "
        return " " if any(c.isspace() for c in gap) else ""

    return _MARKED_GAP.sub(close_gap, marked), tags


def _read_lora_tag(tag: str, body: str) -> tuple[str, float]:
    name, *args = body.split(":")
    name = name.strip()
    if not name:
        raise PromptSyntaxError(f"LoRA tag {tag} has no name")
    positional: list[float] = []
    named: dict[str, float] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.strip().lower() not in _NAMED_WEIGHTS:
            raise PromptSyntaxError(
                f"LoRA tag {tag} has an unknown setting {key.strip()!r} (known: {', '.join(_NAMED_WEIGHTS)})"
            )
        number = _finite_float(value if sep else arg)
        if number is None:
            raise PromptSyntaxError(f"LoRA tag {tag} has a weight that is not a number: {arg.strip()!r}")
        if sep:
            named[key.strip().lower()] = number
        else:
            positional.append(number)
    weight = positional[0] if positional else named.get("te", named.get("unet", 1.0))
    return name, weight


def _finite_float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# -- A1111 attention -----------------------------------------------------------------------------

# A1111's tokens, in its order (including the ``:\s*weight\s*)`` form of its later versions).
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_RUN: tuple[str, float] = ("BREAK", -1.0)
"""The run :func:`parse_attention` gives for ``BREAK`` (A1111's marker)."""

_ROUND = 1.1
_SQUARE = 1 / 1.1
_SYNTAX = re.compile(r"[()\[\]\\]|\bBREAK\b")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's ``parse_prompt_attention``: the prompt as ``(text, weight)`` runs.

    ``BREAK`` comes out as :data:`BREAK_RUN`. Two deliberate differences from A1111, both in cases
    its own encoder gets wrong: brackets around a BREAK don't change it (A1111 multiplies its
    marker's -1 and then encodes the word "BREAK"), and consecutive BREAKs aren't merged into one
    "BREAKBREAK" run. A weight that isn't a number (``(a:1.2.3)``) raises PromptSyntaxError where
    A1111 would crash.
    """
    runs: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            if run[1] != BREAK_RUN[1] or run[0] != BREAK_RUN[0]:
                run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(runs))
        elif token == "[":
            square_brackets.append(len(runs))
        elif weight is not None and round_brackets:
            number = _finite_float(weight)
            if number is None:
                raise PromptSyntaxError(f"prompt weight must be a number, got {weight!r} in {token!r}")
            multiply_range(round_brackets.pop(), number)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    runs.append(list(BREAK_RUN))
                runs.append([part, 1.0])

    for start in round_brackets:
        multiply_range(start, _ROUND)
    for start in square_brackets:
        multiply_range(start, _SQUARE)

    if not runs:
        runs = [["", 1.0]]

    merged: list[list[Any]] = [runs[0]]
    for run in runs[1:]:
        last = merged[-1]
        if run[1] == last[1] and tuple(run) != BREAK_RUN and tuple(last) != BREAK_RUN:
            last[0] += run[0]
        else:
            merged.append(run)
    return [(str(t), float(w)) for t, w in merged]


def is_plain(prompt: str) -> bool:
    """True when the prompt has no A1111 syntax at all (brackets, backslashes, BREAK).

    A plain prompt means the same to the pipeline's own encoder, so it can go in as text.
    """
    return _SYNTAX.search(prompt) is None


def _chunks(text: str) -> list[list[tuple[str, float]]]:
    """The runs of each BREAK-separated part.

    Like A1111, a BREAK at the start (or two in a row) leaves an empty chunk, and one at the end
    starts none.
    """
    chunks: list[list[tuple[str, float]]] = [[]]
    for run in parse_attention(text):
        if run == BREAK_RUN:
            chunks.append([])
        elif run[0]:
            chunks[-1].append(run)
    if len(chunks) > 1 and not _words(chunks[-1]):
        chunks.pop()
    return chunks


def _words(chunk: list[tuple[str, float]]) -> list[tuple[str, float]]:
    # Runs of only spaces add no tokens (compel tokenizes each run alone), and compel can't
    # find a run without tokens to weight it.
    return [(text, weight) for text, weight in chunk if text.strip()]


# -- compel text ---------------------------------------------------------------------------------

# compel unescapes only these three in a fragment's text (``\,`` ``\.`` ``\+`` keep the backslash).
_COMPEL_ESCAPES = str.maketrans({"(": "\\(", ")": "\\)", '"': '\\"'})


def a1111_to_compel(text: str) -> str:
    """The A1111 prompt as compel text: ``(words)1.3`` per weighted run, BREAK parts as ``.and()``.

    Brackets and quotes in the text are escaped for compel. compel has no escape for a ``+`` or
    ``-`` that ends a word (it reads ``dog+`` as a weight), so such text doesn't survive a trip
    through compel's parser; :func:`encode` doesn't take that trip.
    """
    parts = [" ".join(_compel_run(t, w) for t, w in _words(chunk)) for chunk in _chunks(text)]
    if len(parts) == 1:
        return parts[0]
    quoted = ", ".join(f'"{p}"' for p in parts)  # quotes inside are escaped already
    return f"({quoted}).and()"


def _compel_run(text: str, weight: float) -> str:
    escaped = text.strip().translate(_COMPEL_ESCAPES)
    if weight == 1.0:
        return escaped
    return f"({escaped}){_weight_text(weight)}"


def _weight_text(weight: float) -> str:
    text = repr(max(weight, 0.0))
    # compel's numbers have no exponent
    return text if "e" not in text else f"{max(weight, 0.0):.12f}".rstrip("0")


# -- encoding ------------------------------------------------------------------------------------


@dataclass
class PromptEncoding:
    """What :func:`encode` made of a prompt pair.

    ``kwargs`` replaces ``prompt``/``negative_prompt`` in the pipeline call; empty when both are
    plain and fit the window (then pass the text, as always, so seeds reproduce exactly).
    ``chunks`` counts the 75-token windows each side was encoded in (both padded to the same).
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    negative_prompt_tokens: int = 0
    chunks: int = 1


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in the text, without the start and end tokens (A1111's "n/75")."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def token_window(pipe: Any) -> int:
    """Prompt tokens one text-encoder pass takes (75 for CLIP's 77 with start and end)."""
    return int(pipe.tokenizer.model_max_length) - 2


def encode(pipe: Any, family: str, prompt: str, negative_prompt: str) -> PromptEncoding:
    """Encode a prompt pair for ``pipe``; see :class:`PromptEncoding` for what comes back.

    ``family`` is "sd15", "sd2" or "sdxl" (two text encoders and pooled embeddings). LoRA tags
    are not removed here: take them out with :func:`extract_lora_tags` first. An empty negative
    prompt means what the pipeline makes of ``negative_prompt=None`` (SDXL: zeros).
    Raises PromptSyntaxError for a prompt that can't be read.
    """
    if family not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"family must be sd15, sd2 or sdxl, got {family!r}")
    negative_prompt = negative_prompt or ""
    # Parse first, so a bad prompt fails the same way whichever path it would take.
    positive_chunks, negative_chunks = _chunks(prompt), _chunks(negative_prompt)
    if is_plain(prompt) and is_plain(negative_prompt):
        counts = [count_tokens(pipe.tokenizer, _expand_embeddings(pipe, p)) for p in (prompt, negative_prompt)]
        if max(counts) <= token_window(pipe):
            return PromptEncoding(kwargs={}, prompt_tokens=counts[0], negative_prompt_tokens=counts[1], chunks=1)

    import torch

    compels = _compels(pipe, family)
    with torch.no_grad():
        positive = [c.build_conditioning_tensor_for_conjunction(_conjunction(positive_chunks))[0] for c in compels]
        negative = [c.build_conditioning_tensor_for_conjunction(_conjunction(negative_chunks))[0] for c in compels]
        length = max(t.shape[1] for t in positive + negative)
        positive = [_pad(t, length, c) for t, c in zip(positive, compels, strict=True)]
        negative = [_pad(t, length, c) for t, c in zip(negative, compels, strict=True)]
        embeds, negative_embeds = torch.cat(positive, dim=-1), torch.cat(negative, dim=-1)

        device = getattr(pipe, "_execution_device", None) or pipe.device
        dtype = compels[0].conditioning_provider.text_encoder.dtype
        kwargs: dict[str, Any] = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
        if family == "sdxl":
            pooled_by = compels[-1].conditioning_provider
            # The pooled vector comes from the first 75 tokens of the first chunk's words,
            # as the pipeline makes it from a truncated prompt.
            kwargs["pooled_prompt_embeds"] = pooled_by.get_pooled_embeddings([_plain_text(positive_chunks[0])])
            kwargs["negative_pooled_prompt_embeds"] = pooled_by.get_pooled_embeddings([_plain_text(negative_chunks[0])])
            if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
                # What the pipeline does for no negative prompt: zeros, not the encoded "".
                kwargs["negative_prompt_embeds"] = torch.zeros_like(embeds)
                kwargs["negative_pooled_prompt_embeds"] = torch.zeros_like(kwargs["pooled_prompt_embeds"])
        kwargs = {k: v.to(device=device, dtype=dtype) for k, v in kwargs.items()}

    counter = compels[0].conditioning_provider
    return PromptEncoding(
        kwargs=kwargs,
        prompt_tokens=_chunk_tokens(counter, positive_chunks),
        negative_prompt_tokens=_chunk_tokens(counter, negative_chunks),
        chunks=length // counter.max_token_count,
    )


def _expand_embeddings(pipe: Any, text: str) -> str:
    # A multi-vector textual-inversion token stands for several tokens; the pipeline expands it.
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, pipe.tokenizer) if convert is not None else text


def _compels(pipe: Any, family: str) -> list[Any]:
    """One compel per text encoder, set up as CompelForSD / CompelForSDXL set theirs up, but
    splitting long prompts at phrase boundaries (closer to A1111 than at sentence ends)."""
    from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode

    device = str(getattr(pipe, "_execution_device", None) or pipe.device)
    common = {
        "textual_inversion_manager": _EmbeddingTokens(pipe.tokenizer),
        "truncate_long_prompts": False,
        "split_long_text_mode": SplitLongTextMode.PHRASES,
        "device": device,
    }
    if family != "sdxl":
        return [Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, **common)]
    hidden = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    return [
        Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, returned_embeddings_type=hidden, **common),
        Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, returned_embeddings_type=hidden, **common),
    ]


class _EmbeddingTokens:
    """Expands a multi-vector embedding's token into its vectors' tokens (``tok``, ``tok_1``, ...),
    as the pipeline's ``maybe_convert_prompt`` does, but on token ids: compel's own manager
    decodes and re-encodes the text, which needn't give back the same tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.added = dict(tokenizer.added_tokens_encoder)
        self.tokenizer = tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not self.added:
            return token_ids
        expanded: list[int] = []
        for token_id, token in zip(token_ids, self.tokenizer.convert_ids_to_tokens(token_ids), strict=True):
            expanded.append(token_id)
            i = 1
            while f"{token}_{i}" in self.added:
                expanded.append(self.added[f"{token}_{i}"])
                i += 1
        return expanded


def _conjunction(chunks: list[list[tuple[str, float]]]) -> Any:
    """compel's parsed form of the chunks: each chunk is encoded on its own and concatenated."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    prompts = []
    for chunk in chunks:
        fragments = []
        for text, weight in _words(chunk) or [("", 1.0)]:
            fragment = Fragment("", max(weight, 0.0))
            fragment.text = text  # set after, so compel doesn't unescape a literal "\(" in it
            fragments.append(fragment)
        prompts.append(FlattenedPrompt(fragments))
    return Conjunction(prompts, [1.0] * len(prompts))


def _pad(embeds: Any, length: int, compel: Any) -> Any:
    """Pad with the empty prompt's embeddings, a 77-token block at a time, as compel does."""
    import torch

    empty = compel.conditioning_provider.empty_z.to(embeds.device, embeds.dtype)
    blocks = [embeds] + [empty] * ((length - embeds.shape[1]) // empty.shape[1])
    return torch.cat(blocks, dim=1)


def _plain_text(chunk: list[tuple[str, float]]) -> str:
    return "".join(text for text, _ in chunk)


def _chunk_tokens(provider: Any, chunks: list[list[tuple[str, float]]]) -> int:
    texts = [text for chunk in chunks for text, _ in _words(chunk)]
    if not texts:
        return 0
    return sum(len(ids) for ids in provider.get_token_ids(texts, include_start_and_end_markers=False))
