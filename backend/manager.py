"""ModelManager: the one place pipelines are loaded, cached, shared and unloaded.

A process-wide, thread-safe singleton. Loads are lazy and happen one at a time, so two
simultaneous first requests for one model cause one load, and two different models never
load side by side (the memory peak of a load is the largest there is). At most
``MAX_LOADED_MODELS`` stay loaded, least recently used evicted first. txt2img and img2img
of one model share their weights through ``from_pipe``.

Single-file checkpoints (``*.safetensors`` in ``CHECKPOINT_DIR``) are listed as they come:
a file dropped into the folder is a model at the next look at the catalogue, no restart.

Hub models download into the standard Hugging Face cache (``HF_HOME``) on first use. When
the hub can't be reached, a model already in the cache loads from it; one that isn't gives
``ModelUnavailable`` saying the model isn't available offline.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import fastpath
from .catalog import FAMILY_PIPELINES, CatalogError, ModelSpec, load_catalog
from .config import EngineConfig, get_config
from .devices import DevicePlan, plan_device, torch_dtype
from .errors import ModelUnavailable, UnknownModel
from .single_file import CheckpointError, detect_checkpoint, family_config_dir, folder_signature

log = logging.getLogger("backend.manager")

# Kept for callers that looked the classes up here.
PIPELINE_CLASSES = FAMILY_PIPELINES

# Told of every load and unload as fn(event, model_id, seconds, loaded): event "loaded" (seconds:
# how long it took) or "unloaded" (seconds: None); loaded: how many models are loaded now. The
# web app's metrics listen here; a listener must be quick, and one that raises is skipped.
MODEL_LISTENERS: list[Callable[[str, str, float | None, int], None]] = []


class _NoEmptyFp32Warning(logging.Filter):
    # from_pipe casts the new pipeline to the dtype it already has; diffusers then warns about
    # "modules that should be kept in float32: []", an empty list: nothing to warn about.
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())


class LoadedModel:
    """A loaded model: its txt2img pipeline, the img2img one made from it on first use."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        pipe: Any,
        plan: DevicePlan,
        load_seconds: float,
        variant: str | None = None,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.load_seconds = load_seconds
        self.variant = variant  # the weight variant actually loaded ("fp16"), or None
        self.compiled = "off"  # the torch.compile mode in force (plan.compile, or off if it failed)
        self.compile_warmup_s: float | None = None
        self.base_scheduler_config: dict[str, Any] = dict(pipe.scheduler.config)
        self.base_scheduler = pipe.scheduler
        self.loaded_at = time.time()
        self.last_used = self.loaded_at
        self._txt2img = pipe
        self._img2img: Any = None
        self._inpaint: Any = None
        # An inpainting checkpoint's UNet also reads the mask and the masked image (9 channels).
        self.is_inpainting = int(getattr(pipe.unet.config, "in_channels", 4)) == 9
        self._lock = threading.Lock()
        self._offload_owner: Any = pipe if plan.cpu_offload != "off" else None

    @property
    def txt2img(self) -> Any:
        return self._offload_to(self._live())

    @property
    def img2img(self) -> Any:
        return self._offload_to(self._derived("_img2img", 1))

    @property
    def inpaint(self) -> Any:
        return self._offload_to(self._derived("_inpaint", 2))

    def _derived(self, attr: str, index: int) -> Any:
        with self._lock:
            txt2img = self._live()
            if getattr(self, attr) is None:
                import diffusers

                cls = getattr(diffusers, FAMILY_PIPELINES[self.spec.family][index])
                # from_pipe reuses the loaded modules: no second copy of the weights. It casts
                # the new pipeline (so the shared modules) to `dtype`, fp32 when not told:
                # pass the model's own dtype or a fp16 model would silently become fp32.
                pipe = cls.from_pipe(txt2img, dtype=torch_dtype(self.plan.dtype))
                pipe.set_progress_bar_config(disable=True)
                setattr(self, attr, pipe)
            return getattr(self, attr)

    def _live(self) -> Any:
        if self._txt2img is None:
            # Only a caller that kept this object across an unload (or an eviction) gets here.
            raise ModelUnavailable(f"model {self.spec.id!r} was unloaded; ask the manager for it again")
        return self._txt2img

    def _offload_to(self, pipe: Any) -> Any:
        # CPU offload hooks sit on the shared modules and belong to one pipeline at a time:
        # hand them to the pipeline about to run, so its call offloads everything afterwards.
        if self.plan.cpu_offload != "off" and self._offload_owner is not pipe:
            with self._lock:
                if self._offload_owner is not pipe:
                    _enable_offload(pipe, self.plan)
                    self._offload_owner = pipe
        return pipe

    def pipelines(self) -> list[Any]:
        return [p for p in (self._txt2img, self._img2img, self._inpaint) if p is not None]

    def info(self) -> dict[str, Any]:
        return {
            "id": self.spec.id,
            "device": self.plan.device,
            "dtype": self.plan.dtype,
            "variant": self.variant,
            "load_seconds": round(self.load_seconds, 3),
            "compile": self.compiled,
            "compile_warmup_s": self.compile_warmup_s,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "img2img_ready": self._img2img is not None,
            "inpaint_ready": self._inpaint is not None,
            "inpainting_checkpoint": self.is_inpainting,
        }

    def release(self) -> None:
        """Drop the pipelines (and offload hooks, which hold references to the modules)."""
        for pipe in self.pipelines():
            if self.plan.cpu_offload != "off":
                try:
                    pipe.remove_all_hooks()
                except Exception:  # noqa: BLE001 - freeing must not fail
                    log.debug("removing offload hooks failed", exc_info=True)
        self._txt2img = None
        self._img2img = None
        self._inpaint = None
        self._offload_owner = None
        self.base_scheduler = None


def _enable_offload(pipe: Any, plan: DevicePlan) -> None:
    if plan.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=plan.device)


def _cuda_facts(device_setting: str) -> dict[str, Any]:
    """What torch says about the machine, for the device policy."""
    import torch

    from .devices import parse_device

    cuda = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "total_memory": None,
        "bf16_supported": False,
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if cuda:
        try:
            kind, index = parse_device(device_setting)
        except ValueError:
            kind, index = "", None
        index = index if kind == "cuda" and index is not None else 0
        if index < facts["device_count"]:
            facts["total_memory"] = torch.cuda.get_device_properties(index).total_memory
            with torch.cuda.device(index):
                facts["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    return facts


def load_attempts(spec: ModelSpec, plan: DevicePlan, config: EngineConfig) -> list[dict[str, Any]]:
    """The ``from_pretrained`` keyword arguments to try, in order.

    The fp16 weight variant (half the download, half the disk) is asked for first when the
    model will run in fp16 and its entry names one; a repository without it falls back to
    the default weights, cast to fp16 on load.
    """
    base: dict[str, Any] = {"dtype": torch_dtype(plan.dtype)}
    if spec.source == "hub":
        base["token"] = config.hf_token or None
        if spec.revision:
            base["revision"] = spec.revision
        if config.local_files_only:
            base["local_files_only"] = True
    if spec.family in ("sd15", "sd2") and not config.enable_safety_checker:
        base["safety_checker"] = None
        base["requires_safety_checker"] = False
    attempts = []
    if spec.variant and plan.dtype == "fp16":
        attempts.append({**base, "variant": spec.variant})
    attempts.append(base)
    return attempts


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it was raised from, and so on (each once)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_unreachable(exc: BaseException) -> bool:
    """Did this fail because the hub can't be reached (rather than answering no)?"""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    for err in _chain(exc):
        if isinstance(err, OfflineModeIsEnabled | httpx.TransportError | ConnectionError | TimeoutError):
            return True
        if isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code >= 500:
            return True
        if type(err).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "RemoteDisconnected"):
            return True
    return False


class ModelManager:
    _instance: ModelManager | None = None
    _instance_lock = threading.Lock()

    def __init__(self, config: EngineConfig | None = None, *, plan: DevicePlan | None = None) -> None:
        self.config = config or get_config()
        self._checkpoint_dir = self.config.base_dir / self.config.checkpoint_dir
        self._checkpoint_signature = folder_signature(self._checkpoint_dir)
        self.catalog: dict[str, ModelSpec] = load_catalog(self.config.model_catalog_file or None, self._checkpoint_dir)
        self._catalog_lock = threading.Lock()  # one rescan at a time
        self._lock = threading.Lock()  # guards _loaded and load_count
        self._load_lock = threading.Lock()  # one load at a time
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._plan: DevicePlan | None = plan
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
    def refresh_catalog(self) -> bool:
        """Rescan the checkpoint folder if its files changed; True when the catalogue changed.

        Cheap when nothing changed (a directory walk and a stat per file), so ``spec()`` and
        ``available()`` call it every time. The operator's catalogue file is applied again on
        top. A checkpoint whose file went away stays listed while it is loaded.
        """
        signature = folder_signature(self._checkpoint_dir)
        if signature == self._checkpoint_signature:
            return False
        with self._catalog_lock:
            if signature == self._checkpoint_signature:
                return False
            try:
                catalog = load_catalog(self.config.model_catalog_file or None, self._checkpoint_dir)
            except CatalogError as exc:
                # The file was valid at start-up; an edit since must not take the server down.
                log.warning("checkpoint folder changed, but the catalogue can't be rebuilt (%s); keeping it", exc)
                self._checkpoint_signature = signature
                return False
            with self._lock:
                for model_id, model in self._loaded.items():
                    catalog.setdefault(model_id, model.spec)
            added = sorted(set(catalog) - set(self.catalog))
            removed = sorted(set(self.catalog) - set(catalog))
            self.catalog = catalog
            self._checkpoint_signature = signature
            if added or removed:
                log.info("checkpoint folder changed: added %s, removed %s", added or "none", removed or "none")
            return True

    def spec(self, model_id: str) -> ModelSpec:
        # Only ever a key: an id that isn't in the catalogue is refused, never tried as a path.
        self.refresh_catalog()
        spec = self.catalog.get(model_id) if isinstance(model_id, str) else None
        if spec is None:
            raise UnknownModel(
                f"model_id {model_id!r} is not in the catalogue; valid ids: {', '.join(sorted(self.catalog))}"
            )
        return spec

    def available(self) -> list[ModelSpec]:
        self.refresh_catalog()
        return list(self.catalog.values())

    def loaded_ids(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def loaded_info(self) -> list[dict[str, Any]]:
        with self._lock:
            return [model.info() for model in self._loaded.values()]

    def is_loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._loaded

    # -- device policy -----------------------------------------------------------------
    def device_plan(self) -> DevicePlan:
        if self._plan is None:
            c = self.config
            facts = _cuda_facts(c.device)
            try:
                self._plan = plan_device(
                    device_setting=c.device,
                    dtype_setting=c.dtype,
                    attention_slicing=c.attention_slicing,
                    vae_slicing=c.vae_slicing,
                    vae_tiling=c.vae_tiling,
                    cpu_offload=c.cpu_offload,
                    cuda_available=facts["cuda_available"],
                    device_count=facts["device_count"],
                    total_memory=facts["total_memory"],
                    sdpa=facts["sdpa"],
                    bf16_supported=facts["bf16_supported"],
                    mps_available=facts["mps_available"],
                    channels_last=c.channels_last,
                    fuse_qkv=c.fuse_qkv,
                    compile=c.compile,
                    compile_shapes=c.compile_shapes,
                )
            except ValueError as exc:
                raise ModelUnavailable(str(exc), code="device_unavailable") from exc
            for note in self._plan.notes:
                log.info("device plan: %s", note)
        return self._plan

    def memory_options(self) -> dict[str, object]:
        """The memory and speed options in force (for /api/status/)."""
        return self.device_plan().as_dict()

    # -- loading -----------------------------------------------------------------------
    def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it first if needed (one load even under concurrency)."""
        spec = self.spec(model_id)
        found = self._touch(model_id)
        if found is not None:
            return found
        with self._load_lock:
            # Whoever held the lock before us may have loaded it.
            found = self._touch(model_id)
            if found is not None:
                return found
            # Make room first, so the old and the new model never sit in memory together.
            self._evict(keep=self.config.max_loaded_models - 1)
            loaded = self._load(spec)
            with self._lock:
                self._loaded[model_id] = loaded
                self.load_count[model_id] = self.load_count.get(model_id, 0) + 1
            self._tell("loaded", model_id, loaded.load_seconds)
            return loaded

    load = get

    def _touch(self, model_id: str) -> LoadedModel | None:
        with self._lock:
            model = self._loaded.get(model_id)
            if model is not None:
                self._loaded.move_to_end(model_id)
                model.last_used = time.time()
            return model

    def _evict(self, *, keep: int) -> None:
        victims: list[LoadedModel] = []
        with self._lock:
            while len(self._loaded) > max(keep, 0):
                victim_id, victim = self._loaded.popitem(last=False)
                log.info(
                    "unloading model %s (least recently used; MAX_LOADED_MODELS=%d)",
                    victim_id,
                    self.config.max_loaded_models,
                )
                victims.append(victim)
        if not victims:
            return
        for victim in victims:
            victim.release()
            self._tell("unloaded", victim.spec.id)
        victims.clear()
        self._free_memory()

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
        cls = getattr(diffusers, FAMILY_PIPELINES[spec.family][0])
        started = time.perf_counter()
        log.info("loading model %s from %s on %s (%s)", spec.id, spec.location, plan.device, plan.dtype)
        if spec.source == "single_file":
            pipe, variant = self._from_single_file(cls, spec, plan), None
        else:
            source = self._source(spec)
            pipe, variant = self._from_pretrained(cls, source, spec, load_attempts(spec, plan, self.config))
        try:
            apply_family_fixes(pipe, spec, plan)
            apply_plan(pipe, plan)
            fast = fastpath.apply_fast_path(pipe, plan)
        except Exception as exc:
            del pipe
            self._free_memory()
            raise self._placement_error(spec, plan, exc) from exc
        pipe.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        log.info(
            "loaded model %s in %.2fs (%s weights%s)",
            spec.id,
            seconds,
            variant or "default",
            "".join(f", {change}" for change in fast),
        )
        loaded = LoadedModel(spec=spec, pipe=pipe, plan=plan, load_seconds=seconds, variant=variant)
        if plan.compile != "off":
            self._compile(loaded)
        return loaded

    def _compile(self, model: LoadedModel) -> None:
        """Compile the model's UNet and VAE decoder and warm them up over the shape buckets.

        A model whose compile fails still serves, uncompiled: the log says why.
        """
        spec, plan, c = model.spec, model.plan, self.config
        shapes = plan.compile_shapes or ((spec.default_size, spec.default_size, 1),)
        # An inpainting checkpoint only ever runs through its inpaint pipeline.
        pipe = model.inpaint if model.is_inpainting else model.txt2img
        try:
            report = fastpath.compile_and_warm_up(
                pipe,
                model_id=spec.id,
                plan=plan,
                shapes=shapes,
                cache_dir=c.base_dir / c.compile_cache_dir,
                backend=c.compile_backend,
                compile_new_shapes=c.compile_new_shapes == "compile",
                guidance_scale=spec.default_guidance_scale,
                inpaint=model.is_inpainting,
            )
        except Exception:  # noqa: BLE001 - torch.compile fails in many ways; the model still works eagerly
            log.warning("model %s: COMPILE=%s failed; it runs uncompiled", spec.id, plan.compile, exc_info=True)
            fastpath.uncompile_pipeline(pipe)
            self._free_memory()
            return
        model.compiled = plan.compile
        model.compile_warmup_s = round(report.seconds, 3)
        log.info(
            "model %s: compiled (%s) and warmed up over %s in %.1fs (saved compile cache %s, %d bytes written)",
            spec.id,
            plan.compile,
            ", ".join(f"{w}x{h}x{b}" for w, h, b in report.shapes),
            report.seconds,
            "loaded" if report.cache_loaded else "not found",
            report.cache_saved_bytes,
        )

    def config_cache_dir(self) -> Path:
        """Where the shipped component configs are materialised (beside the tiny models)."""
        return Path(self.config.tiny_models_dir).parent / "model-configs"

    def single_file_kwargs(self, spec: ModelSpec, plan: DevicePlan) -> dict[str, Any]:
        """The ``from_single_file`` keyword arguments of a single-file checkpoint.

        Its architecture comes from ``spec.config`` when the catalogue names a folder, else
        from the family's shipped configs; either way nothing is fetched from the hub.
        """
        path = Path(str(spec.path))
        try:
            info = detect_checkpoint(path)
        except CheckpointError as exc:
            # The reason may name the path: it goes to the log, not to the caller.
            log.warning("model %s: checkpoint %s can't be read: %s", spec.id, path, exc)
            raise ModelUnavailable(f"model {spec.id!r}: its checkpoint file can't be read") from exc
        if info is None:
            raise ModelUnavailable(f"model {spec.id!r}: its file is not a Stable Diffusion checkpoint")
        if spec.family in ("sd15", "sd2") and self.config.enable_safety_checker:
            # A checkpoint file never carries the safety checker; running without it while the
            # operator asked for it would be a silent policy change.
            raise ModelUnavailable(
                f"model {spec.id!r} is a single-file checkpoint, which has no safety checker, and "
                "ENABLE_SAFETY_CHECKER is on; turn it off to use checkpoints",
                code="model_unavailable",
            )
        config = spec.config or str(
            family_config_dir(spec.family, self.config_cache_dir(), in_channels=info.in_channels)
        )
        kwargs: dict[str, Any] = {"config": config, "local_files_only": True, "dtype": torch_dtype(plan.dtype)}
        if spec.family in ("sd15", "sd2"):
            kwargs["safety_checker"] = None
            kwargs["requires_safety_checker"] = False
        return kwargs

    def _from_single_file(self, cls: Any, spec: ModelSpec, plan: DevicePlan) -> Any:
        kwargs = self.single_file_kwargs(spec, plan)
        try:
            return cls.from_single_file(str(spec.path), **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes ModelUnavailable
            error, _ = self._unavailable(spec, exc)
            log.warning("model %s could not be loaded from its checkpoint file", spec.id, exc_info=exc)
            raise error from exc

    def _from_pretrained(
        self, cls: Any, source: str, spec: ModelSpec, attempts: list[dict[str, Any]]
    ) -> tuple[Any, str | None]:
        offline = False  # set once the hub proved unreachable: the cache is all there is
        last: Exception | None = None
        for attempt in attempts:
            if offline:
                attempt = {**attempt, "local_files_only": True}
            try:
                return cls.from_pretrained(source, **attempt), attempt.get("variant")
            except Exception as exc:  # noqa: BLE001 - every failure becomes ModelUnavailable below
                last = exc
                if spec.source == "hub" and not attempt.get("local_files_only") and _is_unreachable(exc):
                    # diffusers falls back on the cache for most network failures; not for all
                    # (timeouts, dropped connections). Try the cache ourselves.
                    log.warning(
                        "model %s: the hub can't be reached (%s); trying the local cache", spec.id, type(exc).__name__
                    )
                    offline = True
                    try:
                        return cls.from_pretrained(source, **{**attempt, "local_files_only": True}), attempt.get(
                            "variant"
                        )
                    except Exception as cached_exc:  # noqa: BLE001
                        last = cached_exc
                if "variant" in attempt:
                    log.info(
                        "model %s: no %s weights (%s); loading the default weights",
                        spec.id,
                        attempt["variant"],
                        type(last).__name__,
                    )
        assert last is not None
        error, explained = self._unavailable(spec, last, offline=offline)
        if explained:
            log.warning("%s", error.message)
        else:
            log.warning("model %s could not be loaded", spec.id, exc_info=last)
        raise error from last

    def _unavailable(self, spec: ModelSpec, exc: Exception, *, offline: bool = False) -> tuple[ModelUnavailable, bool]:
        """A message for a person (what went wrong, what to do; never a path or a secret), and
        whether it says all there is to say (else the log gets the traceback)."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        chain = _chain(exc)
        if spec.source != "hub":
            what = {"local": "its local folder", "single_file": "its checkpoint file"}.get(
                spec.source, "the files built for it"
            )
            message = f"model {spec.id!r} could not be loaded from {what} ({type(exc).__name__}); the server log has the details"
            return ModelUnavailable(message), False
        status = next(
            (e.response.status_code for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None
        )
        if any(isinstance(e, GatedRepoError) for e in chain) or status in (401, 403):
            message = (
                f"model {spec.id!r} ({spec.repo}) needs access rights on the hub: accept its licence there and set "
                "HF_TOKEN to a token that can read it"
            )
            return ModelUnavailable(message, code="model_access_denied"), True
        if any(isinstance(e, RevisionNotFoundError) for e in chain):
            message = f"model {spec.id!r}: the hub repository {spec.repo} has no revision {spec.revision!r}; fix the catalogue entry"
            return ModelUnavailable(message, code="model_not_found"), True
        if any(isinstance(e, RepositoryNotFoundError) for e in chain):
            message = (
                f"model {spec.id!r}: the hub has no repository {spec.repo} (or it is private and HF_TOKEN can't read it); "
                "fix the catalogue entry"
            )
            return ModelUnavailable(message, code="model_not_found"), True
        offline = (
            offline
            or self.config.local_files_only
            or _is_unreachable(exc)
            or any(isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled) for e in chain)
        )
        if offline:
            why = "HF_HUB_OFFLINE=1 is set" if self.config.local_files_only else "the hub can't be reached"
            message = (
                f"model {spec.id!r} ({spec.repo}) isn't available offline: it is not in the local model cache and {why}; "
                f"download it once with network access (manage.py preload_models --models {spec.id}) "
                "or point its catalogue entry at a local folder"
            )
            return ModelUnavailable(message, code="model_unavailable"), True
        message = f"model {spec.id!r} ({spec.repo}) could not be loaded ({type(exc).__name__}); the server log has the details"
        return ModelUnavailable(message, code="model_unavailable"), False

    @staticmethod
    def _placement_error(spec: ModelSpec, plan: DevicePlan, exc: Exception) -> ModelUnavailable:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return ModelUnavailable(
                f"model {spec.id!r} does not fit in the memory of {plan.device} in {plan.dtype}; unload other models "
                "(MAX_LOADED_MODELS=1) or set CPU_OFFLOAD=model",
                code="out_of_memory",
            )
        return ModelUnavailable(
            f"model {spec.id!r} could not be placed on {plan.device} ({type(exc).__name__}); the server log has the details",
            code="device_unavailable",
        )

    # -- unloading ---------------------------------------------------------------------
    def unload(self, model_id: str) -> bool:
        with self._lock:
            model = self._loaded.pop(model_id, None)
        if model is None:
            return False
        model.release()
        del model
        self._free_memory()
        log.info("unloaded model %s", model_id)
        self._tell("unloaded", model_id)
        return True

    def unload_all(self) -> None:
        with self._lock:
            models = list(self._loaded.values())
            self._loaded.clear()
        for model in models:
            model.release()
            self._tell("unloaded", model.spec.id)
        del models
        self._free_memory()

    def _tell(self, event: str, model_id: str, seconds: float | None = None) -> None:
        with self._lock:
            loaded = len(self._loaded)
        for listener in list(MODEL_LISTENERS):
            try:
                listener(event, model_id, seconds, loaded)
            except Exception:  # noqa: BLE001 - a listener never breaks a load
                log.warning("a model listener failed on %s %s", event, model_id, exc_info=True)

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.ipc_collect()
        except ImportError:  # pragma: no cover
            pass


def apply_family_fixes(pipe: Any, spec: ModelSpec, plan: DevicePlan) -> list[str]:
    """Per-family settings that keep images right; returns what was changed, for the log."""
    changed: list[str] = []
    if spec.prediction_type and pipe.scheduler.config.get("prediction_type") != spec.prediction_type:
        # SD 2.x 768 predicts v; an epsilon scheduler on it gives washed-out or black images.
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=spec.prediction_type)
        changed.append(f"scheduler prediction_type={spec.prediction_type}")
    if plan.dtype == "fp16" and spec.family == "sdxl" and not pipe.vae.config.get("force_upcast", False):
        # The SDXL VAE overflows in fp16 (NaNs -> black images); with force_upcast the
        # pipeline decodes in fp32.
        pipe.vae.register_to_config(force_upcast=True)
        changed.append("vae force_upcast")
    if plan.dtype == "fp16" and spec.family == "sd2" and not pipe.unet.config.get("upcast_attention", False):
        # SD 2.x attention scores overflow in fp16 (black images). PyTorch's SDPA kernels
        # accumulate in fp32 anyway; the classic and sliced processors need the flag.
        for module in pipe.unet.modules():
            if hasattr(module, "upcast_attention") and hasattr(module, "upcast_softmax"):
                module.upcast_attention = True
                module.upcast_softmax = True
        changed.append("unet upcast_attention")
    if changed:
        log.info("model %s: %s", spec.id, ", ".join(changed))
    return changed


def apply_plan(pipe: Any, plan: DevicePlan) -> None:
    """Place the pipeline and switch on the memory options of ``plan``."""
    if plan.cpu_offload != "off":
        # Offload places the modules itself; moving the whole pipeline first would defeat it.
        _enable_offload(pipe, plan)
    else:
        pipe.to(plan.device)
    if plan.attention_slicing:
        pipe.enable_attention_slicing()
    # diffusers 0.42 removed pipe.enable_vae_slicing()/enable_vae_tiling(): ask the VAE.
    if plan.vae_slicing:
        pipe.vae.enable_slicing()
    if plan.vae_tiling:
        pipe.vae.enable_tiling()


def get_manager() -> ModelManager:
    return ModelManager.instance()
