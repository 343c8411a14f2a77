"""Textual-inversion embeddings from a folder, the way A1111 users keep them.

A file ``EasyNegative.safetensors`` in the folder is used by writing ``EasyNegative`` in a
prompt or negative prompt. Only ``.safetensors`` files are ever listed or read: ``.pt``,
``.bin``, ``.ckpt`` and ``.pth`` embeddings are pickles, which can run code when loaded.

Three layouts are understood (checked against diffusers 0.42's ``TextualInversionLoaderMixin``):

- A1111 saved as safetensors: ``{"emb_params": [vectors, width]}``;
- diffusers ``learned_embeds.safetensors``: one key, the trained token, ``{"<tok>": [width]}``
  or ``[vectors, width]`` (the key is ignored: the file's stem is the token);
- SDXL (CivitAI and others): ``{"clip_l": [vectors, 768], "clip_g": [vectors, 1280]}``, one
  tensor per text encoder.

A1111's ``.pt`` layout (``string_to_param``) is a pickle and so never read here.

Matching a name in a prompt is case-sensitive and whole-word: ``EasyNegative`` counts in
``(EasyNegative:1.2)`` but not in ``myEasyNegative``. The tokenizers are made to agree, so a
prompt uses an embedding exactly when :func:`embeddings_in` says it does, whatever was loaded
before: diffusers registers tokens that match anywhere, even inside a word, and after CLIP's
lowercasing, which also breaks its expansion of multi-vector tokens with capitals in their
names (``EasyNegative`` would get its first vector only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import EngineError
from backend.provenance import file_sha256

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Width of a single-tensor embedding -> the family whose text encoder has that width.
_FAMILY_OF_WIDTH = {768: "sd15", 1024: "sd2"}
_SDXL_KEYS = ("clip_l", "clip_g")  # in the order of the pipeline's text encoders


class EmbeddingLoadError(EngineError):
    """An embedding doesn't fit the model (or its file can't be loaded); nothing was changed."""

    code = "embedding_incompatible"
    http_status = 400


@dataclass(frozen=True)
class EmbeddingFile:
    """One embedding in the folder. ``name`` is the file's stem and the token used in prompts."""

    name: str
    path: Path  # server-side only: never sent to a client
    family: str | None  # sd15 | sd2 | sdxl, or None when the width says nothing
    vectors: int  # tokens it stands for in a prompt
    dims: tuple[int, ...]  # width per text encoder: (768,) or (768, 1280)
    size: int
    sha256: str
    mtime: float

    def public_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "vectors": self.vectors,
            "size": self.size,
            "sha256": self.sha256,
        }


# --- Listing the folder -------------------------------------------------------------------------

# (resolved path, size, mtime_ns) -> (vectors, dims, family, sha256): a file is read again only
# when it changes, so listing a folder on every request stays cheap.
_info_cache: dict[tuple[str, int, int], tuple[int, tuple[int, ...], str | None, str]] = {}
_cache_lock = threading.Lock()


class _NotAnEmbedding(ValueError):
    pass


def _layout(shapes: Mapping[str, list[int]]) -> tuple[int, tuple[int, ...], str | None]:
    """(vectors, dims, family) from the tensors' shapes alone, or _NotAnEmbedding."""

    def rows_and_width(key: str) -> tuple[int, int]:
        shape = shapes[key]
        if len(shape) == 1 and shape[0] > 0:
            return 1, shape[0]
        if len(shape) == 2 and shape[0] > 0 and shape[1] > 0:
            return shape[0], shape[1]
        raise _NotAnEmbedding(f"tensor {key!r} has shape {list(shape)}, not [vectors, width]")

    if "clip_g" in shapes:
        missing = [k for k in _SDXL_KEYS if k not in shapes]
        if missing:
            raise _NotAnEmbedding(f"an SDXL embedding needs {' and '.join(_SDXL_KEYS)}; {missing[0]} is missing")
        (n_l, w_l), (n_g, w_g) = rows_and_width("clip_l"), rows_and_width("clip_g")
        if n_l != n_g:
            raise _NotAnEmbedding(f"clip_l has {n_l} vectors but clip_g has {n_g}")
        return n_l, (w_l, w_g), "sdxl"
    if len(shapes) == 1:
        (key,) = shapes
        n, width = rows_and_width(key)
        return n, (width,), _FAMILY_OF_WIDTH.get(width)
    # Many tensors: most likely a LoRA or a checkpoint put in the wrong folder.
    raise _NotAnEmbedding(f"it holds {len(shapes)} tensors; an embedding holds one, or clip_l and clip_g")


def _read_info(path: Path, size: int, mtime_ns: int) -> tuple[int, tuple[int, ...], str | None, str]:
    key = (str(path), size, mtime_ns)
    with _cache_lock:
        cached = _info_cache.get(key)
    if cached is not None:
        return cached
    from safetensors import safe_open

    # The header alone gives the shapes; no tensor is materialised.
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    vectors, dims, family = _layout(shapes)
    info = (vectors, dims, family, file_sha256(path))
    with _cache_lock:
        _info_cache[key] = info
    return info


def _candidates(root: Path) -> Iterable[Path]:
    """``*.safetensors`` under ``root``, in sorted order, without descending symlinked folders
    (a link may lead out of the folder, or round in a loop)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(SUFFIX) and not fn.startswith("."):
                yield Path(dirpath) / fn


def scan_embeddings(folder: str | os.PathLike[str] | None) -> dict[str, EmbeddingFile]:
    """The embeddings in ``folder`` and its subfolders, by name. A missing folder has none.

    Skipped, each with a warning: names that can't be written as one prompt word, a second
    file with a name already taken (the first by sorted path wins), links that lead out of
    the folder, and files that aren't safetensors embeddings.
    """
    if not folder:
        return {}
    root = Path(folder)
    if not root.is_dir():
        return {}
    root_real = root.resolve()
    found: dict[str, EmbeddingFile] = {}
    for path in sorted(_candidates(root)):
        name = path.name[: -len(SUFFIX)]
        rel = path.relative_to(root)
        if not NAME_RE.fullmatch(name):
            log.warning("embedding %s skipped: its name must be one word of A-Z a-z 0-9 _ . -", rel)
            continue
        real = path.resolve()
        if not real.is_relative_to(root_real):
            log.warning("embedding %s skipped: it links outside the embeddings folder", rel)
            continue
        if name in found:
            log.warning(
                "embedding %s skipped: %s already has the name %r", rel, found[name].path.relative_to(root), name
            )
            continue
        try:
            st = real.stat()
            vectors, dims, family, sha256 = _read_info(real, st.st_size, st.st_mtime_ns)
        except _NotAnEmbedding as exc:
            log.warning("embedding %s skipped: %s", rel, exc)
            continue
        except Exception as exc:  # a truncated or corrupt file must not hide the others
            log.warning("embedding %s skipped: unreadable safetensors (%s)", rel, type(exc).__name__)
            continue
        found[name] = EmbeddingFile(
            name=name,
            path=path,
            family=family,
            vectors=vectors,
            dims=dims,
            size=st.st_size,
            sha256=sha256,
            mtime=st.st_mtime,
        )
    return found


# --- Which embeddings a prompt uses ---------------------------------------------------------------


def embeddings_in(text: str, available: Mapping[str, EmbeddingFile]) -> list[EmbeddingFile]:
    """The embeddings ``text`` uses, in order of first use: each name as a whole word, with case.

    Mirrors how the tokenizer finds the tokens once loaded (see :meth:`EmbeddingLoader.ensure`):
    the longest name starting at the leftmost place, kept only when no letter, digit or ``_``
    touches it on either side.
    """
    if not text or not available:
        return []
    names = sorted(available, key=lambda n: (-len(n), n))
    pattern = re.compile("|".join(re.escape(n) for n in names))
    used: dict[str, EmbeddingFile] = {}
    for m in pattern.finditer(text):
        before = text[m.start() - 1] if m.start() > 0 else ""
        after = text[m.end()] if m.end() < len(text) else ""
        if _is_word_char(before) or _is_word_char(after):
            continue
        used.setdefault(m.group(), available[m.group()])
    return list(used.values())


def _is_word_char(ch: str) -> bool:
    # The tokenizers library's rule for a "single word" token's neighbours.
    return bool(ch) and (ch.isalnum() or ch == "_")


# --- Loading into a model ------------------------------------------------------------------------


def _describe(dims: tuple[int, ...]) -> str:
    if len(dims) == 1:
        return f"{dims[0]} wide"
    return " and ".join(str(d) for d in dims) + " wide (one tensor per text encoder)"


def embedding_incompatibility(emb: EmbeddingFile, *, family: str, text_width: int | tuple[int, ...]) -> str | None:
    """Why ``emb`` can't be used with a model of ``family`` whose text encoder(s) have
    ``text_width`` (a tuple for SDXL's two), or None when it can."""
    widths = (text_width,) if isinstance(text_width, int) else tuple(text_width)
    if tuple(emb.dims) == widths:
        return None
    made_for = f" (made for {emb.family})" if emb.family else ""
    return (
        f"embedding {emb.name!r} is {_describe(tuple(emb.dims))}{made_for}, "
        f"but the model's text encoder{'s are' if len(widths) > 1 else ' is'} {_describe(widths)} ({family})"
    )


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs, in the order of an SDXL embedding's tensors."""
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2))
    return pairs


def text_widths(pipe: Any) -> tuple[int, ...]:
    """The input width of each text encoder of ``pipe`` (0 for a missing one)."""
    return tuple(enc.get_input_embeddings().weight.shape[-1] if enc is not None else 0 for _tok, enc in _encoders(pipe))


def _tokens(name: str, vectors: int) -> list[str]:
    # diffusers' names for a multi-vector embedding's tokens.
    return [name] + [f"{name}_{i}" for i in range(1, vectors)]


class EmbeddingLoader:
    """The embeddings loaded into one model's tokenizer(s) and text encoder(s).

    One per loaded model: the txt2img, img2img and inpaint pipelines made with ``from_pipe``
    share those components, so an embedding loaded through any of them serves all three.
    Call :meth:`ensure` while no generation runs on the model (under the model's lock).
    """

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[str, int]] = {}  # name -> (sha256, vectors)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> dict[str, str]:
        """name -> sha256 of the file each loaded embedding came from."""
        with self._lock:
            return {name: sha for name, (sha, _n) in self._loaded.items()}

    def forget_missing(self, pipe: Any, available: Mapping[str, EmbeddingFile]) -> None:
        """Unload what is no longer in the folder (deleted or renamed), so an old token can't
        keep shaping prompts; a changed file is reloaded by :meth:`ensure` when next used."""
        with self._lock:
            for name, (_sha, vectors) in list(self._loaded.items()):
                if name not in available:
                    self._unload(pipe, name, vectors)

    def ensure(self, pipe: Any, family: str, embeddings: list[EmbeddingFile]) -> None:
        """Load each of ``embeddings`` not loaded yet; a file whose sha256 changed is loaded again.

        Raises EmbeddingLoadError before loading any when one doesn't fit the model (width, or
        one tensor where SDXL needs two). When diffusers refuses one (its name is already a
        token of the tokenizer) or its file changed since it was listed, that one is left out
        of every encoder and the error raised; those before it stay loaded, which changes no
        prompt that doesn't use them.
        """
        widths = text_widths(pipe)
        for emb in embeddings:
            problem = embedding_incompatibility(emb, family=family, text_width=widths)
            if problem:
                raise EmbeddingLoadError(problem)
        with self._lock:
            for emb in embeddings:
                current = self._loaded.get(emb.name)
                if current is not None and current[0] == emb.sha256:
                    continue
                if current is not None:
                    self._unload(pipe, emb.name, current[1])
                self._load(pipe, emb)
                self._loaded[emb.name] = (emb.sha256, emb.vectors)

    def _unload(self, pipe: Any, name: str, vectors: int) -> None:
        # diffusers 0.42 unloads given tokens (and renumbers the rest) per tokenizer/encoder.
        tokens = _tokens(name, vectors)
        for tokenizer, encoder in _encoders(pipe):
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=encoder)
        del self._loaded[name]

    def _load(self, pipe: Any, emb: EmbeddingFile) -> None:
        from safetensors.torch import load as load_safetensors

        data = emb.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != emb.sha256:
            raise EmbeddingLoadError(f"embedding {emb.name!r} changed on disk while it was being loaded; try again")
        state = load_safetensors(data)  # the bytes just hashed: what is loaded is what was checked
        tensors = [state[k] for k in _SDXL_KEYS] if len(emb.dims) == 2 else [next(iter(state.values()))]
        done: list[tuple[Any, Any]] = []
        try:
            for tensor, (tokenizer, encoder) in zip(tensors, _encoders(pipe), strict=True):
                pipe.load_textual_inversion(tensor, token=emb.name, tokenizer=tokenizer, text_encoder=encoder)
                done.append((tokenizer, encoder))
                _whole_word_with_case(tokenizer, _tokens(emb.name, emb.vectors))
        except ValueError as exc:
            # Refused before any change to that encoder (a name already in the tokenizer's
            # vocabulary, say); take it back out of the encoders already done.
            for tokenizer, encoder in done:
                pipe.unload_textual_inversion(
                    tokens=_tokens(emb.name, emb.vectors), tokenizer=tokenizer, text_encoder=encoder
                )
            raise EmbeddingLoadError(f"embedding {emb.name!r} could not be loaded: {exc}") from exc


def _whole_word_with_case(tokenizer: Any, tokens: list[str]) -> None:
    """Make the just-added tokens match as whole words, with case, as :func:`embeddings_in` does.

    diffusers adds them as plain strings: matched after lowercasing and inside other words.
    Adding the same contents again as ``AddedToken``s updates them in place (same ids).
    """
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False, special=False) for t in tokens])
