"""ModelManager: the one place pipelines are loaded, cached, shared and unloaded.

A process-wide, thread-safe singleton. Loads are lazy; two simultaneous first requests
for one model cause one load. At most ``MAX_LOADED_MODELS`` stay loaded, least recently
used evicted first. txt2img and img2img of one model share weights through ``from_pipe``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .catalog import ModelSpec, load_catalog
from .config import EngineConfig, get_config
from .devices import DevicePlan, plan_device, torch_dtype
from .errors import ModelUnavailable, UnknownModel

log = logging.getLogger("backend.manager")

PIPELINE_CLASSES = {
    "sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sd2": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    txt2img: Any
    plan: DevicePlan
    load_seconds: float
    base_scheduler_config: dict[str, Any]
    base_scheduler: Any
    loaded_at: float = field(default_factory=time.time)
    _img2img: Any = None

    @property
    def img2img(self) -> Any:
        if self._img2img is None:
            import diffusers

            cls = getattr(diffusers, PIPELINE_CLASSES[self.spec.family][1])
            # from_pipe reuses the loaded modules: no second copy of the weights.
            self._img2img = cls.from_pipe(self.txt2img)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def _cuda_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "device_count": 0, "total_memory": None}
    if facts["cuda_available"]:
        facts["device_count"] = torch.cuda.device_count()
    facts["sdpa"] = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    facts["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return facts


class ModelManager:
    _instance: ModelManager | None = None
    _instance_lock = threading.Lock()

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or get_config()
        self.catalog: dict[str, ModelSpec] = load_catalog(self.config.model_catalog_file or None)
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._load_locks: dict[str, threading.Lock] = {}
        self._plan: DevicePlan | None = None
        self.load_count: dict[str, int] = {}

    # -- singleton ---------------------------------------------------------------------
    @classmethod
    def instance(cls) -> ModelManager:
        if cls._instance is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    @classmethod
    def reset_instance(cls) -> None:
        with cls._instance_lock:
            if cls._instance is not None:
                cls._instance.unload_all()
            cls._instance = None

    # -- catalogue ---------------------------------------------------------------------
    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self.catalog[model_id]
        except KeyError:
            raise UnknownModel(
                f"model_id {model_id!r} is not in the catalogue; valid ids: {', '.join(sorted(self.catalog))}"
            ) from None

    def available(self) -> list[ModelSpec]:
        return list(self.catalog.values())

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def is_loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._loaded

    # -- device policy -----------------------------------------------------------------
    def device_plan(self) -> DevicePlan:
        if self._plan is None:
            import torch

            facts = _cuda_facts()
            c = self.config
            device_setting = c.device
            total = None
            if facts["cuda_available"]:
                index = int(device_setting.split(":", 1)[1]) if device_setting.startswith("cuda:") else 0
                if index < facts["device_count"]:
                    total = torch.cuda.get_device_properties(index).total_memory
            bf16 = bool(facts["cuda_available"] and torch.cuda.is_bf16_supported())
            try:
                self._plan = plan_device(
                    device_setting=device_setting,
                    dtype_setting=c.dtype,
                    attention_slicing=c.attention_slicing,
                    vae_slicing=c.vae_slicing,
                    vae_tiling=c.vae_tiling,
                    cpu_offload=c.cpu_offload,
                    cuda_available=facts["cuda_available"],
                    device_count=facts["device_count"],
                    total_memory=total,
                    sdpa=facts["sdpa"],
                    bf16_supported=bf16,
                    mps_available=facts["mps_available"],
                )
            except ValueError as exc:
                raise ModelUnavailable(str(exc), code="device_unavailable") from exc
        return self._plan

    # -- loading -----------------------------------------------------------------------
    def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it first if needed (one load even under concurrency)."""
        spec = self.spec(model_id)
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            load_lock = self._load_locks.setdefault(model_id, threading.Lock())
        with load_lock:
            with self._lock:
                if model_id in self._loaded:
                    self._loaded.move_to_end(model_id)
                    return self._loaded[model_id]
                # Make room before loading, so two models never sit in memory at the peak.
                while len(self._loaded) >= self.config.max_loaded_models:
                    victim, _ = self._loaded.popitem(last=False)
                    log.info("evicting model %s (MAX_LOADED_MODELS=%d)", victim, self.config.max_loaded_models)
                    self._free_memory()
            loaded = self._load(spec)
            with self._lock:
                self._loaded[model_id] = loaded
                self.load_count[model_id] = self.load_count.get(model_id, 0) + 1
            return loaded

    def _source(self, spec: ModelSpec) -> str:
        if spec.source == "builtin":
            from .tiny import ensure_tiny_model

            return str(ensure_tiny_model(spec.id, self.config.tiny_models_dir))
        if spec.source == "local":
            return str(spec.path)
        return str(spec.repo)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        import diffusers

        plan = self.device_plan()
        dtype = torch_dtype(plan.dtype)
        cls = getattr(diffusers, PIPELINE_CLASSES[spec.family][0])
        started = time.perf_counter()
        source = self._source(spec)
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if spec.source == "hub":
            kwargs["token"] = self.config.hf_token or None
            kwargs["revision"] = spec.revision
            if self.config.local_files_only:
                kwargs["local_files_only"] = True
        if spec.family in ("sd15", "sd2") and not self.config.enable_safety_checker:
            kwargs["safety_checker"] = None
            kwargs["requires_safety_checker"] = False
        log.info("loading model %s from %s on %s (%s)", spec.id, spec.location, plan.device, plan.dtype)
        pipe = self._from_pretrained(cls, source, spec, kwargs, half=plan.dtype != "fp32")
        self._apply_family_fixes(pipe, spec, plan)
        self._apply_plan(pipe, plan)
        pipe.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        log.info("loaded model %s in %.2fs", spec.id, seconds)
        return LoadedModel(
            spec=spec,
            txt2img=pipe,
            plan=plan,
            load_seconds=seconds,
            base_scheduler_config=dict(pipe.scheduler.config),
            base_scheduler=pipe.scheduler,
        )

    def _from_pretrained(self, cls: Any, source: str, spec: ModelSpec, kwargs: dict[str, Any], *, half: bool) -> Any:
        from huggingface_hub.errors import HfHubHTTPError

        attempts: list[dict[str, Any]] = []
        if half and spec.variant:
            attempts.append({**kwargs, "variant": spec.variant})
        attempts.append(kwargs)
        last: Exception | None = None
        for attempt in attempts:
            try:
                return cls.from_pretrained(source, **attempt)
            except (OSError, ValueError, HfHubHTTPError) as exc:
                last = exc
                if "variant" in attempt:
                    log.info("model %s: no %s variant (%s); loading the default weights", spec.id, spec.variant, type(exc).__name__)
                    continue
        assert last is not None
        raise self._unavailable(spec, last) from last

    def _unavailable(self, spec: ModelSpec, exc: Exception) -> ModelUnavailable:
        text = str(exc)
        if spec.source == "hub":
            lowered = text.lower()
            if "401" in text or "403" in text or "gated" in lowered or "unauthorized" in lowered:
                return ModelUnavailable(
                    f"model {spec.id!r} ({spec.repo}) needs access rights: set HF_TOKEN to a token that can read it",
                    code="model_access_denied",
                )
            return ModelUnavailable(
                f"model {spec.id!r} ({spec.repo}) is not in the local cache and the hub can't be reached, "
                f"so it isn't available offline; download it once with network access "
                f"(manage.py preload_models --models {spec.id}) or point the catalogue at a local folder",
                code="model_unavailable",
            )
        return ModelUnavailable(f"model {spec.id!r} could not be loaded from its {spec.source} files ({type(exc).__name__}); the server log has the details")

    @staticmethod
    def _apply_family_fixes(pipe: Any, spec: ModelSpec, plan: DevicePlan) -> None:
        if spec.prediction_type and pipe.scheduler.config.get("prediction_type") != spec.prediction_type:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=spec.prediction_type)
        if plan.dtype == "fp16" and spec.family == "sdxl":
            # The SDXL VAE overflows in fp16 (NaNs -> black images); the pipeline decodes in
            # fp32 when force_upcast is set.
            pipe.vae.register_to_config(force_upcast=True)
        if plan.dtype == "fp16" and spec.family == "sd2" and hasattr(pipe.unet, "config"):
            # SD 2.x attention overflows in fp16 without upcasting (black images).
            if not pipe.unet.config.get("upcast_attention", False):
                log.warning("model %s is SD2 in fp16 without upcast_attention; consider TORCH_DTYPE=bf16", spec.id)

    @staticmethod
    def _apply_plan(pipe: Any, plan: DevicePlan) -> None:
        if plan.cpu_offload == "model":
            pipe.enable_model_cpu_offload(device=plan.device)
        elif plan.cpu_offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=plan.device)
        else:
            pipe.to(plan.device)
        if plan.attention_slicing:
            pipe.enable_attention_slicing()
        if plan.vae_slicing:
            pipe.vae.enable_slicing()
        if plan.vae_tiling:
            pipe.vae.enable_tiling()

    # -- unloading ---------------------------------------------------------------------
    def unload(self, model_id: str) -> bool:
        with self._lock:
            model = self._loaded.pop(model_id, None)
        if model is None:
            return False
        del model
        self._free_memory()
        return True

    def unload_all(self) -> None:
        with self._lock:
            self._loaded.clear()
        self._free_memory()

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def get_manager() -> ModelManager:
    return ModelManager.instance()
