"""Device, dtype and memory-option policy: the decisions a GPU machine would take, without one.

Everything here is a pure function of the machine's facts (CUDA present, device count,
memory, SDPA, bf16 support), passed in as arguments, so a CPU-only machine can check what
an H100, a 4 GiB laptop GPU or a two-GPU box would get.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.config import ConfigError, EngineConfig
from backend.devices import (
    SMALL_GPU_BYTES,
    parse_device,
    plan_device,
    resolve_attention_slicing,
    resolve_device,
    resolve_dtype,
)
from backend.errors import ModelUnavailable
from backend.manager import ModelManager

GIB = 1024**3


def plan(**overrides):  # noqa: ANN201
    args = {
        "device_setting": "",
        "dtype_setting": "auto",
        "attention_slicing": "auto",
        "vae_slicing": False,
        "vae_tiling": False,
        "cpu_offload": "off",
        "cuda_available": True,
        "device_count": 1,
        "total_memory": 80 * GIB,
        "sdpa": True,
        "bf16_supported": True,
    }
    return plan_device(**(args | overrides))


# -- device ------------------------------------------------------------------------------------
def test_cuda_when_present_else_cpu():
    assert resolve_device("", cuda_available=True, device_count=2) == "cuda:0"
    assert resolve_device("", cuda_available=False, device_count=0) == "cpu"


@pytest.mark.parametrize(
    ("setting", "expected"), [("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("CUDA:1", "cuda:1")]
)
def test_device_setting_overrides(setting, expected):
    assert resolve_device(setting, cuda_available=True, device_count=2) == expected


def test_device_setting_cpu_wins_even_with_a_gpu():
    assert plan(device_setting="cpu").device == "cpu"
    assert plan(device_setting="cpu").dtype == "fp32"


@pytest.mark.parametrize(
    ("setting", "cuda", "count", "message"),
    [
        ("cuda:2", True, 2, "only 2 CUDA device"),  # below/at/above: cuda:1 is fine, cuda:2 is not
        ("cuda", False, 0, "CUDA is not available"),
        ("cuda:0", False, 0, "CUDA is not available"),
        ("mps", False, 0, "MPS is not available"),
        ("gpu", True, 1, "DEVICE must be cpu, cuda, cuda:N or mps"),
        ("cuda:x", True, 1, "DEVICE must be"),
        ("cuda:-1", True, 1, "DEVICE must be"),
    ],
)
def test_impossible_device_settings_are_refused_with_the_reason(setting, cuda, count, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(setting, cuda_available=cuda, device_count=count)


def test_parse_device():
    assert parse_device("") == ("", None)
    assert parse_device(" cuda:3 ") == ("cuda", 3)
    assert parse_device("cpu") == ("cpu", None)


# -- dtype ---------------------------------------------------------------------------------------
def test_fp16_on_cuda_fp32_on_cpu():
    assert plan().dtype == "fp16"
    assert plan(cuda_available=False, device_count=0).dtype == "fp32"


def test_bf16_is_an_option_on_gpus_that_have_it():
    assert plan(dtype_setting="bf16").dtype == "bf16"
    with pytest.raises(ValueError, match="does not support bfloat16"):
        plan(dtype_setting="bf16", bf16_supported=False)


def test_fp16_asked_for_on_the_cpu_runs_fp32_and_says_so():
    notes: list[str] = []
    assert resolve_dtype("fp16", device="cpu", notes=notes) == "fp32"
    assert "ignored on the CPU" in notes[0]
    assert resolve_dtype("bf16", device="cpu") == "bf16"
    assert resolve_dtype("fp32", device="cuda:0") == "fp32"


# -- attention slicing ------------------------------------------------------------------------------
def test_attention_slicing_auto_is_off_under_sdpa_on_a_big_gpu():
    assert plan().attention_slicing is False


def test_attention_slicing_auto_turns_on_for_small_gpus_at_the_threshold():
    below, at, above = SMALL_GPU_BYTES - 1, SMALL_GPU_BYTES, SMALL_GPU_BYTES + 1
    assert plan(total_memory=below).attention_slicing is True
    assert plan(total_memory=at).attention_slicing is False
    assert plan(total_memory=above).attention_slicing is False
    assert "attention slicing on" in plan(total_memory=4 * GIB).notes[0]


def test_attention_slicing_auto_turns_on_without_sdpa():
    assert plan(sdpa=False).attention_slicing is True


def test_attention_slicing_on_and_off_are_obeyed_anywhere():
    assert plan(attention_slicing="on").attention_slicing is True
    assert plan(attention_slicing="off", total_memory=2 * GIB, sdpa=False).attention_slicing is False
    assert plan(attention_slicing="on", cuda_available=False, device_count=0).attention_slicing is True
    assert resolve_attention_slicing("auto", device="cpu", total_memory=None, sdpa=False) is False
    with pytest.raises(ValueError, match="ATTENTION_SLICING"):
        resolve_attention_slicing("sometimes", device="cuda:0", total_memory=None, sdpa=True)


# -- VAE and offload --------------------------------------------------------------------------------
def test_vae_options_pass_through():
    p = plan(vae_slicing=True, vae_tiling=True)
    assert (p.vae_slicing, p.vae_tiling) == (True, True)
    assert plan().as_dict()["vae_tiling"] is False


def test_cpu_offload_on_cuda_and_ignored_without_it():
    assert plan(cpu_offload="model").cpu_offload == "model"
    assert plan(cpu_offload="sequential").cpu_offload == "sequential"
    cpu = plan(cpu_offload="model", cuda_available=False, device_count=0)
    assert cpu.cpu_offload == "off"
    assert "CPU_OFFLOAD=model ignored" in cpu.notes[0]
    with pytest.raises(ValueError, match="CPU_OFFLOAD"):
        plan(cpu_offload="always")


def test_the_plan_says_what_is_in_force():
    body = plan(total_memory=4 * GIB, vae_tiling=True, cpu_offload="model").as_dict()
    assert body == {
        "device": "cuda:0",
        "dtype": "fp16",
        "attention_slicing": True,
        "vae_slicing": False,
        "vae_tiling": True,
        "cpu_offload": "model",
        "channels_last": True,
        "fuse_qkv": False,
        "compile": "off",
        "compile_shapes": [],
        "notes": [
            "attention slicing on: the GPU has 4.0 GiB (< 6 GiB)",
            "fused QKV projections off: attention slicing is on, and the fused attention would replace the sliced one",
        ],
    }


def test_the_manager_reads_the_facts_of_this_machine():
    # This machine has no GPU, so the real facts must give the CPU plan.
    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine
        assert ModelManager(EngineConfig(base_dir=Path("."))).device_plan().device == "cuda:0"
        return
    p = ModelManager(EngineConfig(base_dir=Path("."))).device_plan()
    assert (p.device, p.dtype, p.attention_slicing, p.cpu_offload) == ("cpu", "fp32", False, "off")
    # DEVICE=cpu and the memory options reach the plan from the settings.
    config = EngineConfig.from_env(
        {"DEVICE": "cpu", "ATTENTION_SLICING": "on", "VAE_TILING": "true"}, base_dir=Path(".")
    )
    p = ModelManager(config).device_plan()
    assert (p.device, p.attention_slicing, p.vae_tiling) == ("cpu", True, True)


def test_an_impossible_device_setting_makes_the_model_unavailable_not_a_crash():
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("this machine has CUDA")
    manager = ModelManager(EngineConfig(base_dir=Path("."), device="cuda:1"))
    with pytest.raises(ModelUnavailable, match="CUDA is not available") as info:
        manager.device_plan()
    assert info.value.code == "device_unavailable"


def test_a_malformed_device_setting_fails_at_start_up():
    with pytest.raises(ConfigError, match="DEVICE must be cpu, cuda, cuda:N or mps, got 'cuda1'"):
        EngineConfig.from_env({"DEVICE": "cuda1"}, base_dir=Path("."))
