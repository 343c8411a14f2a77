"""ModelManager on real tiny pipelines: one load under concurrency, LRU, unload, shared weights.

Each test builds its own manager (not the process singleton the API tests use), pointed at
the tiny models the session-scoped pytest fixture built once.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from django.conf import settings

from backend.config import EngineConfig
from backend.devices import DevicePlan
from backend.errors import ModelUnavailable, UnknownModel
from backend.manager import ModelManager, apply_family_fixes, apply_plan, load_attempts

CPU_FP32 = DevicePlan(
    device="cpu", dtype="fp32", attention_slicing=False, vae_slicing=False, vae_tiling=False, cpu_offload="off"
)


@pytest.fixture
def make_manager(tiny_model_dirs, tmp_path):  # noqa: ANN001, ANN201
    made: list[ModelManager] = []

    def make(*, entries: list[dict] | None = None, plan: DevicePlan | None = None, **config) -> ModelManager:
        catalog_file = ""
        if entries is not None:
            path = tmp_path / f"catalog-{len(made)}.json"
            path.write_text(json.dumps(entries))
            catalog_file = str(path)
        base = {
            "base_dir": Path(settings.BASE_DIR),
            "tiny_models_dir": settings.ENGINE.tiny_models_dir,
            "max_loaded_models": 4,
        }
        manager = ModelManager(EngineConfig(**(base | {"model_catalog_file": catalog_file} | config)), plan=plan)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.unload_all()


def local_copy_of(tiny_model_dirs, model_id: str, new_id: str, **fields) -> dict:  # noqa: ANN001
    """A catalogue entry that loads a tiny model's folder as a local model."""
    family = "sdxl" if model_id == "tiny-sdxl" else "sd15"
    return {"id": new_id, "family": family, "default_size": 64, "path": str(tiny_model_dirs[model_id]), **fields}


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


# -- loading -----------------------------------------------------------------------------------
def test_loads_lazily_and_lists_loaded_and_available(make_manager):
    manager = make_manager()
    assert manager.loaded_ids() == []
    assert {
        "stable-diffusion-v1-5",
        "stable-diffusion-2-1",
        "dreamshaper-8",
        "sdxl-base-1.0",
        "openjourney-v4",
        "tiny-sd",
    } <= {s.id for s in manager.available()}
    model = manager.get("tiny-sd")
    assert manager.loaded_ids() == ["tiny-sd"]
    assert manager.is_loaded("tiny-sd") and not manager.is_loaded("tiny-sdxl")
    assert type(model.txt2img).__name__ == "StableDiffusionPipeline"
    assert model.txt2img.unet.dtype == torch.float32 and model.txt2img.device.type == "cpu"
    assert model.variant is None  # fp32 on the CPU: the default weights
    (info,) = manager.loaded_info()
    assert info["id"] == "tiny-sd" and info["device"] == "cpu" and info["dtype"] == "fp32" and info["load_seconds"] > 0
    assert manager.get("tiny-sd") is model
    assert manager.load_count == {"tiny-sd": 1}


def test_two_simultaneous_first_requests_cause_one_load(make_manager):
    manager = make_manager()
    start = threading.Barrier(4)
    got: list = [None] * 4

    def request(i: int) -> None:
        start.wait()
        got[i] = manager.get("tiny-sd")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(m is got[0] for m in got) and got[0] is not None
    assert manager.load_count == {"tiny-sd": 1}


def test_loads_never_overlap_and_the_limit_holds_under_concurrency(make_manager, tiny_model_dirs):
    class Counting(ModelManager):
        running = 0
        peak = 0
        lock = threading.Lock()

        def _load(self, spec):  # noqa: ANN001, ANN202
            with self.lock:
                Counting.running += 1
                Counting.peak = max(Counting.peak, Counting.running)
            try:
                time.sleep(0.05)  # widen the window a second load would need
                return super()._load(spec)
            finally:
                with self.lock:
                    Counting.running -= 1

    manager = make_manager(max_loaded_models=1)
    manager.__class__ = Counting
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def request(model_id: str) -> None:
        start.wait()
        try:
            manager.get(model_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(m,)) for m in ("tiny-sd", "tiny-sdxl")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert Counting.peak == 1
    assert len(manager.loaded_ids()) == 1
    assert manager.load_count == {"tiny-sd": 1, "tiny-sdxl": 1}


# -- unloading and eviction ---------------------------------------------------------------------
def test_unload_really_frees_the_pipeline(make_manager):
    manager = make_manager()
    model = manager.get("tiny-sd")
    img2img = model.img2img
    refs = [
        weakref.ref(x)
        for x in (model.txt2img, img2img, model.txt2img.unet, model.txt2img.vae, model.txt2img.text_encoder)
    ]
    del model, img2img
    assert manager.unload("tiny-sd") is True
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)
    assert manager.loaded_ids() == []
    assert manager.unload("tiny-sd") is False


def test_unload_empties_the_cuda_cache(make_manager, monkeypatch):
    # No GPU here: stand in for the two CUDA calls to see that unloading makes them.
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: calls.append("ipc_collect"))
    manager = make_manager(plan=CPU_FP32)
    manager.get("tiny-sd")
    calls.clear()
    manager.unload("tiny-sd")
    assert calls == ["empty_cache", "ipc_collect"]


def test_least_recently_used_is_evicted_at_max_loaded_models(make_manager, tiny_model_dirs):
    manager = make_manager(max_loaded_models=2, entries=[local_copy_of(tiny_model_dirs, "tiny-sd", "third")])
    first = manager.get("tiny-sd")
    ref = weakref.ref(manager.get("tiny-sdxl").txt2img)
    assert manager.loaded_ids() == ["tiny-sd", "tiny-sdxl"]
    manager.get("tiny-sd")  # now tiny-sdxl is the least recently used
    assert manager.loaded_ids() == ["tiny-sdxl", "tiny-sd"]
    manager.get("third")
    assert manager.loaded_ids() == ["tiny-sd", "third"]
    gc.collect()
    assert ref() is None  # the evicted pipeline is gone, not just forgotten
    assert manager.get("tiny-sd") is first  # kept, and now the most recently used
    manager.get("tiny-sdxl")  # comes back with a fresh load, evicting third
    assert manager.loaded_ids() == ["tiny-sd", "tiny-sdxl"]
    assert manager.load_count == {"tiny-sd": 1, "tiny-sdxl": 2, "third": 1}


def test_max_loaded_models_one_keeps_exactly_one(make_manager):
    manager = make_manager(max_loaded_models=1)
    manager.get("tiny-sd")
    manager.get("tiny-sdxl")
    assert manager.loaded_ids() == ["tiny-sdxl"]


# -- txt2img and img2img share weights ------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_img2img_shares_the_weights_and_adds_under_5_percent_of_memory(make_manager, model_id):
    manager = make_manager()
    model = manager.get(model_id)
    txt2img = model.txt2img
    modules = [m for m in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(txt2img, m, None) is not None]
    weight_bytes = sum(p.numel() * p.element_size() for m in modules for p in getattr(txt2img, m).parameters())
    import diffusers

    diffusers.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline  # noqa: B018 - import the classes first

    before = rss()
    img2img = model.img2img
    grown = rss() - before

    for name in modules:
        assert getattr(img2img, name) is getattr(txt2img, name), name
    assert type(img2img).__name__.endswith("Img2ImgPipeline")
    assert grown < 0.05 * before, f"img2img added {grown / 2**20:.1f} MiB to {before / 2**20:.0f} MiB"
    # The tiny weights are themselves under 5% of the process, and RSS can hide a copy in memory
    # freed earlier: so also check that every weight tensor of img2img is one of txt2img's.
    shared = {p.data_ptr() for m in modules for p in getattr(txt2img, m).parameters()}
    assert all(p.data_ptr() in shared for m in modules for p in getattr(img2img, m).parameters())
    assert grown < weight_bytes, f"img2img added {grown} bytes; the weights are {weight_bytes}"
    assert model.img2img is img2img  # made once


def test_img2img_keeps_a_half_precision_model_in_half_precision(make_manager):
    # fp16 is what CUDA gets; there is no CUDA here, so the plan a GPU would get is given on the
    # CPU (loading and from_pipe don't care where the weights live).
    manager = make_manager(plan=replace(CPU_FP32, dtype="fp16"))
    model = manager.get("tiny-sd")
    assert model.txt2img.unet.dtype == torch.float16
    img2img = model.img2img
    # from_pipe casts to fp32 unless told the dtype; the shared unet must not be converted.
    assert img2img.unet is model.txt2img.unet
    assert model.txt2img.unet.dtype == torch.float16 and model.txt2img.vae.dtype == torch.float16


# -- what from_pretrained is asked for --------------------------------------------------------------
def hub_spec(**fields):  # noqa: ANN201
    from backend.catalog import DEFAULT_CATALOG

    spec = next(s for s in DEFAULT_CATALOG if s.id == "stable-diffusion-v1-5")
    return replace(spec, **fields)


def test_the_fp16_variant_is_asked_for_only_when_running_fp16():
    config = EngineConfig(base_dir=Path("."), hf_token="hf_abc")
    fp16 = replace(CPU_FP32, device="cuda:0", dtype="fp16")
    first, fallback = load_attempts(hub_spec(), fp16, config)
    assert first["variant"] == "fp16" and first["dtype"] == torch.float16
    assert "variant" not in fallback and fallback["dtype"] == torch.float16
    for plan in (CPU_FP32, replace(fp16, dtype="bf16")):
        (only,) = load_attempts(hub_spec(), plan, config)
        assert "variant" not in only
    # A model whose repository has no variant is never asked for one.
    (only,) = load_attempts(hub_spec(variant=None), fp16, config)
    assert "variant" not in only


def test_hub_loads_pass_the_token_revision_and_offline_flag():
    config = EngineConfig(base_dir=Path("."), hf_token="hf_abc", local_files_only=True)
    (kwargs,) = load_attempts(hub_spec(revision="v1"), CPU_FP32, config)
    assert kwargs["token"] == "hf_abc" and kwargs["revision"] == "v1" and kwargs["local_files_only"] is True
    assert kwargs["safety_checker"] is None and kwargs["requires_safety_checker"] is False
    (kwargs,) = load_attempts(hub_spec(), CPU_FP32, EngineConfig(base_dir=Path(".")))
    assert kwargs["token"] is None and "revision" not in kwargs and "local_files_only" not in kwargs
    (kwargs,) = load_attempts(hub_spec(), CPU_FP32, EngineConfig(base_dir=Path("."), enable_safety_checker=True))
    assert "safety_checker" not in kwargs
    # Local and built-in models have no hub, so no token goes anywhere.
    (kwargs,) = load_attempts(hub_spec(source="local", repo=None, path="/models/x"), CPU_FP32, config)
    assert "token" not in kwargs and "local_files_only" not in kwargs


# -- model ids are keys, never paths -----------------------------------------------------------------
@pytest.mark.parametrize(
    "model_id", ["../tiny-sd", "/etc", "stabilityai/sdxl-turbo", "TINY-SD", "", "tiny-sd/../tiny-sd", None]
)
def test_a_model_id_is_only_looked_up(make_manager, tiny_model_dirs, model_id):
    manager = make_manager()
    with pytest.raises(UnknownModel, match="not in the catalogue"):
        manager.get(model_id)
    # Not even an existing diffusers folder is accepted as an id.
    with pytest.raises(UnknownModel):
        manager.get(str(tiny_model_dirs["tiny-sd"]))
    assert manager.load_count == {}


def test_a_local_folder_entry_loads_and_a_broken_one_is_unavailable_without_its_path(
    make_manager, tiny_model_dirs, tmp_path
):
    missing = tmp_path / "not-there"
    manager = make_manager(
        entries=[
            local_copy_of(tiny_model_dirs, "tiny-sd", "mine", name="My model"),
            {"id": "gone", "family": "sd15", "default_size": 512, "path": str(missing)},
        ]
    )
    assert type(manager.get("mine").txt2img).__name__ == "StableDiffusionPipeline"
    with pytest.raises(ModelUnavailable) as info:
        manager.get("gone")
    assert info.value.code == "model_unavailable"
    assert "'gone'" in str(info.value) and "local folder" in str(info.value)
    assert str(missing) not in str(info.value)


# -- family pitfalls and memory options ---------------------------------------------------------------
def test_sd2_v_prediction_is_enforced(make_manager, tiny_model_dirs):
    entry = local_copy_of(tiny_model_dirs, "tiny-sd", "tiny-v", family="sd2", prediction_type="v_prediction")
    manager = make_manager(entries=[entry])
    model = manager.get("tiny-v")
    assert model.txt2img.scheduler.config.prediction_type == "v_prediction"
    # The scheduler a request picks is built from the model's config, so it keeps v-prediction.
    assert model.base_scheduler_config["prediction_type"] == "v_prediction"


def test_sdxl_vae_is_upcast_in_fp16_and_sd2_attention_upcast(make_manager):
    pipe = make_manager().get("tiny-sdxl").txt2img
    pipe.vae.register_to_config(force_upcast=False)
    fp16 = replace(CPU_FP32, device="cuda:0", dtype="fp16")
    sdxl = hub_spec(id="x", family="sdxl")
    assert apply_family_fixes(pipe, sdxl, CPU_FP32) == []  # fp32 needs nothing
    assert apply_family_fixes(pipe, sdxl, fp16) == ["vae force_upcast"]
    assert pipe.vae.config.force_upcast is True

    sd_pipe = make_manager().get("tiny-sd").txt2img
    assert apply_family_fixes(sd_pipe, hub_spec(id="y", family="sd2"), fp16) == ["unet upcast_attention"]
    attention = [m for m in sd_pipe.unet.modules() if hasattr(m, "upcast_softmax")]
    assert attention and all(m.upcast_attention and m.upcast_softmax for m in attention)


def test_memory_options_are_applied_and_generation_still_works(make_manager):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    pipe = make_manager().get("tiny-sd").txt2img
    # diffusers 0.42 dropped the pipeline-level VAE switches; they live on the VAE.
    assert not hasattr(pipe, "enable_vae_slicing") and hasattr(pipe.vae, "enable_slicing")
    plan = replace(CPU_FP32, attention_slicing=True, vae_slicing=True, vae_tiling=True)
    apply_plan(pipe, plan)
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    out = pipe(
        "a cat",
        num_inference_steps=2,
        width=64,
        height=64,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]


def test_model_cpu_offload_hands_its_hooks_to_the_pipeline_that_runs(make_manager):
    # Offloading to a GPU can't happen here; enable_model_cpu_offload(device="cpu") runs the
    # same hook code with the CPU standing in for the GPU.
    manager = make_manager(plan=replace(CPU_FP32, cpu_offload="model"))
    model = manager.get("tiny-sd")
    txt2img = model.txt2img
    assert txt2img._all_hooks and model._offload_owner is txt2img
    img2img = model.img2img
    assert model._offload_owner is img2img and img2img._all_hooks
    image = txt2img("a", num_inference_steps=2, width=64, height=64).images[0]
    out = model.img2img("b", image=image, num_inference_steps=2, strength=0.5).images[0]
    assert out.size == (64, 64)
    assert model.txt2img is txt2img and model._offload_owner is txt2img
    ref = weakref.ref(txt2img.unet)
    del txt2img, img2img, model
    manager.unload("tiny-sd")
    gc.collect()
    assert ref() is None  # the offload hooks don't keep the weights alive


def test_a_model_kept_across_an_unload_says_so(make_manager):
    manager = make_manager()
    model = manager.get("tiny-sd")
    manager.unload("tiny-sd")
    with pytest.raises(ModelUnavailable, match="was unloaded"):
        model.txt2img  # noqa: B018
    # Asking again loads it again: a new model, a second load, and a pipeline that runs.
    again = manager.get("tiny-sd")
    assert again is not model and manager.load_count == {"tiny-sd": 2}
    assert manager.loaded_ids() == ["tiny-sd"]
    assert again.txt2img("a", num_inference_steps=1, width=64, height=64).images[0].size == (64, 64)
