"""Run diffusers pipelines on this machine: txt2img, img2img, batches, seeds, progress, cancel."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from .embeddings import (
    EmbeddingLoader,
    EmbeddingLoadError,
    embedding_incompatibility,
    embeddings_in,
    scan_embeddings,
    text_widths,
)
from .errors import GenerationCancelled, GenerationFailed, InvalidParams, OutOfMemory
from .loras import AdapterCache, LoraLoadError, lora_incompatibility, scan_loras
from .manager import ModelManager, get_manager
from .params import CancelFn, GeneratedImage, GenerationOutput, GenerationParams, PreviewFn, ProgressFn
from .preview import latents_to_rgb
from .prompts import PromptEncoding, PromptSyntaxError, encode
from .provenance import library_versions, model_provenance
from .schedulers import SCHEDULERS, make_scheduler

log = logging.getLogger("backend.local")


class LocalBackend:
    name = "local"

    def __init__(self, manager: ModelManager | None = None) -> None:
        self._manager = manager

    @property
    def manager(self) -> ModelManager:
        return self._manager or get_manager()

    def generate(
        self,
        params: GenerationParams,
        *,
        init_image: Any = None,
        mask_image: Any = None,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
        on_preview: PreviewFn | None = None,
    ) -> GenerationOutput:
        import torch

        if params.kind in ("img2img", "inpaint") and init_image is None:
            raise InvalidParams(f"{params.kind} needs an image")
        if params.kind == "inpaint" and mask_image is None:
            raise InvalidParams("inpaint needs a mask")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model = self.manager.get(params.model_id)
        timings["load_s"] = round(time.perf_counter() - t0, 4)

        size = (params.width, params.height)
        init = init_image.convert("RGB").resize(size) if init_image is not None else None
        mask = _prepare_mask(mask_image, size) if mask_image is not None else None
        if model.is_inpainting and params.kind != "inpaint":
            # An inpainting checkpoint only runs through the inpaint pipeline: txt2img is an
            # inpaint of a blank canvas where everything is repainted, img2img one of the image.
            from PIL import Image

            mode = "inpaint"
            init = init if init is not None else Image.new("RGB", size, (127, 127, 127))
            mask = Image.new("L", size, 255)
        else:
            mode = params.kind
        pipe = {"txt2img": lambda: model.txt2img, "img2img": lambda: model.img2img, "inpaint": lambda: model.inpaint}[
            mode
        ]()

        if params.scheduler and params.scheduler not in SCHEDULERS:
            raise InvalidParams(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {params.scheduler!r}")
        # One job at a time per device, so swapping the scheduler on the shared pipe is safe.
        pipe.scheduler = (
            make_scheduler(params.scheduler, model.base_scheduler_config) if params.scheduler else model.base_scheduler
        )

        warnings: list[str] = []
        provenance = self._prepare_weights(model, pipe, params, warnings)
        encoding = self._encode_prompts(model, pipe, params)
        provenance.update(prompt_tokens=encoding.prompt_tokens, negative_prompt_tokens=encoding.negative_prompt_tokens)

        seeds = params.seeds
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        previews = on_preview is not None and self.manager.config.previews
        preview_every = self.manager.config.preview_interval_s
        last_preview = [float("-inf")]

        def step_end(p: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_cancel is not None and should_cancel():
                # Raising (rather than p._interrupt) stops before the VAE decode.
                raise GenerationCancelled("cancelled while running")
            total = int(getattr(p, "num_timesteps", 0) or params.steps)
            if on_progress is not None:
                on_progress(step + 1, total)
            now = time.monotonic()
            latents = callback_kwargs.get("latents")
            if previews and latents is not None and step + 1 < total and now - last_preview[0] >= preview_every:
                last_preview[0] = now
                try:
                    on_preview(step + 1, total, latents_to_rgb(latents, model.spec.family))  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - a preview is a nicety; it never fails the job
                    log.warning("preview of step %d failed", step + 1, exc_info=True)
            return callback_kwargs

        if should_cancel is not None and should_cancel():
            raise GenerationCancelled("cancelled before start")

        call: dict[str, Any] = {
            # A plain prompt within the window goes in as text, exactly as it always has, so
            # existing seeds reproduce; anything else as compel's chunked, weighted embeddings.
            **(encoding.kwargs or {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None}),
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.num_images,
            "generator": generators,
            "callback_on_step_end": step_end,
        }
        if mode == "img2img":
            call["image"] = init
            call["strength"] = params.strength
        elif mode == "inpaint":
            call.update(image=init, mask_image=mask, width=params.width, height=params.height)
            call["strength"] = params.strength if params.kind != "txt2img" and params.strength is not None else 1.0
        else:
            call["width"] = params.width
            call["height"] = params.height

        t1 = time.perf_counter()
        try:
            try:
                with torch.inference_mode():
                    outputs = list(pipe(**call).images)
            except torch.cuda.OutOfMemoryError:
                log.warning(
                    "out of GPU memory for %s %dx%d x%d; retrying once with less memory",
                    params.model_id,
                    params.width,
                    params.height,
                    params.num_images,
                )
                self.manager._free_memory()
                outputs = _low_memory_retry(pipe, call, seeds)
                warnings.append(
                    "the GPU ran out of memory; the job was run again with VAE tiling and slicing, one image at a time"
                )
        except GenerationCancelled:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            self.manager._free_memory()
            raise OutOfMemory(
                f"the GPU ran out of memory for {params.width}x{params.height} x{params.num_images}, even one "
                "image at a time with VAE tiling; ask for a smaller size, or set CPU_OFFLOAD=model, or load fewer "
                "models at once (MAX_LOADED_MODELS)"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise InvalidParams(f"the pipeline refused the parameters: {exc}") from exc
        except RuntimeError as exc:
            log.exception("pipeline failed for model %s", params.model_id)
            raise GenerationFailed(f"the pipeline failed: {type(exc).__name__}") from exc
        timings["inference_s"] = round(time.perf_counter() - t1, 4)
        if params.kind == "inpaint":
            outputs = [paste_back(img, init, mask, params.mask_blur or 0) for img in outputs]
        images = [GeneratedImage(image=img, seed=seed) for img, seed in zip(outputs, seeds, strict=True)]
        return GenerationOutput(
            images=images, backend=self.name, timings=timings, warnings=warnings, provenance=provenance
        )

    # -- what shapes the weights and the prompt -------------------------------------------------
    def _prepare_weights(self, model: Any, pipe: Any, params: GenerationParams, warnings: list[str]) -> dict[str, Any]:
        """Activate exactly the request's LoRAs (none: the LoRA-free model) and load the
        embeddings its prompts name; returns what ran, for the record."""
        config = self.manager.config
        family = model.spec.family
        available = scan_loras(config.base_dir / config.lora_dir) if params.loras else {}
        chosen = []
        applied = []
        for ref in params.loras:
            lora = available.get(ref.name)
            if lora is None:
                raise InvalidParams(f"LoRA {ref.name!r} is no longer in LORA_DIR")
            problem = lora_incompatibility(lora, family=family, cross_attention_dim=_cross_attention_dim(pipe))
            if problem:
                raise InvalidParams(f"{problem} (model {model.spec.id!r} is {family})")
            if ref.sha256 and ref.sha256 != lora.sha256:
                warnings.append(f"LoRA {ref.name!r} changed on disk after the request was accepted; the new file ran")
            chosen.append((lora, ref.weight))
            applied.append({"name": lora.name, "weight": ref.weight, "sha256": lora.sha256})
        try:
            _adapters(model, config.max_loaded_loras).apply(pipe, chosen)
        except LoraLoadError as exc:
            raise InvalidParams(str(exc)) from exc
        used = []
        text = f"{params.prompt}\n{params.negative_prompt}"
        folder = scan_embeddings(config.base_dir / config.embeddings_dir)
        loader = _embeddings(model)
        loader.forget_missing(pipe, folder)
        fitting = []
        for emb in embeddings_in(text, folder):
            problem = embedding_incompatibility(emb, family=family, text_width=text_widths(pipe))
            if problem:
                # As A1111 does: the word stays plain text, and the answer says why.
                warnings.append(f"{problem}; the word {emb.name!r} was read as text")
            else:
                fitting.append(emb)
        if fitting:
            try:
                loader.ensure(pipe, family, fitting)
            except EmbeddingLoadError as exc:
                raise InvalidParams(str(exc)) from exc
            used = [{"name": e.name, "sha256": e.sha256} for e in fitting]
        return {
            "versions": library_versions(),
            **model_provenance(model.spec),
            "loras": applied,
            **({"embeddings": used} if used else {}),
        }

    def _encode_prompts(self, model: Any, pipe: Any, params: GenerationParams) -> PromptEncoding:
        cap = self.manager.config.max_prompt_tokens
        try:
            encoding = encode(pipe, model.spec.family, params.prompt, params.negative_prompt)
        except PromptSyntaxError as exc:
            raise InvalidParams(str(exc)) from exc
        for name, count in (("prompt", encoding.prompt_tokens), ("negative_prompt", encoding.negative_prompt_tokens)):
            if count > cap:
                raise InvalidParams(f"{name} must be at most {cap} tokens (MAX_PROMPT_TOKENS), got {count}")
        return encoding


# Per loaded model: its LoRA adapters and embeddings live in its (shared) modules, so they are
# kept beside it and go with it when it is unloaded. One job runs at a time per model.
_adapter_caches: weakref.WeakKeyDictionary[Any, AdapterCache] = weakref.WeakKeyDictionary()
_embedding_loaders: weakref.WeakKeyDictionary[Any, EmbeddingLoader] = weakref.WeakKeyDictionary()


def _adapters(model: Any, max_adapters: int) -> AdapterCache:
    cache = _adapter_caches.get(model)
    if cache is None:
        cache = _adapter_caches[model] = AdapterCache(max_adapters)
    return cache


def _embeddings(model: Any) -> EmbeddingLoader:
    loader = _embedding_loaders.get(model)
    if loader is None:
        loader = _embedding_loaders[model] = EmbeddingLoader()
    return loader


def _cross_attention_dim(pipe: Any) -> int | None:
    value = getattr(getattr(pipe, "unet", None), "config", {}).get("cross_attention_dim")
    return int(value) if isinstance(value, int) else None


def _low_memory_retry(pipe: Any, call: dict[str, Any], seeds: list[int]) -> list[Any]:
    """The same job with less memory: VAE tiling and slicing on, one image per call, each with
    a fresh generator of its own seed (the failed attempt consumed the first ones), so each
    image is still its seed's solo image. The VAE's settings are restored afterwards, so the
    next job runs as configured."""
    import torch

    vae = pipe.vae
    tiling, slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        images = []
        for seed in seeds:
            one = {**call, "num_images_per_prompt": 1, "generator": [torch.Generator(device="cpu").manual_seed(seed)]}
            with torch.inference_mode():
                images.extend(pipe(**one).images)
        return images
    finally:
        if not tiling:
            vae.disable_tiling()
        if not slicing:
            vae.disable_slicing()


def _prepare_mask(mask_image: Any, size: tuple[int, int]) -> Any:
    """White (255) repaints, black keeps; any mode or size is brought to ``L`` at ``size``."""
    mask = mask_image.convert("L")
    if mask.size != size:
        mask = mask.resize(size)
    return mask


def paste_back(generated: Any, original: Any, mask: Any, blur: int) -> Any:
    """The original outside the (blurred) mask, the generated image inside it.

    A VAE round trip changes every pixel a little; users expect what they didn't mask to
    come back as they sent it (A1111 and diffusers' ``apply_overlay`` do the same).
    """
    from PIL import Image, ImageFilter

    if generated.size != original.size:
        generated = generated.resize(original.size)
    alpha = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    return Image.composite(generated.convert("RGB"), original, alpha)
