"""Textual-inversion embeddings: listing a folder, finding them in prompts, loading them into
real tiny pipelines on CPU."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.embeddings import (
    EmbeddingFile,
    EmbeddingLoader,
    EmbeddingLoadError,
    embedding_incompatibility,
    embeddings_in,
    scan_embeddings,
)
from tests.fakes.tiny_embeddings import make_tiny_embedding

# --- Listing ---------------------------------------------------------------------------------------


class _OpensAFile:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_scan_lists_only_safetensors_and_never_opens_a_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    make_tiny_embedding(folder / "good.safetensors")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_OpensAFile(marker))
    for fn in ("evil.pt", "evil.bin", "evil.ckpt", "evil.pth", "disguised.safetensors"):
        (folder / fn).write_bytes(payload)

    found = scan_embeddings(folder)

    assert list(found) == ["good"]
    assert not marker.exists()


def test_scan_reads_shapes_and_family(tmp_path: Path) -> None:
    make_tiny_embedding(tmp_path / "neg15.safetensors", width=768, vectors=8)
    make_tiny_embedding(tmp_path / "style2.safetensors", width=1024, vectors=3, style="diffusers")
    make_tiny_embedding(tmp_path / "one.safetensors", width=768, vectors=1, style="diffusers")
    make_tiny_embedding(tmp_path / "xl.safetensors", width=768, width_2=1280, vectors=4, style="sdxl")
    make_tiny_embedding(tmp_path / "tiny.safetensors", width=32, vectors=2)

    found = scan_embeddings(tmp_path)

    summary = {n: (e.family, e.vectors, e.dims) for n, e in found.items()}
    assert summary == {
        "neg15": ("sd15", 8, (768,)),
        "style2": ("sd2", 3, (1024,)),
        "one": ("sd15", 1, (768,)),
        "xl": ("sdxl", 4, (768, 1280)),
        "tiny": (None, 2, (32,)),
    }
    xl = found["xl"]
    assert xl.size == xl.path.stat().st_size
    assert xl.sha256 == hashlib.sha256(xl.path.read_bytes()).hexdigest()
    assert xl.public_dict() == {"name": "xl", "family": "sdxl", "vectors": 4, "size": xl.size, "sha256": xl.sha256}


def test_scan_skips_files_that_are_not_embeddings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    save_file(
        {"a.lora_down.weight": torch.zeros(4, 8), "a.lora_up.weight": torch.zeros(8, 4), "a.alpha": torch.ones(())},
        str(tmp_path / "lora.safetensors"),
    )
    save_file({"clip_g": torch.zeros(2, 1280)}, str(tmp_path / "half.safetensors"))
    save_file({"emb_params": torch.zeros(2, 3, 4)}, str(tmp_path / "cube.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes(
        make_tiny_embedding(tmp_path / "x" / "t.safetensors").read_bytes()[:40]
    )
    make_tiny_embedding(tmp_path / "fine.safetensors")

    with caplog.at_level(logging.WARNING, logger="backend.embeddings"):
        found = scan_embeddings(tmp_path)

    assert sorted(found) == ["fine", "t"]
    for name in ("lora", "half", "cube", "truncated"):
        assert f"{name}.safetensors skipped" in caplog.text


def test_scan_skips_names_that_are_not_one_prompt_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for stem in ("bad name", "bad(name)", "ünï", "bad,name", "ok-name_1.2"):
        make_tiny_embedding(tmp_path / f"{stem}.safetensors")

    with caplog.at_level(logging.WARNING, logger="backend.embeddings"):
        found = scan_embeddings(tmp_path)

    assert list(found) == ["ok-name_1.2"]
    assert caplog.text.count("its name must be one word") == 4


def test_scan_subfolders_first_sorted_path_wins_a_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tiny_embedding(tmp_path / "a" / "dup.safetensors", seed=1)
    make_tiny_embedding(tmp_path / "b" / "dup.safetensors", seed=2)
    make_tiny_embedding(tmp_path / "b" / "deep" / "inner.safetensors")

    with caplog.at_level(logging.WARNING, logger="backend.embeddings"):
        found = scan_embeddings(tmp_path)

    assert sorted(found) == ["dup", "inner"]
    assert found["dup"].path == tmp_path / "a" / "dup.safetensors"
    assert "b/dup.safetensors skipped: a/dup.safetensors already has the name 'dup'" in caplog.text


def test_scan_skips_links_that_lead_outside(tmp_path: Path) -> None:
    folder, outside = tmp_path / "embeddings", tmp_path / "elsewhere"
    make_tiny_embedding(folder / "real.safetensors")
    make_tiny_embedding(outside / "secret.safetensors")
    (folder / "alias.safetensors").symlink_to(folder / "real.safetensors")
    (folder / "leak.safetensors").symlink_to(outside / "secret.safetensors")
    (folder / "leakdir").symlink_to(outside, target_is_directory=True)

    found = scan_embeddings(folder)

    assert sorted(found) == ["alias", "real"]
    assert found["alias"].sha256 == found["real"].sha256


def test_scan_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert scan_embeddings(tmp_path / "nope") == {}
    assert scan_embeddings(None) == {}


def test_scan_hash_is_cached_by_size_and_mtime_and_follows_changes(tmp_path: Path) -> None:
    path = make_tiny_embedding(tmp_path / "e.safetensors", seed=0)
    first = scan_embeddings(tmp_path)["e"]
    st = path.stat()

    # Same size and mtime: the cached hash is kept (the file isn't read again)...
    make_tiny_embedding(path, seed=1)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert scan_embeddings(tmp_path)["e"].sha256 == first.sha256

    # ...and a new mtime means a new read.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = scan_embeddings(tmp_path)["e"]
    assert changed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first.sha256
    assert changed.mtime == pytest.approx(st.st_mtime + 1)


# --- Finding them in a prompt -------------------------------------------------------------------


def _fake_listing(*names: str) -> dict[str, EmbeddingFile]:
    return {n: EmbeddingFile(n, Path(f"/x/{n}.safetensors"), None, 1, (32,), 1, n, 0.0) for n in names}


@pytest.mark.parametrize(
    ("text", "used"),
    [
        ("EasyNegative", ["EasyNegative"]),
        ("a cat, (EasyNegative:1.2), badhand", ["EasyNegative", "badhand"]),
        ("badhand EasyNegative badhand", ["badhand", "EasyNegative"]),
        ("myEasyNegative, EasyNegatives, EasyNegative_2, 1EasyNegative", []),
        ("easynegative EASYNEGATIVE", []),  # case counts
        ("EasyNegative.\nbadhand's", ["EasyNegative", "badhand"]),
        ("bad-hands", ["bad-hands"]),  # the longest name at a place wins...
        ("bad-handsx", []),  # ...and a longest that isn't a whole word leaves none, as in the tokenizer
        ("bad -hands", ["bad"]),
        ("", []),
    ],
)
def test_embeddings_in_matches_whole_words_with_case(text: str, used: list[str]) -> None:
    available = _fake_listing("EasyNegative", "badhand", "bad", "bad-hands")
    assert [e.name for e in embeddings_in(text, available)] == used


# --- Loading into tiny pipelines --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny_model_dirs):  # noqa: ANN001, ANN201
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_dirs["tiny-sd"])


@pytest.fixture(scope="module")
def sdxl(tiny_model_dirs):  # noqa: ANN001, ANN201
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs["tiny-sdxl"])


def _image(pipe, prompt: str, negative_prompt: str = "") -> np.ndarray:  # noqa: ANN001
    out = pipe(
        prompt,
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return out.images[0]


def _one(folder: Path, name: str) -> EmbeddingFile:
    return scan_embeddings(folder)[name]


def _ids(tokenizer, pipe, text: str) -> list[int]:  # noqa: ANN001
    """The ids the pipeline encodes for ``text``, after diffusers expands multi-vector tokens."""
    return tokenizer(pipe.maybe_convert_prompt(text, tokenizer)).input_ids[1:-1]


def _count_loads(monkeypatch: pytest.MonkeyPatch, pipe) -> list[str]:  # noqa: ANN001
    calls: list[str] = []
    real = pipe.load_textual_inversion

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("token"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "load_textual_inversion", counting, raising=False)
    return calls


def test_embedding_in_a_prompt_changes_the_image(sd, tmp_path: Path) -> None:  # noqa: ANN001
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import load_file

    path = make_tiny_embedding(tmp_path / "tinyemb.safetensors", vectors=2, seed=0)
    prompt = "a photo of tinyemb"
    before, plain_before = _image(sd, prompt), _image(sd, "a photo of a cat")

    EmbeddingLoader().ensure(sd, "sd15", [_one(tmp_path, "tinyemb")])

    # One id per vector, each holding the file's vector.
    ids = _ids(sd.tokenizer, sd, "tinyemb")
    assert ids == sd.tokenizer.convert_tokens_to_ids(["tinyemb", "tinyemb_1"])
    rows = sd.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(rows, load_file(str(path))["emb_params"])
    after = _image(sd, prompt)
    assert np.abs(after - before).mean() > 0.01
    # A prompt without it gives the same pixels as before the load.
    np.testing.assert_array_equal(_image(sd, "a photo of a cat"), plain_before)
    # img2img made with from_pipe shares the tokenizer, so it knows the token too.
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd)
    assert _ids(img2img.tokenizer, img2img, "tinyemb") == ids


def test_loading_twice_loads_once_and_a_changed_file_again(sd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    path = make_tiny_embedding(tmp_path / "twice.safetensors", seed=0)
    other = _one(tmp_path, "twice")
    make_tiny_embedding(tmp_path / "stay.safetensors", seed=5)
    stay = _one(tmp_path, "stay")
    calls = _count_loads(monkeypatch, sd)
    loader = EmbeddingLoader()

    loader.ensure(sd, "sd15", [other, stay])
    loader.ensure(sd, "sd15", [other])
    loader.ensure(sd, "sd15", [stay, other])
    assert calls == ["twice", "stay"]
    seed0, stay_image = _image(sd, "twice"), _image(sd, "stay")

    make_tiny_embedding(path, seed=1)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000_000))
    changed = _one(tmp_path, "twice")
    loader.ensure(sd, "sd15", [changed])
    assert calls == ["twice", "stay", "twice"]
    assert loader.loaded == {"twice": changed.sha256, "stay": stay.sha256}
    assert np.abs(_image(sd, "twice") - seed0).mean() > 0.01
    # Unloading the old vectors renumbered the tokens after it; the others still work.
    np.testing.assert_array_equal(_image(sd, "stay"), stay_image)
    stay_id = sd.tokenizer.convert_tokens_to_ids("stay")
    assert stay_id in _ids(sd.tokenizer, sd, "stay,")
    assert stay_id not in _ids(sd.tokenizer, sd, "xstay Stay")  # still whole-word and with case

    make_tiny_embedding(path, seed=0)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 2_000_000_000))
    loader.ensure(sd, "sd15", [_one(tmp_path, "twice")])
    np.testing.assert_array_equal(_image(sd, "twice"), seed0)


def test_a_file_changed_after_listing_is_refused(sd, tmp_path: Path) -> None:  # noqa: ANN001
    path = make_tiny_embedding(tmp_path / "racy.safetensors", seed=0)
    listed = _one(tmp_path, "racy")
    make_tiny_embedding(path, seed=3)
    size = len(sd.tokenizer)

    with pytest.raises(EmbeddingLoadError, match="'racy' changed on disk while it was being loaded"):
        EmbeddingLoader().ensure(sd, "sd15", [listed])
    assert len(sd.tokenizer) == size


def test_mixed_case_multi_vector_name_uses_every_vector(sd, tmp_path: Path) -> None:  # noqa: ANN001
    make_tiny_embedding(tmp_path / "TinyMixed.safetensors", vectors=3, style="diffusers")
    EmbeddingLoader().ensure(sd, "sd15", [_one(tmp_path, "TinyMixed")])

    three = sd.tokenizer.convert_tokens_to_ids(["TinyMixed", "TinyMixed_1", "TinyMixed_2"])
    assert _ids(sd.tokenizer, sd, "(TinyMixed:1.1)")[1:4] == three
    # Lowercase or inside a word it is not the embedding: the tokenizer agrees with embeddings_in.
    for text in ("tinymixed", "xTinyMixed", "TinyMixedx"):
        assert not set(three) & set(_ids(sd.tokenizer, sd, text))


def test_tokenizer_agrees_with_embeddings_in(sd, tmp_path: Path) -> None:  # noqa: ANN001
    for stem in ("Qz", "Qz-k", "Qz.v2"):
        make_tiny_embedding(tmp_path / f"{stem}.safetensors", vectors=1)
    available = scan_embeddings(tmp_path)
    EmbeddingLoader().ensure(sd, "sd15", list(available.values()))
    id_of = {n: sd.tokenizer.convert_tokens_to_ids(n) for n in available}

    for text in ["Qz", "Qz-k", "Qz-kk", "Qz.v2 Qz", "(Qz-k:1.2)", "_Qz", "Qz_", "éQz", "Qz.v", "qz", "a,Qz,b"]:
        ids = set(_ids(sd.tokenizer, sd, text))
        assert {n for n, i in id_of.items() if i in ids} == {e.name for e in embeddings_in(text, available)}, text


def test_negative_embedding_changes_the_image(sd, tmp_path: Path) -> None:  # noqa: ANN001
    make_tiny_embedding(tmp_path / "tinyneg.safetensors", vectors=4, seed=9)
    before = _image(sd, "a cat", negative_prompt="tinyneg")

    EmbeddingLoader().ensure(sd, "sd15", [_one(tmp_path, "tinyneg")])

    assert np.abs(_image(sd, "a cat", negative_prompt="tinyneg") - before).mean() > 0.01


def test_wrong_width_is_refused_and_the_pipeline_is_unchanged(sd, tmp_path: Path) -> None:  # noqa: ANN001
    make_tiny_embedding(tmp_path / "wide.safetensors", width=768)
    make_tiny_embedding(tmp_path / "xlonly.safetensors", style="sdxl")
    found = scan_embeddings(tmp_path)
    before = _image(sd, "wide xlonly")
    size, rows = len(sd.tokenizer), sd.text_encoder.get_input_embeddings().weight.shape
    loader = EmbeddingLoader()

    with pytest.raises(EmbeddingLoadError) as exc:
        loader.ensure(sd, "sd15", [found["wide"]])
    assert (
        str(exc.value) == "embedding 'wide' is 768 wide (made for sd15), but the model's text encoder is 32 wide (sd15)"
    )
    assert exc.value.code == "embedding_incompatible"
    with pytest.raises(EmbeddingLoadError, match=r"'xlonly' is 32 and 32 wide \(one tensor per text encoder\)"):
        loader.ensure(sd, "sd15", [found["xlonly"]])

    assert loader.loaded == {}
    assert (len(sd.tokenizer), sd.text_encoder.get_input_embeddings().weight.shape) == (size, rows)
    np.testing.assert_array_equal(_image(sd, "wide xlonly"), before)


def test_incompatibility_before_loading() -> None:
    (emb,) = _fake_listing("e").values()
    assert embedding_incompatibility(emb, family="sd15", text_width=32) is None
    assert embedding_incompatibility(emb, family="sd15", text_width=(32,)) is None
    assert embedding_incompatibility(emb, family="sdxl", text_width=(32, 32)) == (
        "embedding 'e' is 32 wide, but the model's text encoders are 32 and 32 wide (one tensor per text encoder) (sdxl)"
    )


def test_a_name_the_tokenizer_already_has_is_refused_cleanly(sd, tmp_path: Path) -> None:  # noqa: ANN001
    # The tiny tokenizer's vocabulary is single characters: "q" is one of them.
    make_tiny_embedding(tmp_path / "q.safetensors")
    size = len(sd.tokenizer)

    with pytest.raises(EmbeddingLoadError, match="'q' could not be loaded: Token q already in tokenizer vocabulary"):
        EmbeddingLoader().ensure(sd, "sd15", [_one(tmp_path, "q")])
    assert len(sd.tokenizer) == size


def test_sdxl_embedding_loads_into_both_text_encoders(sdxl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    path = make_tiny_embedding(tmp_path / "xlemb.safetensors", style="sdxl", vectors=2, seed=4)
    make_tiny_embedding(tmp_path / "sd15emb.safetensors")
    found = scan_embeddings(tmp_path)
    before = _image(sdxl, "a photo of xlemb")
    calls = _count_loads(monkeypatch, sdxl)
    loader = EmbeddingLoader()

    with pytest.raises(EmbeddingLoadError, match="'sd15emb' is 32 wide, but the model's text encoders are 32 and 32"):
        loader.ensure(sdxl, "sdxl", [found["sd15emb"]])
    loader.ensure(sdxl, "sdxl", [found["xlemb"]])
    loader.ensure(sdxl, "sdxl", [found["xlemb"]])

    assert calls == ["xlemb", "xlemb"]  # one per text encoder, once
    state = load_file(str(path))
    for tokenizer, encoder, key in (
        (sdxl.tokenizer, sdxl.text_encoder, "clip_l"),
        (sdxl.tokenizer_2, sdxl.text_encoder_2, "clip_g"),
    ):
        ids = _ids(tokenizer, sdxl, "xlemb")
        assert ids == tokenizer.convert_tokens_to_ids(["xlemb", "xlemb_1"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], state[key])
    assert np.abs(_image(sdxl, "a photo of xlemb") - before).mean() > 0.002  # tiny SDXL hears text faintly


def test_sdxl_refused_by_the_second_encoder_is_taken_out_of_the_first(sdxl, tmp_path: Path) -> None:  # noqa: ANN001
    # "clash" is already a token of the second tokenizer only: diffusers refuses it there.
    sdxl.load_textual_inversion(
        torch.ones(1, 32), token="clash", tokenizer=sdxl.tokenizer_2, text_encoder=sdxl.text_encoder_2
    )
    make_tiny_embedding(tmp_path / "clash.safetensors", style="sdxl")
    size = len(sdxl.tokenizer)
    # Rows past the tokenizer's last id are never looked up (the tiny encoder has spare ones).
    rows = sdxl.text_encoder.get_input_embeddings().weight[:size].clone()
    loader = EmbeddingLoader()

    with pytest.raises(EmbeddingLoadError, match="'clash' could not be loaded: Token clash already in tokenizer"):
        loader.ensure(sdxl, "sdxl", [_one(tmp_path, "clash")])

    assert loader.loaded == {}
    assert "clash" not in sdxl.tokenizer.get_vocab()
    assert len(sdxl.tokenizer) == size
    torch.testing.assert_close(sdxl.text_encoder.get_input_embeddings().weight[:size], rows, rtol=0, atol=0)
