"""Run diffusers pipelines on this machine: txt2img, img2img, batches, seeds, progress, cancel."""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import GenerationCancelled, GenerationFailed, InvalidParams, OutOfMemory
from .manager import ModelManager, get_manager
from .params import CancelFn, GeneratedImage, GenerationOutput, GenerationParams, ProgressFn
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
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> GenerationOutput:
        import torch

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model = self.manager.get(params.model_id)
        timings["load_s"] = round(time.perf_counter() - t0, 4)

        if params.kind == "img2img":
            if init_image is None:
                raise InvalidParams("img2img needs an image")
            pipe = model.img2img
        else:
            pipe = model.txt2img

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

        def step_end(p: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_cancel is not None and should_cancel():
                # Raising (rather than p._interrupt) stops before the VAE decode.
                raise GenerationCancelled("cancelled while running")
            if on_progress is not None:
                on_progress(step + 1, int(getattr(p, "num_timesteps", 0) or params.steps))
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
        if params.kind == "img2img":
            call["image"] = init_image.convert("RGB").resize((params.width, params.height))
            call["strength"] = params.strength
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
        images = [GeneratedImage(image=img, seed=seed) for img, seed in zip(result.images, seeds, strict=True)]
        return GenerationOutput(images=images, backend=self.name, timings=timings, warnings=warnings)


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
