"""Single-file checkpoints from a folder: detection, listing, shipped configs, offline loading.

The key test writes tiny-sd as one file in the original layout, loads it through the
manager with ``from_single_file`` with the hub switched off, and gets the same pixels as
from its diffusers folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from django.conf import settings
from safetensors.torch import save_file

from backend.catalog import CatalogError, load_catalog
from backend.config import EngineConfig
from backend.devices import DevicePlan
from backend.errors import ModelUnavailable, UnknownModel
from backend.local import LocalBackend
from backend.manager import ModelManager
from backend.params import GenerationParams
from backend.single_file import (
    MODEL_CONFIGS_DIR,
    CheckpointError,
    CheckpointInfo,
    checkpoint_id,
    detect_checkpoint,
    family_config_dir,
    scan_checkpoints,
)
from tests.fakes.ldm_layout import write_single_file

CPU_FP32 = DevicePlan(
    device="cpu", dtype="fp32", attention_slicing=False, vae_slicing=False, vae_tiling=False, cpu_offload="off"
)
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
SDXL_TEXT = "conditioner.embedders.1.model.positional_embedding"
SDXL_TEXT_L = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A real safetensors file holding zeros under the given names and shapes (detection
    reads the header only; the shapes are kept small where they don't matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes.items()}, path)
    return path


def sd15_keys(in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    return {UNET_IN: (320, in_channels, 3, 3), SD1_TEXT: (77, 768), "first_stage_model.decoder.conv_in.bias": (512,)}


# -- detection -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (sd15_keys(), CheckpointInfo("sd15", 4, None)),
        (sd15_keys(9), CheckpointInfo("sd15", 9, None)),
        ({UNET_IN: (320, 4, 3, 3), SD2_TEXT: (8, 1024)}, CheckpointInfo("sd2", 4, "v_prediction")),
        ({UNET_IN: (320, 9, 3, 3), SD2_TEXT: (8, 1024)}, CheckpointInfo("sd2", 9, "epsilon")),
        ({UNET_IN: (320, 4, 3, 3), SDXL_TEXT_L: (77, 768), SDXL_TEXT: (77, 1280)}, CheckpointInfo("sdxl", 4, None)),
        ({UNET_IN: (320, 9, 3, 3), SDXL_TEXT_L: (77, 768), SDXL_TEXT: (77, 1280)}, CheckpointInfo("sdxl", 9, None)),
        ({**sd15_keys(), "v_pred": (0,)}, CheckpointInfo("sd15", 4, "v_prediction")),
    ],
    ids=["sd15", "sd15-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint", "v_pred-marker"],
)
def test_detects_family_channels_and_prediction_from_the_header(tmp_path, keys, expected):
    info = detect_checkpoint(write_header_only(tmp_path / "m.safetensors", keys))
    assert info == expected
    assert info.is_inpainting is (expected.in_channels == 9)


@pytest.mark.parametrize(
    "keys",
    [
        # A Kohya LoRA: UNet and text encoder module names, but no checkpoint keys.
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": (),
        },
        {UNET_IN: (320, 4, 3, 3)},  # a lone UNet: no text encoder to say the family
        {SD1_TEXT: (77, 768)},  # a lone text encoder
        {"conditioner.embedders.0.model.positional_embedding": (77, 1280), UNET_IN: (384, 4, 3, 3)},  # SDXL refiner
        {UNET_IN: (320, 8, 3, 3), SD1_TEXT: (77, 768)},  # neither 4 nor 9 channels
    ],
    ids=["lora", "unet-only", "text-encoder-only", "sdxl-refiner", "odd-channels"],
)
def test_files_that_are_not_whole_checkpoints_are_not_detected(tmp_path, keys):
    assert detect_checkpoint(write_header_only(tmp_path / "x.safetensors", keys)) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"\x05\x00\x00", (10**12).to_bytes(8, "little") + b"{}", (7).to_bytes(8, "little") + b"not json"],
    ids=["empty", "short", "huge-header", "bad-json"],
)
def test_unreadable_files_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        detect_checkpoint(path)


# -- scanning ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("dreamshaper_8.safetensors", "dreamshaper_8"),
        ("My Model (v2).safetensors", "my-model-v2"),
        ("Juggernaut XL v9 + RunDiffusion.SAFETENSORS", "juggernaut-xl-v9-rundiffusion"),
        ("--weird--.safetensors", "weird"),
        ("ünïcode.safetensors", "n-code"),
        ("a" * 80 + ".safetensors", "a" * 64),
        ("((())).safetensors", None),
    ],
)
def test_ids_come_from_file_names(file_name, expected):
    assert checkpoint_id(file_name) == expected


def test_scan_lists_safetensors_checkpoints_only_and_never_opens_pickles(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    write_header_only(folder / "Real Vision 5.safetensors", sd15_keys())
    write_header_only(folder / "xl" / "juggernaut.safetensors", {UNET_IN: (320, 4, 3, 3), SDXL_TEXT: (77, 1280)})
    write_header_only(folder / "inpaint.safetensors", sd15_keys(9))
    write_header_only(folder / "some_lora.safetensors", {"lora_unet_x.lora_down.weight": (4, 8)})
    write_header_only(folder / ".hidden.safetensors", sd15_keys())
    (folder / "broken.safetensors").write_bytes(b"\x00\x01")
    # A pickle that would run code if unpickled: it must never be listed or opened.
    (folder / "evil.ckpt").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    (folder / "model.pt").write_bytes(b"\x80\x04")
    (folder / "notes.txt").write_text("hi")
    with caplog.at_level(logging.WARNING, logger="backend.single_file"):
        specs = {s.id: s for s in scan_checkpoints(folder)}
    assert sorted(specs) == ["inpaint", "juggernaut", "real-vision-5"]
    assert "broken.safetensors" in caplog.text
    assert not (tmp_path / "pwned").exists()
    real = specs["real-vision-5"]
    assert (real.family, real.default_size, real.source, real.name) == ("sd15", 512, "single_file", "Real Vision 5")
    assert real.path == str(folder / "Real Vision 5.safetensors")
    assert (real.default_guidance_scale, real.tags, real.description) == (
        7.5,
        ("checkpoint",),
        "single-file checkpoint",
    )
    xl = specs["juggernaut"]
    assert (xl.family, xl.default_size, xl.default_guidance_scale) == ("sdxl", 1024, 5.0)
    assert specs["inpaint"].tags == ("checkpoint", "inpainting")
    assert scan_checkpoints(tmp_path / "missing") == []


def test_scan_id_clash_first_path_wins_and_links_out_of_the_folder_are_skipped(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    write_header_only(folder / "a" / "Model.safetensors", sd15_keys())
    write_header_only(folder / "b" / "model.safetensors", sd15_keys())
    outside = write_header_only(tmp_path / "elsewhere" / "secret.safetensors", sd15_keys())
    os.symlink(outside, folder / "linked.safetensors")
    os.symlink(tmp_path / "elsewhere", folder / "linked-dir")
    os.symlink(folder / "a" / "Model.safetensors", folder / "inside-link.safetensors")
    with caplog.at_level(logging.WARNING, logger="backend.single_file"):
        specs = {s.id: s for s in scan_checkpoints(folder)}
    assert sorted(specs) == ["inside-link", "model"]
    assert specs["model"].path == str(folder / "a" / "Model.safetensors")
    assert "taken by" in caplog.text and "leads outside" in caplog.text


# -- catalogue ------------------------------------------------------------------------------------
def test_catalog_file_sets_fields_of_scanned_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    write_header_only(folder / "mine.safetensors", {UNET_IN: (320, 4, 3, 3), SD2_TEXT: (8, 1024)})
    write_header_only(folder / "tiny-sd.safetensors", sd15_keys())  # can't shadow a catalogue model
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(
        json.dumps([{"id": "mine", "name": "Mine", "prediction_type": "epsilon", "default_size": 512, "config": "cfg"}])
    )
    catalog = load_catalog(catalog_file, folder)
    mine = catalog["mine"]
    assert (mine.name, mine.prediction_type, mine.default_size, mine.family) == ("Mine", "epsilon", 512, "sd2")
    assert mine.source == "single_file" and mine.path == str(folder / "mine.safetensors")
    assert mine.config == str((tmp_path / "cfg").resolve())
    assert catalog["tiny-sd"].source == "builtin"
    public = mine.public_dict()
    assert "path" not in public and "config" not in public and public["location"] == "local"
    assert str(tmp_path) not in json.dumps(public)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "x", "family": "sd15", "default_size": 512, "source": "single_file"}, "needs 'path', a .safetensors"),
        ({"id": "x", "family": "sd15", "default_size": 512, "path": "m.ckpt", "source": "single_file"}, ".safetensors"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "config": "c"}, "only for single_file"),
    ],
)
def test_catalog_rejects_bad_single_file_entries(tmp_path, entry, message):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_a_safetensors_path_in_the_catalog_file_is_a_single_file_model(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([{"id": "x", "family": "sdxl", "default_size": 1024, "path": "m.safetensors"}]))
    spec = load_catalog(path)["x"]
    assert (spec.source, spec.path) == ("single_file", str(tmp_path / "m.safetensors"))


# -- shipped configs -----------------------------------------------------------------------------
def test_shipped_tokenizers_give_the_published_ids(tmp_path):
    from transformers import CLIPTokenizer

    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    sd15 = family_config_dir("sd15", tmp_path)
    sdxl = family_config_dir("sdxl", tmp_path)
    assert family_config_dir("sd15", tmp_path) == sd15  # built once, then found
    for folder, pad_id in ((sd15 / "tokenizer", 49407), (sdxl / "tokenizer", 49407), (sdxl / "tokenizer_2", 0)):
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert tokenizer("a photo of a cat").input_ids == expected
        assert (len(tokenizer), tokenizer.model_max_length, tokenizer.pad_token_id) == (49408, 77, pad_id)


def test_shipped_configs_have_the_published_architectures(tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

    sd15, sd2, sdxl = (family_config_dir(f, tmp_path) for f in ("sd15", "sd2", "sdxl"))
    assert UNet2DConditionModel.load_config(sd15 / "unet")["cross_attention_dim"] == 768
    assert UNet2DConditionModel.load_config(sd2 / "unet")["cross_attention_dim"] == 1024
    xl_unet = UNet2DConditionModel.load_config(sdxl / "unet")
    assert (xl_unet["cross_attention_dim"], xl_unet["projection_class_embeddings_input_dim"]) == (2048, 2816)
    assert xl_unet["transformer_layers_per_block"] == [1, 2, 10]
    assert AutoencoderKL.load_config(sdxl / "vae")["scaling_factor"] == 0.13025
    assert AutoencoderKL.load_config(sd15 / "vae")["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(sd2 / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (1024, 23, "gelu")
    bigg = CLIPTextConfig.from_pretrained(sdxl / "text_encoder_2")
    assert (bigg.hidden_size, bigg.num_hidden_layers, bigg.projection_dim) == (1280, 32, 1280)
    assert DiffusionPipeline.load_config(sd2)["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    inpaint = family_config_dir("sd15", tmp_path, in_channels=9)
    assert UNet2DConditionModel.load_config(inpaint / "unet")["in_channels"] == 9
    assert not (MODEL_CONFIGS_DIR / "sd15" / "tokenizer" / "vocab.json").exists()  # built, never shipped


def test_shipped_sd15_unet_config_gives_the_original_checkpoint_shapes():
    # Built on the meta device: the shapes of the real SD 1.5 weights, no memory spent.
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from tests.fakes.ldm_layout import convert_unet

    config = UNet2DConditionModel.load_config(MODEL_CONFIGS_DIR / "sd15" / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in convert_unet(unet.state_dict(), config).items()}
    assert len(shapes) == 686  # the UNet keys of v1-5-pruned-emaonly.safetensors
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.11.1.proj_out.weight"] == (320, 320, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.time_embed.0.weight"] == (1280, 320)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet


def test_shipped_sd2_configs_give_the_published_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = MODEL_CONFIGS_DIR / "sd2"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 340_387_840


# -- loading through the manager -------------------------------------------------------------------
@pytest.fixture
def checkpoint_manager(tiny_model_dirs, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A manager over a checkpoint folder holding tiny-sd as one file, with the hub off."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "checkpoints"
    write_single_file(tiny_model_dirs["tiny-sd"], folder / "Tiny SD (single file).safetensors")
    # The tiny architecture isn't SD 1.5's: the catalogue points at its configs.
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(
        json.dumps([{"id": "tiny-sd-single-file", "config": str(tiny_model_dirs["tiny-sd"]), "default_size": 64}])
    )
    config = EngineConfig(
        base_dir=Path(settings.BASE_DIR),
        tiny_models_dir=settings.ENGINE.tiny_models_dir,
        checkpoint_dir=folder,
        model_catalog_file=str(catalog_file),
        max_loaded_models=2,
        local_files_only=True,
    )
    manager = ModelManager(config, plan=CPU_FP32)
    yield manager
    manager.unload_all()


def generate(manager: ModelManager, model_id: str) -> np.ndarray:
    params = GenerationParams(
        kind="txt2img",
        model_id=model_id,
        prompt="a photo of a cat",
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.5,
        seed=1234,
    )
    return np.asarray(LocalBackend(manager).generate(params).images[0].image)


def test_a_single_file_checkpoint_loads_offline_and_matches_its_diffusers_folder(checkpoint_manager):
    manager = checkpoint_manager
    spec = manager.spec("tiny-sd-single-file")
    assert (spec.source, spec.family, spec.name) == ("single_file", "sd15", "Tiny SD (single file)")
    assert "tiny-sd-single-file" in {s.id for s in manager.available()}
    from_file = generate(manager, "tiny-sd-single-file")
    from_folder = generate(manager, "tiny-sd")
    assert from_file.shape == (64, 64, 3)
    assert from_file.std() > 0  # an image, not a blank
    np.testing.assert_array_equal(from_file, from_folder)
    assert type(manager.get("tiny-sd-single-file").txt2img).__name__ == "StableDiffusionPipeline"


def test_new_checkpoint_files_appear_and_removed_ones_go_without_a_restart(checkpoint_manager, tiny_model_dirs):
    manager = checkpoint_manager
    folder = manager.config.checkpoint_dir
    with pytest.raises(UnknownModel):
        manager.spec("dropped-in")
    write_header_only(folder / "Dropped In.safetensors", {UNET_IN: (320, 4, 3, 3), SDXL_TEXT: (77, 1280)})
    assert manager.spec("dropped-in").family == "sdxl"
    assert manager.spec("tiny-sd-single-file").config == str(tiny_model_dirs["tiny-sd"])  # the file still applies
    (folder / "Dropped In.safetensors").unlink()
    assert "dropped-in" not in {s.id for s in manager.available()}
    assert manager.refresh_catalog() is False  # nothing changed since: nothing to do


def test_a_loaded_checkpoint_stays_listed_after_its_file_goes(checkpoint_manager):
    manager = checkpoint_manager
    manager.get("tiny-sd-single-file")
    (manager.config.checkpoint_dir / "Tiny SD (single file).safetensors").unlink()
    assert manager.spec("tiny-sd-single-file").source == "single_file"
    manager.unload("tiny-sd-single-file")
    manager.config.checkpoint_dir.joinpath("other.safetensors").write_bytes(b"")  # a change: rescan
    with pytest.raises(UnknownModel):
        manager.spec("tiny-sd-single-file")


def test_shipped_configs_are_used_when_the_catalogue_names_none(checkpoint_manager):
    manager = checkpoint_manager
    folder = manager.config.checkpoint_dir
    write_single_file(manager.spec("tiny-sd-single-file").config, folder / "no-config.safetensors")
    kwargs = manager.single_file_kwargs(manager.spec("no-config"), CPU_FP32)
    assert Path(kwargs["config"]).parent == manager.config_cache_dir()
    assert Path(kwargs["config"]).name.startswith("sd15-")
    assert kwargs["local_files_only"] is True and kwargs["safety_checker"] is None
    assert kwargs["dtype"] == torch.float32


def test_safety_checker_setting_refuses_checkpoints_rather_than_running_without(checkpoint_manager):
    from dataclasses import replace

    manager = checkpoint_manager
    manager.config = replace(manager.config, enable_safety_checker=True)
    with pytest.raises(ModelUnavailable, match="ENABLE_SAFETY_CHECKER"):
        manager.get("tiny-sd-single-file")


def test_checkpoint_dir_comes_from_the_environment(tmp_path):
    assert EngineConfig.from_env({}, base_dir=tmp_path).checkpoint_dir == tmp_path / "models" / "checkpoints"
    assert EngineConfig.from_env({"CHECKPOINT_DIR": "ckpt"}, base_dir=tmp_path).checkpoint_dir == tmp_path / "ckpt"
    absolute = tmp_path / "abs"
    assert EngineConfig.from_env({"CHECKPOINT_DIR": str(absolute)}, base_dir=tmp_path).checkpoint_dir == absolute


def test_a_missing_checkpoint_file_is_unavailable_and_the_message_names_no_path(tmp_path):
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(
        json.dumps([{"id": "gone", "family": "sd15", "default_size": 512, "path": "gone.safetensors"}])
    )
    config = EngineConfig(
        base_dir=tmp_path,
        tiny_models_dir=tmp_path / "tiny",
        checkpoint_dir=tmp_path / "none",
        model_catalog_file=str(catalog_file),
    )
    manager = ModelManager(config, plan=CPU_FP32)
    with pytest.raises(ModelUnavailable, match="can't be read") as caught:
        manager.get("gone")
    assert str(tmp_path) not in caught.value.message


def test_shipped_sdxl_configs_give_the_published_weight_shapes():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = MODEL_CONFIGS_DIR / "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes["add_embedding.linear_1.weight"] == (1280, 2816)
    assert shapes["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q.weight" in shapes
    assert "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2.weight" in shapes
    assert tuple(bigg.text_projection.weight.shape) == (1280, 1280)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's UNet
