"""The GPU fast path: its settings, the plan's choices, and what each part does on tiny-sd.

The plan's decisions take the machine's facts as arguments (as in test_devices.py), so the
CUDA choices are checked here without a GPU. The parts themselves (channels_last, fused
projections, LoRAs on a fused UNet, torch.compile with warm-up and caches) run on the CPU,
where they must give the same images as the plain pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from django.conf import settings

from backend import fastpath
from backend.config import ConfigError, EngineConfig, parse_compile_shapes
from backend.devices import DevicePlan, plan_device
from backend.loras import AdapterCache, scan_loras
from backend.manager import ModelManager
from tests.fakes.tiny_adapters import make_tiny_lora

GIB = 1024**3
CPU_FP32 = DevicePlan(
    device="cpu", dtype="fp32", attention_slicing=False, vae_slicing=False, vae_tiling=False, cpu_offload="off"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    # Two cores shared with other runs: one torch thread each is fastest for tiny renders.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def config(tmp_path: Path, **env: str) -> EngineConfig:
    return EngineConfig.from_env(env, base_dir=tmp_path)


# -- settings ----------------------------------------------------------------------------------
def test_defaults(tmp_path):
    c = config(tmp_path)
    assert (c.channels_last, c.fuse_qkv, c.compile, c.compile_shapes) == ("auto", "auto", "off", ())
    assert (c.compile_new_shapes, c.compile_backend) == ("eager", "inductor")
    assert c.compile_cache_dir == tmp_path / ".cache/compile"


def test_settings_are_read(tmp_path):
    c = config(
        tmp_path,
        CHANNELS_LAST="off",
        FUSE_QKV="ON",
        COMPILE="max-autotune",
        COMPILE_SHAPES="512x512x1, 512x512x4,768x512,512x512x1",
        COMPILE_NEW_SHAPES="compile",
        COMPILE_BACKEND="aot_eager",
        COMPILE_CACHE_DIR="/var/cache/sd-compile",
    )
    assert (c.channels_last, c.fuse_qkv, c.compile) == ("off", "on", "max-autotune")
    assert c.compile_shapes == ((512, 512, 1), (512, 512, 4), (768, 512, 1))  # duplicates dropped
    assert (c.compile_new_shapes, c.compile_backend) == ("compile", "aot_eager")
    assert c.compile_cache_dir == Path("/var/cache/sd-compile")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHANNELS_LAST", "yes"),
        ("FUSE_QKV", "true"),
        ("COMPILE", "max_autotune"),
        ("COMPILE_NEW_SHAPES", "never"),
        ("COMPILE_BACKEND", "cudagraphs"),
    ],
)
def test_bad_choices_stop_start_up_naming_the_variable(tmp_path, name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be one of"):
        config(tmp_path, **{name: value})


def test_compile_with_cpu_offload_is_refused_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="COMPILE=default can't be combined with CPU_OFFLOAD=model"):
        config(tmp_path, COMPILE="default", CPU_OFFLOAD="model")
    assert config(tmp_path, COMPILE="off", CPU_OFFLOAD="model").cpu_offload == "model"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("64x64x1", ((64, 64, 1),)),  # the smallest size and batch
        ("4096x4096x64", ((4096, 4096, 64),)),  # the largest
        ("1024X768", ((1024, 768, 1),)),  # batch 1 when left out
    ],
)
def test_compile_shapes_within_the_limits(raw, expected):
    assert parse_compile_shapes(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("56x64x1", "width must be a multiple of 8 between 64 and 4096, got 56"),
        ("64x4104x1", "height must be a multiple of 8 between 64 and 4096, got 4104"),
        ("516x512x1", "width must be a multiple of 8 between 64 and 4096, got 516"),
        ("512x512x0", "batch must be between 1 and 64, got 0"),
        ("512x512x65", "batch must be between 1 and 64, got 65"),
        ("512x", "entries must look like 512x512x1"),
        ("512", "entries must look like 512x512x1"),
        ("512x512x1x1", "entries must look like 512x512x1"),
        ("axbxc", "entries must look like 512x512x1"),
    ],
)
def test_compile_shapes_out_of_the_limits_name_the_variable_and_the_value(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=f"^COMPILE_SHAPES.*{message}"):
        config(tmp_path, COMPILE_SHAPES=raw)


# -- the plan's choices --------------------------------------------------------------------------
def test_cuda_gets_channels_last_and_fused_projections_and_no_compile_by_default():
    p = plan()
    assert (p.device, p.channels_last, p.fuse_qkv, p.compile, p.compile_shapes) == ("cuda:0", True, True, "off", ())
    assert p.notes == ()


def test_the_cpu_gets_none_of_it_unless_asked():
    p = plan(cuda_available=False, device_count=0)
    assert (p.device, p.channels_last, p.fuse_qkv, p.compile) == ("cpu", False, False, "off")
    asked = plan(cuda_available=False, device_count=0, channels_last="on", fuse_qkv="on", compile="default")
    assert (asked.channels_last, asked.fuse_qkv, asked.compile) == (True, True, "default")


def test_off_wins_on_cuda():
    p = plan(channels_last="off", fuse_qkv="off")
    assert (p.channels_last, p.fuse_qkv) == (False, False)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"total_memory": 4 * GIB}, "attention slicing is on"),  # auto slicing on a small GPU
        ({"attention_slicing": "on"}, "attention slicing is on"),
        ({"sdpa": False}, "scaled_dot_product_attention"),
        ({"cpu_offload": "sequential"}, "CPU_OFFLOAD=sequential"),
    ],
)
@pytest.mark.parametrize("setting", ["auto", "on"])
def test_fused_projections_give_way_with_a_note(overrides, why, setting):
    p = plan(fuse_qkv=setting, **overrides)
    assert p.fuse_qkv is False
    assert any("fused QKV projections off" in note and why in note for note in p.notes)


def test_fused_projections_stay_with_model_offload():
    # Model offload moves whole modules; the fused layers move with their UNet.
    assert plan(cpu_offload="model").fuse_qkv is True


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_compile_modes_and_their_shapes_are_in_the_plan(mode):
    p = plan(compile=mode, compile_shapes=((512, 512, 1), (512, 512, 4)))
    assert (p.compile, p.compile_shapes) == (mode, ((512, 512, 1), (512, 512, 4)))
    shown = p.as_dict()
    assert shown["compile"] == mode and shown["compile_shapes"] == ["512x512x1", "512x512x4"]
    assert shown["channels_last"] is True and shown["fuse_qkv"] is True
    assert plan(compile="off", compile_shapes=((512, 512, 1),)).compile_shapes == ()


def test_cuda_graph_modes_on_the_cpu_say_they_have_no_graphs():
    p = plan(cuda_available=False, device_count=0, compile="reduce-overhead")
    assert p.compile == "reduce-overhead"
    assert any("without CUDA graphs" in note for note in p.notes)
    assert plan(cuda_available=False, device_count=0, compile="default").notes == ()


def test_compile_with_offload_is_refused_by_the_plan_too():
    with pytest.raises(ValueError, match="can't be combined with CPU_OFFLOAD=model"):
        plan(compile="default", cpu_offload="model")
    # Offload is dropped on the CPU (nothing to offload to), so compiling there is fine.
    assert plan(cuda_available=False, device_count=0, compile="default", cpu_offload="model").compile == "default"


@pytest.mark.parametrize(("name", "value"), [("channels_last", "yes"), ("fuse_qkv", "1"), ("compile", "fast")])
def test_the_plan_refuses_unknown_settings(name, value):
    with pytest.raises(ValueError, match=name.upper()):
        plan(**{name: value})


def test_the_manager_plans_from_its_settings(tmp_path):
    c = replace(
        config(tmp_path, CHANNELS_LAST="on", COMPILE="default", COMPILE_SHAPES="64x64x2"),
        base_dir=Path(settings.BASE_DIR),
        tiny_models_dir=settings.ENGINE.tiny_models_dir,
    )
    p = ModelManager(c).device_plan()
    assert (p.device, p.channels_last, p.fuse_qkv, p.compile, p.compile_shapes) == (
        "cpu",
        True,
        False,
        "default",
        ((64, 64, 2),),
    )


# -- the parts, on tiny-sd -----------------------------------------------------------------------
@pytest.fixture
def sd_pipe(tiny_model_dirs):  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["tiny-sd"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, *, size: int = 64) -> np.ndarray:  # noqa: ANN001
    generators = [torch.Generator().manual_seed(0)]
    with torch.inference_mode():
        return pipe(
            "a red fox in the snow",
            width=size,
            height=size,
            num_inference_steps=2,
            generator=generators,
            output_type="np",
        ).images[0]


def test_fused_projections_give_the_same_image_and_cost_no_weights(sd_pipe):
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    plain = render(sd_pipe)
    storage_before = _storage_bytes(sd_pipe.unet)

    assert fastpath.fuse_qkv(sd_pipe) and fastpath.is_fused(sd_pipe)
    assert fastpath.fuse_qkv(sd_pipe) is False  # once
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in sd_pipe.unet.attn_processors.values())
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in sd_pipe.vae.attn_processors.values())
    attention = next(m for m in sd_pipe.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    assert attention.to_k.weight.untyped_storage().data_ptr() == attention.to_qkv.weight.untyped_storage().data_ptr()
    assert _storage_bytes(sd_pipe.unet) == storage_before  # q, k and v are views of the fused weight
    fused = render(sd_pipe)
    assert np.abs(fused - plain).max() < 1e-3

    fastpath.unfuse_qkv(sd_pipe)
    assert not fastpath.is_fused(sd_pipe) and not hasattr(attention, "to_qkv")
    assert attention.to_k.weight.untyped_storage().data_ptr() != attention.to_q.weight.untyped_storage().data_ptr()
    assert np.abs(render(sd_pipe) - plain).max() < 1e-3


def test_channels_last_gives_the_same_image(sd_pipe):
    plain = render(sd_pipe)
    fastpath.set_channels_last(sd_pipe, True)
    assert sd_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(render(sd_pipe) - plain).max() < 1e-3
    fastpath.set_channels_last(sd_pipe, False)
    assert sd_pipe.unet.conv_in.weight.is_contiguous()


def test_a_lora_runs_on_the_unfused_attention_and_the_fused_one_comes_back(tiny_model_dirs, sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    make_tiny_lora(tiny_model_dirs["tiny-sd"], tmp_path / "fox.safetensors", key_format="diffusers")
    lora = scan_loras(tmp_path)["fox"]
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["tiny-sd"])
    reference.set_progress_bar_config(disable=True)
    ref_cache = AdapterCache(4)
    ref_cache.apply(reference, [(lora, 1.0)])
    unfused_with_lora = render(reference)

    plain = render(sd_pipe)
    fastpath.fuse_qkv(sd_pipe)
    cache = AdapterCache(4)
    cache.apply(sd_pipe, [(lora, 1.0)])
    # What happens without the switch: the fused attention bypasses to_q/to_k/to_v and their LoRA.
    bypassed = render(sd_pipe)
    assert np.abs(bypassed - unfused_with_lora).max() > 1e-2

    fastpath.prepare_for_loras(sd_pipe, active=True)
    assert not fastpath.is_fused(sd_pipe)
    assert np.abs(render(sd_pipe) - unfused_with_lora).max() < 1e-3
    fastpath.prepare_for_loras(sd_pipe, active=True)  # again: nothing changes
    assert not fastpath.is_fused(sd_pipe)

    cache.apply(sd_pipe, [])
    fastpath.prepare_for_loras(sd_pipe, active=False)
    assert fastpath.is_fused(sd_pipe)
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in sd_pipe.unet.attn_processors.values())
    assert np.abs(render(sd_pipe) - plain).max() < 1e-3


def test_prepare_for_loras_leaves_an_unfused_pipeline_alone(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    fastpath.prepare_for_loras(sd_pipe, active=True)
    fastpath.prepare_for_loras(sd_pipe, active=False)
    assert sd_pipe.unet.attn_processors == before


@pytest.fixture
def make_manager(tiny_model_dirs, tmp_path):  # noqa: ANN001, ANN201
    made: list[ModelManager] = []

    def make(plan: DevicePlan, **fields) -> ModelManager:
        base = {
            "base_dir": Path(settings.BASE_DIR),
            "tiny_models_dir": settings.ENGINE.tiny_models_dir,
            "compile_cache_dir": tmp_path / "compile",
        }
        manager = ModelManager(EngineConfig(**(base | fields)), plan=plan)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.unload_all()


def test_the_manager_applies_the_fast_path_and_the_images_stay_the_same(make_manager):
    plain = render(make_manager(CPU_FP32).get("tiny-sd").txt2img)
    model = make_manager(replace(CPU_FP32, channels_last=True, fuse_qkv=True)).get("tiny-sd")
    assert fastpath.is_fused(model.txt2img)
    assert model.txt2img.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fastpath.is_fused(model.img2img)  # from_pipe shares the modules
    assert np.abs(render(model.txt2img) - plain).max() < 1e-3
    info = model.info()
    assert info["compile"] == "off" and info["compile_warmup_s"] is None


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):  # noqa: ANN001, ANN204
        self.graphs += 1
        return gm.forward


def test_compiled_pipeline_warms_up_then_runs_new_shapes_eagerly_instead_of_compiling(sd_pipe):
    import torch._dynamo

    torch._dynamo.reset()
    plain = render(sd_pipe)
    backend = CountingBackend()
    fastpath.compile_pipeline(sd_pipe, "default", backend=backend)
    assert fastpath.is_compiled(sd_pipe)
    fastpath.warm_up(sd_pipe, [(64, 64, 1)], steps=2)
    warmed = backend.graphs
    assert warmed > 0
    assert np.abs(render(sd_pipe) - plain).max() < 1e-3
    assert backend.graphs == warmed  # the warmed shape: no compile
    render(sd_pipe, size=72)  # a shape nobody warmed up runs, uncompiled
    assert backend.graphs == warmed

    fastpath.uncompile_pipeline(sd_pipe)
    assert not fastpath.is_compiled(sd_pipe)
    fastpath.compile_pipeline(sd_pipe, "default", backend=backend, compile_new_shapes=True)
    render(sd_pipe, size=80)
    assert backend.graphs > warmed  # COMPILE_NEW_SHAPES=compile: compiled at the request
    torch._dynamo.reset()


def test_switching_the_attention_for_loras_finds_the_compiled_graphs_again(sd_pipe):
    # The fused and the original processors are the same objects every time, so each state's
    # graph passes its guards again: only the first switch compiles anything.
    import torch._dynamo

    torch._dynamo.reset()
    fastpath.fuse_qkv(sd_pipe)
    backend = CountingBackend()
    fastpath.compile_pipeline(sd_pipe, "default", backend=backend, compile_new_shapes=True)
    fastpath.warm_up(sd_pipe, [(64, 64, 1)], steps=2)
    fused_graphs = backend.graphs
    fastpath.prepare_for_loras(sd_pipe, active=True)
    render(sd_pipe)
    both = backend.graphs
    assert both > fused_graphs  # the original attention: compiled once
    for active in (False, True, False):
        fastpath.prepare_for_loras(sd_pipe, active=active)
        render(sd_pipe)
    assert backend.graphs == both
    torch._dynamo.reset()


def test_a_failing_compile_leaves_the_model_working_uncompiled(make_manager, caplog):
    manager = make_manager(replace(CPU_FP32, compile="default"), compile_backend="no-such-backend")
    with caplog.at_level(logging.WARNING, logger="backend.manager"):
        model = manager.get("tiny-sd")
    assert "COMPILE=default failed; it runs uncompiled" in caplog.text
    assert model.info()["compile"] == "off" and model.compile_warmup_s is None
    assert not fastpath.is_compiled(model.txt2img)
    assert render(model.txt2img).shape == (64, 64, 3)


@pytest.mark.slow
def test_compile_default_on_the_cpu_matches_eager_and_its_cache_is_saved_and_loaded(make_manager, caplog, monkeypatch):
    # Inductor compiles C++ kernels with gcc here: over a minute for tiny-sd's UNet and VAE
    # decoder on a busy 2-core machine, seconds once its on-disk cache is warm. That cache is
    # keyed by the graphs' contents, so keeping it between runs changes nothing but the time.
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.ENGINE.tiny_models_dir).parent / "test-inductor"))
    torch._dynamo.reset()
    plain = render(make_manager(CPU_FP32).get("tiny-sd").txt2img)
    compiled_plan = replace(CPU_FP32, compile="default", compile_shapes=((64, 64, 1),))
    manager = make_manager(compiled_plan)
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        model = manager.get("tiny-sd")
    assert model.info()["compile"] == "default" and model.compile_warmup_s > 0
    assert fastpath.is_compiled(model.txt2img)
    assert "compiled (default) and warmed up over 64x64x1" in caplog.text
    assert "saved compile cache not found" in caplog.text
    artifacts = list((manager.config.compile_cache_dir / "artifacts").glob("tiny-sd-default-*.bin"))
    assert len(artifacts) == 1 and artifacts[0].stat().st_size > 0
    assert np.abs(render(model.txt2img) - plain).max() < 1e-3

    caplog.clear()
    manager.unload_all()
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        again = make_manager(compiled_plan).get("tiny-sd")  # a second load, as after a restart
    assert "saved compile cache loaded" in caplog.text
    assert np.abs(render(again.txt2img) - plain).max() < 1e-3
    torch._dynamo.reset()


def _storage_bytes(module) -> int:  # noqa: ANN001
    seen = {}
    for tensor in module.parameters():
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
