"""A1111 prompt syntax, LoRA tags and prompts past the CLIP window, on the tiny pipelines (CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from django.conf import settings

from backend.prompts import (
    BREAK_RUN,
    PromptSyntaxError,
    a1111_to_compel,
    count_tokens,
    encode,
    extract_lora_tags,
    is_plain,
    parse_attention,
    token_window,
)

# -- LoRA tags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "cleaned", "tags"),
    [
        ("a cat, <lora:foo:0.5>, dog", "a cat, dog", [("foo", 0.5)]),
        ("<lora:x> portrait", "portrait", [("x", 1.0)]),
        ("portrait <lora:x:0.8:0.2>", "portrait", [("x", 0.8)]),
        ("<lyco:y:0.7>, a, <lora:z:-0.5>", "a", [("y", 0.7), ("z", -0.5)]),
        ("a,<lora:x:1.25>,b", "a, b", [("x", 1.25)]),
        ("a<lora:x>b", "ab", [("x", 1.0)]),
        ("a <lora:x> <lora:y>  b", "a b", [("x", 1.0), ("y", 1.0)]),
        ("a\n<lora:x>\nb", "a b", [("x", 1.0)]),
        ("<lora:my lora_v2.1:1.2>", "", [("my lora_v2.1", 1.2)]),
        ("<LoRA:Upper:0.3>, sky", "sky", [("Upper", 0.3)]),
        ("x <lora:a:te=0.6:unet=0.3>", "x", [("a", 0.6)]),
        ("x <lora:a:unet=0.3>", "x", [("a", 0.3)]),
        ("no  tags, (here:1.2)", "no  tags, (here:1.2)", []),
    ],
)
def test_extract_lora_tags(prompt: str, cleaned: str, tags: list[tuple[str, float]]) -> None:
    assert extract_lora_tags(prompt) == (cleaned, tags)


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("a <lora:x:abc>", "<lora:x:abc>"),
        ("<lora:x:1:nan>", "<lora:x:1:nan>"),
        ("<lora:>", "<lora:>"),
        ("<lyco:x:speed=2>", "<lyco:x:speed=2>"),
    ],
)
def test_extract_lora_tags_rejects_malformed_tags(prompt: str, named: str) -> None:
    with pytest.raises(PromptSyntaxError, match=re.escape(named)):
        extract_lora_tags(prompt)


# -- A1111 attention -----------------------------------------------------------------------------

# A1111's own doctest (modules/prompt_parser.py), then cases it implies.
A1111_RUNS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("((a) 1)", [("a", 1.1 * 1.1), (" 1", 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat: 1.3 )", [("cat", 1.3)]),
    ("(cat:-0.5)", [("cat", -0.5)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("close) only]", [("close) only]", 1.0)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK_RUN, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK_RUN, ("b", 1.1)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK_RUN, ("", 1.0), BREAK_RUN, ("b", 1.0)]),
    ("BREAKfast, break", [("BREAKfast, break", 1.0)]),
]


@pytest.mark.parametrize(("text", "runs"), A1111_RUNS)
def test_parse_attention_matches_a1111(text: str, runs: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == runs


def test_parse_attention_rejects_a_weight_that_is_not_a_number() -> None:
    with pytest.raises(PromptSyntaxError, match="1.2.3"):
        parse_attention("a (cat:1.2.3)")


@pytest.mark.parametrize(
    ("text", "compel_text"),
    [
        ("normal text", "normal text"),
        ("an (important) word", "an (important)1.1 word"),
        ("[unbalanced", "(unbalanced)0.9090909090909091"),
        ("\\(literal\\]", "\\(literal]"),
        ('say "hi" (loud:1.5)', 'say \\"hi\\" (loud)1.5'),
        ("a dog+ (cat)1.3", "a dog+ (cat)1.1 1.3"),
        ("a BREAK (b:0.5)", '("a", "(b)0.5").and()'),
        ('say "hi" BREAK b', '("say \\"hi\\"", "b").and()'),
        ("", ""),
    ],
)
def test_a1111_to_compel(text: str, compel_text: str) -> None:
    assert a1111_to_compel(text) == compel_text


@pytest.mark.parametrize("text", [t for t, _ in A1111_RUNS] + ['say "hi" (loud:1.2) BREAK b \\(c\\)'])
def test_compel_reads_the_conversion_as_the_same_runs(text: str) -> None:
    from compel import Compel

    def squash(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
        # compel re-spaces words and joins neighbours of equal weight; the tokens don't change.
        out: list[tuple[str, float]] = []
        for t, w in runs:
            t = re.sub(r"\s+", "", t)
            if not t:
                continue
            if out and out[-1][1] == max(w, 0.0):
                out[-1] = (out[-1][0] + t, out[-1][1])
            else:
                out.append((t, max(w, 0.0)))
        return out

    parts: list[list[tuple[str, float]]] = [[]]
    for run in parse_attention(text):
        if run == BREAK_RUN:
            parts.append([])
        else:
            parts[-1].append(run)
    if len(parts) > 1 and not squash(parts[-1]):
        parts.pop()  # a BREAK at the end starts no chunk
    parsed = Compel.parse_prompt_string(a1111_to_compel(text))
    got = [squash([(f.text, f.weight) for f in prompt.children]) for prompt in parsed.prompts]
    assert got == [squash(part) for part in parts]


@pytest.mark.parametrize(
    ("prompt", "plain"),
    [
        ("a cat, sitting: on a mat. 16:9 <lora:x>", True),
        ("a dog+ and cat-", True),
        ("BREAKfast", True),
        ("", True),
        ("a (cat)", False),
        ("a [cat]", False),
        ("a \\(cat\\)", False),
        ("a \\ b", False),
        ("unbalanced)", False),
        ("a BREAK b", False),
    ],
)
def test_is_plain(prompt: str, plain: bool) -> None:
    assert is_plain(prompt) is plain


# -- encoding on the tiny pipelines ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe():  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    from backend.tiny import ensure_tiny_model

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd", settings.ENGINE.tiny_models_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe():  # noqa: ANN201
    from diffusers import StableDiffusionXLPipeline

    from backend.tiny import ensure_tiny_model

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("tiny-sdxl", settings.ENGINE.tiny_models_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, **kwargs) -> np.ndarray:  # noqa: ANN001
    gen = torch.Generator().manual_seed(1)
    return pipe(**kwargs, num_inference_steps=2, width=64, height=64, generator=gen, output_type="np").images[0]


def reference(pipe, prompt: str, negative_prompt: str | None) -> tuple:  # noqa: ANN001
    """The pipeline's own encoding of a prompt pair."""
    return pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative_prompt
    )


SD_KEYS = ("prompt_embeds", "negative_prompt_embeds")
SDXL_KEYS = SD_KEYS + ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
# The tiny tokenizer is character-level: each non-space character is one token.
LONG = "a red fox in a snowy forest at dawn with tall pine trees, soft light on distant hills, a frozen river and a pale sky"


def test_token_window_and_count(sd_pipe) -> None:  # noqa: ANN001
    assert token_window(sd_pipe) == 75
    assert count_tokens(sd_pipe.tokenizer, "a cat") == 4
    assert count_tokens(sd_pipe.tokenizer, "") == 0
    assert count_tokens(sd_pipe.tokenizer, "x" * 200) == 200


@pytest.mark.parametrize(("length", "as_text"), [(74, True), (75, True), (76, False)])
def test_plain_prompts_within_the_window_go_in_as_text(sd_pipe, length: int, as_text: bool) -> None:  # noqa: ANN001
    encoding = encode(sd_pipe, "sd15", "x" * length, "blurry")
    assert (encoding.kwargs == {}) is as_text
    assert (encoding.prompt_tokens, encoding.negative_prompt_tokens) == (length, 6)
    assert encoding.chunks == (1 if as_text else 2)


def test_a_long_negative_prompt_is_encoded_too(sd_pipe) -> None:  # noqa: ANN001
    encoding = encode(sd_pipe, "sd15", "a cat", "y" * 80)
    assert encoding.negative_prompt_tokens == 80
    assert [tuple(encoding.kwargs[k].shape) for k in SD_KEYS] == [(1, 154, 32), (1, 154, 32)]


@pytest.mark.parametrize(
    ("family", "keys"),
    [("sd15", SD_KEYS), ("sdxl", SDXL_KEYS)],
)
@pytest.mark.parametrize(
    ("prompt", "negative", "same_as"),
    [
        ("a (cat:1.0), sitting", "ugly", ("a cat, sitting", "ugly")),
        ("a (cat:1.0)", "", ("a cat", None)),
        # Escaped brackets are text; compel's own syntax is text too.
        ("a \\(cat\\) ((dog+:0.5):2)", "(bad:1)", ("a (cat) dog+", "bad")),
    ],
)
def test_weight_one_encodes_like_the_pipeline(
    request, family: str, keys: tuple, prompt: str, negative: str, same_as: tuple
) -> None:  # noqa: ANN001
    pipe = request.getfixturevalue("sdxl_pipe" if family == "sdxl" else "sd_pipe")
    encoding = encode(pipe, family, prompt, negative)
    assert sorted(encoding.kwargs) == sorted(keys)
    for key, want in zip(keys, reference(pipe, *same_as), strict=True):
        got = encoding.kwargs[key]
        assert got.shape == want.shape
        assert got.dtype == pipe.text_encoder.dtype and got.device == pipe.device
        assert torch.allclose(got, want, atol=1e-6), key


@pytest.mark.parametrize("fixture", ["sd_pipe", "sdxl_pipe"])
def test_a_weight_changes_the_image(request, fixture: str) -> None:  # noqa: ANN001
    pipe = request.getfixturevalue(fixture)
    family = "sdxl" if fixture == "sdxl_pipe" else "sd15"
    plain = image(pipe, prompt="a cat on a mat")
    weighted = encode(pipe, family, "a (cat:1.6) on a [mat]", "")
    assert weighted.chunks == 1 and weighted.prompt_tokens == 10
    assert np.abs(image(pipe, **weighted.kwargs) - plain).max() > 1e-3


def test_a_long_prompt_is_chunked_not_truncated(sd_pipe) -> None:  # noqa: ANN001
    encoding = encode(sd_pipe, "sd15", LONG, "ugly")
    assert encoding.prompt_tokens == len(LONG.replace(" ", "")) == 92
    assert encoding.negative_prompt_tokens == 4
    assert encoding.chunks == 2
    assert [tuple(encoding.kwargs[k].shape) for k in SD_KEYS] == [(1, 154, 32), (1, 154, 32)]

    # Two prompts that differ only past character 100 (past token 75) give different images.
    changed = LONG.replace("pale sky", "red moon")
    assert LONG[:100] == changed[:100] and LONG != changed
    other = encode(sd_pipe, "sd15", changed, "ugly")
    assert np.abs(image(sd_pipe, **encoding.kwargs) - image(sd_pipe, **other.kwargs)).max() > 1e-3


def test_a_long_sdxl_prompt_has_pooled_embeddings(sdxl_pipe) -> None:  # noqa: ANN001
    encoding = encode(sdxl_pipe, "sdxl", LONG, "ugly")
    assert encoding.chunks == 2
    shapes = [tuple(encoding.kwargs[k].shape) for k in SDXL_KEYS]
    assert shapes == [(1, 154, 64), (1, 154, 64), (1, 32), (1, 32)]
    # The pooled vector is the pipeline's, made from the first 75 tokens.
    want = reference(sdxl_pipe, LONG, "ugly")
    assert torch.allclose(encoding.kwargs["pooled_prompt_embeds"], want[2], atol=1e-6)
    assert torch.allclose(encoding.kwargs["negative_pooled_prompt_embeds"], want[3], atol=1e-6)


@pytest.mark.parametrize(("family", "fixture"), [("sd15", "sd_pipe"), ("sdxl", "sdxl_pipe")])
def test_break_encodes_each_part_in_its_own_chunk(request, family: str, fixture: str) -> None:  # noqa: ANN001
    pipe = request.getfixturevalue(fixture)
    encoding = encode(pipe, family, "a cat BREAK a dog", "ugly")
    assert (encoding.chunks, encoding.prompt_tokens) == (2, 8)
    embeds, negative = encoding.kwargs["prompt_embeds"], encoding.kwargs["negative_prompt_embeds"]
    assert embeds.shape == negative.shape == (1, 154, pipe.unet.config.cross_attention_dim)
    assert torch.allclose(embeds[:, :77], reference(pipe, "a cat", None)[0], atol=1e-6)
    assert torch.allclose(embeds[:, 77:], reference(pipe, "a dog", None)[0], atol=1e-6)
    # The negative is padded with the empty prompt's embeddings.
    assert torch.allclose(negative[:, :77], reference(pipe, "ugly", None)[0], atol=1e-6)
    assert torch.allclose(negative[:, 77:], reference(pipe, "", None)[0], atol=1e-6)


def test_sdxl_without_negative_prompt_gets_zeros_like_the_pipeline(sdxl_pipe) -> None:  # noqa: ANN001
    encoding = encode(sdxl_pipe, "sdxl", LONG, "")
    assert encoding.kwargs["negative_prompt_embeds"].shape == (1, 154, 64)
    assert not encoding.kwargs["negative_prompt_embeds"].any()
    assert not encoding.kwargs["negative_pooled_prompt_embeds"].any()


def test_multi_vector_embeddings_expand_like_the_pipeline() -> None:
    from diffusers import StableDiffusionPipeline

    from backend.tiny import ensure_tiny_model

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd", settings.ENGINE.tiny_models_dir))
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    pipe.load_textual_inversion({"emb_params": vectors}, token="<style>")
    assert count_tokens(pipe.tokenizer, "a <style> cat") == 5  # one token as written...
    encoding = encode(pipe, "sd15", "a (<style>:1.0) cat", "")
    assert encoding.prompt_tokens == 7  # ...three vectors when encoded
    assert torch.allclose(encoding.kwargs["prompt_embeds"], reference(pipe, "a <style> cat", None)[0], atol=1e-6)


def test_sd2_encodes_like_sd15(sd_pipe) -> None:  # noqa: ANN001
    sd2 = encode(sd_pipe, "sd2", "a (cat:1.2)", "ugly")
    sd15 = encode(sd_pipe, "sd15", "a (cat:1.2)", "ugly")
    assert sorted(sd2.kwargs) == sorted(SD_KEYS)
    assert all(torch.equal(sd2.kwargs[k], sd15.kwargs[k]) for k in SD_KEYS)


def test_encode_rejects_bad_input(sd_pipe) -> None:  # noqa: ANN001
    with pytest.raises(PromptSyntaxError):
        encode(sd_pipe, "sd15", "a (cat:1.2.3)", "")
    with pytest.raises(ValueError, match="family must be"):
        encode(sd_pipe, "flux", "a cat", "")
