"""Run diffusers pipelines on this machine: txt2img, img2img, batches, seeds, progress, cancel."""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import GenerationCancelled, GenerationFailed, InvalidParams, OutOfMemory
from .manager import ModelManager, get_manager
from .params import CancelFn, GeneratedImage, GenerationOutput, GenerationParams, PreviewFn, ProgressFn
from .preview import latents_to_rgb
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

        warnings = _truncation_warnings(pipe, params)

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
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt or None,
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
            with torch.inference_mode():
                result = pipe(**call)
        except GenerationCancelled:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            self.manager._free_memory()
            raise OutOfMemory(
                f"the GPU ran out of memory for {params.width}x{params.height} x{params.num_images}; "
                "try a smaller size or batch, or enable VAE_TILING / CPU_OFFLOAD"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise InvalidParams(f"the pipeline refused the parameters: {exc}") from exc
        except RuntimeError as exc:
            log.exception("pipeline failed for model %s", params.model_id)
            raise GenerationFailed(f"the pipeline failed: {type(exc).__name__}") from exc
        timings["inference_s"] = round(time.perf_counter() - t1, 4)
        outputs = list(result.images)
        if params.kind == "inpaint":
            outputs = [paste_back(img, init, mask, params.mask_blur or 0) for img in outputs]
        images = [GeneratedImage(image=img, seed=seed) for img, seed in zip(outputs, seeds, strict=True)]
        return GenerationOutput(images=images, backend=self.name, timings=timings, warnings=warnings)


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


def _truncation_warnings(pipe: Any, params: GenerationParams) -> list[str]:
    """CLIP reads a fixed token window; say so when a prompt runs past it (it is truncated)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    window = int(getattr(tokenizer, "model_max_length", 77))
    out = []
    for field, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
        if not text:
            continue
        count = len(tokenizer(text, truncation=False).input_ids)
        if count > window:
            out.append(
                f"{field} is {count} tokens long; the text encoder reads {window} (including start/end), "
                "so the rest was ignored"
            )
    return out
