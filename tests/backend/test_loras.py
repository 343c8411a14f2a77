"""LoRA files: the folder listing, what the headers say, and adapters on a real tiny pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.loras import (
    AdapterCache,
    LoraFile,
    LoraLoadError,
    adapter_name,
    file_sha256,
    lora_incompatibility,
    scan_loras,
    trigger_words,
)
from tests.fakes.tiny_adapters import make_tiny_lora

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    # The machine has 2 cores shared with other runs: two torch threads fighting them make
    # each tiny render several times slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_files(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """The LoRAs the tests use, built once: the same SD weights in both layouts, and others."""
    out = tmp_path_factory.mktemp("lora-src")
    sd, sdxl = tiny_model_dirs["tiny-sd"], tiny_model_dirs["tiny-sdxl"]
    return {
        "sd_diffusers": make_tiny_lora(sd, out / "sd_d.safetensors", key_format="diffusers", text_encoder=True),
        "sd_kohya": make_tiny_lora(sd, out / "sd_k.safetensors", key_format="kohya", text_encoder=True),
        "sd_unet_only": make_tiny_lora(sd, out / "sd_u.safetensors", key_format="kohya"),
        "sd_seed1": make_tiny_lora(sd, out / "sd_1.safetensors", key_format="kohya", seed=1),
        "sd_seed2": make_tiny_lora(sd, out / "sd_2.safetensors", key_format="kohya", seed=2),
        "sdxl_kohya": make_tiny_lora(sdxl, out / "xl_k.safetensors", key_format="kohya", text_encoder=True),
        "sdxl_diffusers": make_tiny_lora(sdxl, out / "xl_d.safetensors", key_format="diffusers", text_encoder=True),
    }


@pytest.fixture(scope="module")
def loras(lora_files) -> dict[str, LoraFile]:
    folder = lora_files["sd_diffusers"].parent
    found = scan_loras(folder)
    return {key: found[path.stem] for key, path in lora_files.items()}


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_dirs):  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["tiny-sd"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_image(sd_pipe) -> np.ndarray:
    """The image before any LoRA ever touched the pipeline."""
    return render(sd_pipe)


@pytest.fixture
def cache(sd_pipe, base_image) -> AdapterCache:
    cache = AdapterCache(max_adapters=4)
    yield cache
    cache.clear(sd_pipe)
    sd_pipe.__dict__.pop("load_lora_weights", None)  # a test's counting wrapper


def render(pipe) -> np.ndarray:  # noqa: ANN001
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, width=64, height=64, num_inference_steps=2, generator=generator, output_type="np").images[0]


def count_loads(pipe) -> list[str]:  # noqa: ANN001
    """Record every load_lora_weights call on ``pipe`` (the real method still runs)."""
    calls: list[str] = []
    real = pipe.load_lora_weights

    def counting(path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(Path(path).name)
        return real(path, **kwargs)

    pipe.load_lora_weights = counting
    return calls


# --- scanning ---------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this touches a file: proof that a pickle was loaded."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.sentinel),))


def test_scan_lists_only_safetensors_and_never_opens_pickles(lora_files, tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(lora_files["sd_kohya"], folder / "fox.safetensors")
    shutil.copy(lora_files["sd_seed1"], folder / "styles" / "inked.safetensors")
    shutil.copy(lora_files["sd_seed2"], folder / "styles" / "LOUD.SAFETENSORS")
    shutil.copy(lora_files["sd_seed2"], folder / "styles" / "fox.safetensors")  # same stem, later path
    shutil.copy(lora_files["sd_seed2"], folder / ".partial.safetensors")
    sentinel = tmp_path / "unpickled"
    for name in ("evil.pt", "evil2.ckpt", "evil3.bin", "evil4.pth", "fox.pt"):
        torch.save({"x": _Tripwire(sentinel)}, folder / name)
    (folder / "notes.txt").write_text("not a LoRA")

    found = scan_loras(folder)

    assert sorted(found) == ["LOUD", "fox", "inked"]
    assert found["fox"].path == folder / "fox.safetensors"  # the first by sorted path
    assert found["inked"].path == folder / "styles" / "inked.safetensors"
    assert not sentinel.exists()
    assert set(found["fox"].public_dict()) == {"name", "family", "key_format", "size", "sha256", "trigger_words"}
    assert str(folder) not in json.dumps(found["fox"].public_dict())


def test_scan_of_a_missing_folder_is_empty(tmp_path):
    assert scan_loras(tmp_path / "nope") == {}
    assert scan_loras(str(tmp_path)) == {}


def test_scan_skips_broken_files_and_files_without_lora_weights(lora_files, tmp_path):
    shutil.copy(lora_files["sd_kohya"], tmp_path / "good.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"conv.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint.safetensors")  # weights, not a LoRA
    save_file({"emb_params": torch.zeros(2, 32)}, tmp_path / "embedding.safetensors")
    assert list(scan_loras(tmp_path)) == ["good"]


def test_scan_skips_links_that_lead_outside_the_folder(lora_files, tmp_path):
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(lora_files["sd_kohya"], outside / "secret.safetensors")
    shutil.copy(lora_files["sd_seed1"], folder / "real.safetensors")
    (folder / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (folder / "linked_dir").symlink_to(outside, target_is_directory=True)
    (folder / "alias.safetensors").symlink_to(folder / "real.safetensors")  # stays inside: fine
    assert sorted(scan_loras(folder)) == ["alias", "real"]


def test_key_format_family_and_cross_attention_dim_of_the_tiny_loras(loras):
    sd, xl, xl_d = loras["sd_kohya"], loras["sdxl_kohya"], loras["sdxl_diffusers"]
    assert (sd.key_format, sd.family, sd.cross_attention_dim) == ("kohya", None, 32)
    assert (loras["sd_diffusers"].key_format, loras["sd_diffusers"].family) == ("diffusers", None)
    # The tiny SDXL's width (64) says nothing; its second text encoder does.
    assert (xl.key_format, xl.family, xl.cross_attention_dim) == ("kohya", "sdxl", 64)
    assert (xl_d.key_format, xl_d.family, xl_d.cross_attention_dim) == ("diffusers", "sdxl", 64)


KOHYA_TO_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
DIFFUSERS_TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize(("dim", "family"), [(768, "sd15"), (1024, "sd2"), (2048, "sdxl"), (32, None), (1280, None)])
def test_family_from_the_cross_attention_width(tmp_path, dim, family):
    save_file(
        {f"{KOHYA_TO_K}.lora_down.weight": torch.zeros(4, dim), f"{KOHYA_TO_K}.lora_up.weight": torch.zeros(320, 4)},
        tmp_path / "k.safetensors",
    )
    save_file(
        {
            f"{DIFFUSERS_TO_K}.lora_A.weight": torch.zeros(4, dim),
            f"{DIFFUSERS_TO_K}.lora_B.weight": torch.zeros(320, 4),
        },
        tmp_path / "d.safetensors",
    )
    found = scan_loras(tmp_path)
    assert (found["k"].family, found["k"].cross_attention_dim, found["k"].key_format) == (family, dim, "kohya")
    assert (found["d"].family, found["d"].cross_attention_dim, found["d"].key_format) == (family, dim, "diffusers")


def test_family_from_kohya_names_text_encoder_width_and_metadata(tmp_path):
    def write(name: str, module: str, metadata: dict[str, str] | None = None, width: int = 40) -> None:
        tensors = {f"{module}.lora_down.weight": torch.zeros(4, width), f"{module}.lora_up.weight": torch.zeros(40, 4)}
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata=metadata)

    write("sgm", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")  # kohya SDXL block names
    write("te768", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", width=768)
    write("te1024", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", width=1024)
    write("meta_v2", "lora_unet_down_blocks_0_attentions_0_proj_in", {"ss_v2": "True"})
    write(
        "meta_xl",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
    )
    write("unknown", "lora_unet_down_blocks_0_attentions_0_proj_in")
    found = scan_loras(tmp_path)
    assert {n: f.family for n, f in found.items()} == {
        "meta_v2": "sd2",
        "meta_xl": "sdxl",
        "sgm": "sdxl",
        "te1024": "sd2",
        "te768": "sd15",
        "unknown": None,
    }


def test_trigger_words_from_metadata(tiny_model_dirs, tmp_path):
    make_tiny_lora(
        tiny_model_dirs["tiny-sd"],
        tmp_path / "styled.safetensors",
        key_format="diffusers",
        metadata={"ss_trigger_words": '["zkx style", "sparkle"]', "modelspec.title": "Zkx Style"},
    )
    found = scan_loras(tmp_path)["styled"]
    assert found.trigger_words == ["zkx style", "sparkle"]
    assert found.metadata_title == "Zkx Style"
    assert found.public_dict()["trigger_words"] == ["zkx style", "sparkle"]


def test_trigger_word_sources_and_malformed_metadata():
    assert trigger_words({"modelspec.trigger_phrase": "ohwx man, portrait"}) == ["ohwx man", "portrait"]
    assert trigger_words({"trigger_words": "a, b", "ss_trigger_words": "b, c"}) == ["b", "c", "a"]
    freq = {"10_ohwx": {"ohwx": 30, "1girl": 12, "smile": 3}, "5_reg": {"1girl": 20, "hat": 4, "x": 1, "y": 2}}
    assert trigger_words({"ss_tag_frequency": json.dumps(freq)}) == ["1girl", "ohwx", "hat", "smile", "y"]
    # An explicit field wins over the tag counts.
    assert trigger_words({"ss_trigger_words": "ohwx", "ss_tag_frequency": json.dumps(freq)}) == ["ohwx"]
    for bad in ("{not json", "[1, 2]", '{"d": [1]}', '{"d": {"tag": "many"}}', "null"):
        assert trigger_words({"ss_tag_frequency": bad}) == []
    assert trigger_words({"ss_trigger_words": "[3, 4]"}) == []
    assert trigger_words({}) == []


def test_sha256_is_of_the_bytes_and_follows_changes(lora_files, tmp_path):
    path = tmp_path / "fox.safetensors"
    shutil.copy(lora_files["sd_kohya"], path)
    first = scan_loras(tmp_path)["fox"]
    assert first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first.size == path.stat().st_size

    shutil.copy(lora_files["sd_seed1"], path)
    os.utime(path, ns=(first_ns := path.stat().st_mtime_ns + 10**9, first_ns))
    second = scan_loras(tmp_path)["fox"]
    assert second.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first.sha256
    assert adapter_name(second) != adapter_name(first)


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 100)
    stamp = path.stat().st_mtime_ns
    before = file_sha256(path)
    # Same size, same mtime: the cached hash is returned without reading the file again.
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stamp, stamp))
    assert file_sha256(path) == before
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest()


def test_incompatibility_names_the_lora_and_both_families(loras):
    xl = loras["sdxl_kohya"]
    message = lora_incompatibility(xl, family="sd15", cross_attention_dim=32)
    assert message == "LoRA 'xl_k' is for sdxl models; this model is sd15"
    assert lora_incompatibility(xl, family="sdxl", cross_attention_dim=64) is None
    # Family unknown: the width decides, and a width unknown on either side never rejects.
    sd = loras["sd_kohya"]
    assert lora_incompatibility(sd, family="sd15", cross_attention_dim=32) is None
    assert "cross-attention width 32; this model's is 768" in lora_incompatibility(
        sd, family="sd15", cross_attention_dim=768
    )
    assert lora_incompatibility(sd, family="sdxl", cross_attention_dim=None) is None


# --- adapters on a pipeline -------------------------------------------------------------------


def test_weight_zero_is_exactly_the_plain_image_and_weight_one_is_not(sd_pipe, base_image, cache, loras):
    cache.apply(sd_pipe, [(loras["sd_kohya"], 0.0)])
    assert np.array_equal(render(sd_pipe), base_image)
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    with_lora = render(sd_pipe)
    assert np.abs(with_lora - base_image).max() > 0.05
    cache.apply(sd_pipe, [(loras["sd_kohya"], 0.5)])
    half = render(sd_pipe)
    assert 0 < np.abs(half - base_image).max() < np.abs(with_lora - base_image).max()
    # Nothing leaks into the next job without LoRAs.
    cache.apply(sd_pipe, [])
    assert np.array_equal(render(sd_pipe), base_image)


def test_kohya_and_diffusers_layouts_give_the_same_image(sd_pipe, base_image, cache, loras):
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    kohya = render(sd_pipe)
    cache.apply(sd_pipe, [(loras["sd_diffusers"], 1.0)])
    diffusers = render(sd_pipe)
    assert np.abs(kohya - diffusers).max() < 1e-5
    # The text-encoder half is applied too: the UNet-only LoRA (same UNet weights) differs.
    cache.apply(sd_pipe, [(loras["sd_unet_only"], 1.0)])
    assert np.abs(render(sd_pipe) - kohya).max() > 1e-3


def test_a_loaded_lora_is_not_loaded_again(sd_pipe, cache, loras):
    calls = count_loads(sd_pipe)
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    first = render(sd_pipe)
    cache.apply(sd_pipe, [])
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    assert np.array_equal(render(sd_pipe), first)
    assert calls == ["sd_k.safetensors"]
    assert cache.loaded == [adapter_name(loras["sd_kohya"])]


def test_adapters_are_shared_with_pipelines_made_from_the_model(sd_pipe, base_image, cache, loras):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd_pipe)
    calls = count_loads(sd_pipe)
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    cache.apply(img2img, [(loras["sd_kohya"], 1.0)])  # same modules: no second load
    assert calls == ["sd_k.safetensors"]
    cache.apply(img2img, [])
    assert np.array_equal(render(sd_pipe), base_image)


def test_least_recently_used_adapter_is_evicted(sd_pipe, cache, loras):
    cache.max_adapters = 2
    a, b, c = loras["sd_kohya"], loras["sd_seed1"], loras["sd_seed2"]
    calls = count_loads(sd_pipe)
    cache.apply(sd_pipe, [(a, 1.0)])
    cache.apply(sd_pipe, [(b, 1.0)])
    cache.apply(sd_pipe, [(a, 1.0)])  # a is now the most recent
    cache.apply(sd_pipe, [(c, 1.0)])  # evicts b
    assert cache.loaded == [adapter_name(a), adapter_name(c)]
    assert set(sd_pipe.get_list_adapters()["unet"]) == {adapter_name(a), adapter_name(c)}
    assert calls == ["sd_k.safetensors", "sd_1.safetensors", "sd_2.safetensors"]
    # A request that needs more than fit keeps all it needs (nothing it uses is evicted).
    cache.apply(sd_pipe, [(a, 0.5), (b, 0.5), (c, 0.5)])
    assert sorted(cache.loaded) == sorted(adapter_name(x) for x in (a, b, c))
    cache.apply(sd_pipe, [(b, 1.0)])  # the next load trims back to the limit: a, c were older
    cache.apply(sd_pipe, [(loras["sd_diffusers"], 1.0)])
    assert cache.loaded == [adapter_name(b), adapter_name(loras["sd_diffusers"])]


def test_two_loras_at_once_and_a_repeated_one_stacks(sd_pipe, base_image, cache, loras):
    a, b = loras["sd_kohya"], loras["sd_seed1"]
    cache.apply(sd_pipe, [(a, 1.0), (b, 1.0)])
    both = render(sd_pipe)
    cache.apply(sd_pipe, [(a, 1.0)])
    assert np.abs(both - render(sd_pipe)).max() > 1e-3
    cache.apply(sd_pipe, [(a, 0.5), (a, 0.5)])
    twice = render(sd_pipe)
    cache.apply(sd_pipe, [(a, 1.0)])
    assert np.abs(twice - render(sd_pipe)).max() < 1e-6


def test_a_lora_for_another_model_is_refused_and_the_model_stays_clean(sd_pipe, base_image, cache, loras):
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    with_lora = render(sd_pipe)
    xl = loras["sdxl_kohya"]
    with pytest.raises(LoraLoadError, match="LoRA 'xl_k'"):
        cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0), (xl, 1.0)])
    assert np.array_equal(render(sd_pipe), base_image)

    # A file whose header hides the mismatch fails in the load itself, and is cleaned up.
    hidden = dataclasses.replace(xl, family=None, cross_attention_dim=None)
    with pytest.raises(LoraLoadError, match="LoRA 'xl_k' could not be loaded") as failure:
        cache.apply(sd_pipe, [(hidden, 1.0)])
    assert str(xl.path) not in str(failure.value)
    assert all(adapter_name(xl) not in names for names in sd_pipe.get_list_adapters().values())
    assert cache.loaded == [adapter_name(loras["sd_kohya"])]
    assert np.array_equal(render(sd_pipe), base_image)
    # The model still takes LoRAs afterwards.
    cache.apply(sd_pipe, [(loras["sd_kohya"], 1.0)])
    assert np.array_equal(render(sd_pipe), with_lora)


def test_a_file_changed_into_a_pickle_or_removed_after_the_scan_is_refused(sd_pipe, base_image, cache, loras, tmp_path):
    path = tmp_path / "swapped.safetensors"
    shutil.copy(loras["sd_kohya"].path, path)
    lora = scan_loras(tmp_path)["swapped"]
    # The same LoRA weights, pickled (torch.load would take them): refused, never unpickled.
    torch.save(load_file(loras["sd_kohya"].path), path)
    with pytest.raises(LoraLoadError, match="LoRA 'swapped' could not be loaded"):
        cache.apply(sd_pipe, [(lora, 1.0)])
    path.unlink()
    with pytest.raises(LoraLoadError, match="LoRA 'swapped' is no longer in the LoRA folder"):
        cache.apply(sd_pipe, [(lora, 1.0)])
    assert cache.loaded == []
    assert np.array_equal(render(sd_pipe), base_image)


def test_max_adapters_must_be_positive():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        AdapterCache(max_adapters=0)
