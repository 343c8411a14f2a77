"""Run diffusers pipelines on this machine: txt2img, img2img, batches, seeds, progress, cancel."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from . import fastpath
from .embeddings import (
    EmbeddingLoader,
    EmbeddingLoadError,
    embedding_incompatibility,
    embeddings_in,
    scan_embeddings,
    text_widths,
)
from .errors import EngineError, GenerationCancelled, GenerationFailed, InvalidParams, OutOfMemory
from .loras import AdapterCache, LoraLoadError, lora_incompatibility, scan_loras
from .manager import ModelManager, get_manager
from .params import (
    BatchMember,
    CancelFn,
    GeneratedImage,
    GenerationOutput,
    GenerationParams,
    PreviewFn,
    ProgressFn,
    batch_key,
)
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
        member = BatchMember(params, init_image, mask_image, on_progress, should_cancel, on_preview)
        result = self.generate_batch([member])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def generate_batch(self, members: list[BatchMember]) -> list[GenerationOutput | EngineError]:
        """Run jobs that share a :func:`batch_key` as one pipeline call; one result per member.

        A member's own problem (a prompt that can't be parsed, too many tokens, a missing
        input) is its result and the others run; what belongs to the call (the model, the
        scheduler, the LoRAs, the pipeline itself) is raised, or given to every member of the
        call. Each image is made from a generator of its own seed, so it equals its solo image
        within floating-point noise. A member that is cancelled while the call runs gets
        ``GenerationCancelled`` and its images are dropped; the call stops before decoding only
        when every member of it is cancelled.
        """
        if not members:
            return []
        first = members[0].params
        if any(batch_key(m.params) != batch_key(first) for m in members):
            raise InvalidParams("the jobs of one batch must share model, kind, size, steps, scheduler and LoRAs")
        results: list[GenerationOutput | EngineError | None] = [None] * len(members)
        for i, m in enumerate(members):
            if m.params.kind in ("img2img", "inpaint") and m.init_image is None:
                results[i] = InvalidParams(f"{m.params.kind} needs an image")
            elif m.params.kind == "inpaint" and m.mask_image is None:
                results[i] = InvalidParams("inpaint needs a mask")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model = self.manager.get(first.model_id)
        timings["load_s"] = round(time.perf_counter() - t0, 4)

        size = (first.width, first.height)
        mode = "inpaint" if model.is_inpainting else first.kind
        pipe = {"txt2img": lambda: model.txt2img, "img2img": lambda: model.img2img, "inpaint": lambda: model.inpaint}[
            mode
        ]()
        if first.scheduler and first.scheduler not in SCHEDULERS:
            raise InvalidParams(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {first.scheduler!r}")
        # One call at a time per device, so swapping the scheduler on the shared pipe is safe.
        pipe.scheduler = (
            make_scheduler(first.scheduler, model.base_scheduler_config) if first.scheduler else model.base_scheduler
        )
        shared = self._prepare_loras(model, pipe, first)

        jobs: list[_Job] = []
        for i, m in enumerate(members):
            if results[i] is not None:
                continue
            if m.should_cancel is not None and m.should_cancel():
                results[i] = GenerationCancelled("cancelled before start")
                continue
            try:
                jobs.append(self._prepare_member(i, m, model, pipe, mode, size, shared))
            except EngineError as exc:
                results[i] = exc

        # Members whose prompts encode alike share a call: plain text with plain text, embeddings
        # of one shape with the same shape (padding them to one length would change the images).
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.encoding_shape, []).append(job)
        for group in groups.values():
            for job, outcome in zip(group, self._run_call(model, pipe, mode, group), strict=True):
                if isinstance(outcome, BaseException):
                    results[job.index] = outcome
                    continue
                provenance = {**job.provenance}
                results[job.index] = GenerationOutput(
                    images=outcome,
                    backend=self.name,
                    timings={**timings, **job.timings},
                    warnings=job.warnings,
                    provenance=provenance,
                )
        return [r if r is not None else GenerationFailed("the job was not run") for r in results]

    def _prepare_member(
        self, index: int, m: BatchMember, model: Any, pipe: Any, mode: str, size: tuple[int, int], shared: Any
    ) -> _Job:
        from PIL import Image

        params = m.params
        warnings = list(shared.warnings)
        init = m.init_image.convert("RGB").resize(size) if m.init_image is not None else None
        mask = _prepare_mask(m.mask_image, size) if m.mask_image is not None else None
        if model.is_inpainting and params.kind != "inpaint":
            # An inpainting checkpoint only runs through the inpaint pipeline: txt2img is an
            # inpaint of a blank canvas where everything is repainted, img2img one of the image.
            init = init if init is not None else Image.new("RGB", size, (127, 127, 127))
            mask = Image.new("L", size, 255)
        provenance = {**shared.provenance, **self._prepare_embeddings(model, pipe, params, warnings)}
        encoding = self._encode_prompts(model, pipe, params)
        provenance.update(prompt_tokens=encoding.prompt_tokens, negative_prompt_tokens=encoding.negative_prompt_tokens)
        shape: tuple[Any, ...] = ("text",)
        if encoding.kwargs:
            shape = ("embeds", *sorted((k, tuple(v.shape[1:])) for k, v in encoding.kwargs.items()))
        return _Job(
            index=index,
            member=m,
            init=init,
            mask=mask,
            encoding=encoding,
            encoding_shape=shape,
            warnings=warnings,
            provenance=provenance,
        )

    def _run_call(
        self, model: Any, pipe: Any, mode: str, group: list[_Job]
    ) -> list[list[GeneratedImage] | EngineError]:
        """One pipeline call for ``group``; per job, its images or why it has none."""
        import torch

        params = group[0].member.params
        seeds = [seed for job in group for seed in job.member.params.seeds]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        offsets, counts = [], []
        for job in group:
            offsets.append(sum(counts))
            counts.append(job.member.params.num_images)
        cancelled = [False] * len(group)

        previews = self.manager.config.previews and any(job.member.on_preview is not None for job in group)
        preview_every = self.manager.config.preview_interval_s
        last_preview = [float("-inf")]

        def step_end(p: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            total = int(getattr(p, "num_timesteps", 0) or params.steps)
            for k, job in enumerate(group):
                if not cancelled[k] and job.member.should_cancel is not None and job.member.should_cancel():
                    cancelled[k] = True
            if all(cancelled):
                # Raising (rather than p._interrupt) stops before the VAE decode.
                raise GenerationCancelled("cancelled while running")
            for k, job in enumerate(group):
                if not cancelled[k] and job.member.on_progress is not None:
                    job.member.on_progress(step + 1, total)
            now = time.monotonic()
            latents = callback_kwargs.get("latents")
            if previews and latents is not None and step + 1 < total and now - last_preview[0] >= preview_every:
                last_preview[0] = now
                for k, job in enumerate(group):
                    if cancelled[k] or job.member.on_preview is None:
                        continue
                    try:
                        image = latents_to_rgb(latents[offsets[k] : offsets[k] + 1], model.spec.family)
                        job.member.on_preview(step + 1, total, image)
                    except Exception:  # noqa: BLE001 - a preview is a nicety; it never fails the job
                        log.warning("preview of step %d failed", step + 1, exc_info=True)
            return callback_kwargs

        call: dict[str, Any] = {
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "generator": generators,
            "callback_on_step_end": step_end,
        }
        if len(group) == 1:
            job = group[0]
            # A plain prompt within the window goes in as text, exactly as it always has, so
            # existing seeds reproduce; anything else as compel's chunked, weighted embeddings.
            call.update(
                job.encoding.kwargs
                or {"prompt": job.member.params.prompt, "negative_prompt": job.member.params.negative_prompt or None}
            )
            call["num_images_per_prompt"] = job.member.params.num_images
            images_in: list[Any] = [job.init] if job.init is not None else []
            masks_in: list[Any] = [job.mask] if job.mask is not None else []
            one = lambda x: x[0] if x else None  # noqa: E731
            init_arg, mask_arg = one(images_in), one(masks_in)
        else:
            # Flattened: one entry per image, each prompt repeated for its member's images.
            call["num_images_per_prompt"] = 1
            if group[0].encoding.kwargs:
                for key in group[0].encoding.kwargs:
                    call[key] = torch.cat(
                        [
                            job.encoding.kwargs[key].repeat_interleave(n, dim=0)
                            for job, n in zip(group, counts, strict=True)
                        ]
                    )
            else:
                call["prompt"] = [
                    job.member.params.prompt for job, n in zip(group, counts, strict=True) for _ in range(n)
                ]
                negatives = [
                    job.member.params.negative_prompt or ""
                    for job, n in zip(group, counts, strict=True)
                    for _ in range(n)
                ]
                # An empty negative prompt is what None means to the pipeline.
                call["negative_prompt"] = negatives if any(negatives) else None
            init_arg = (
                [job.init for job, n in zip(group, counts, strict=True) for _ in range(n)]
                if group[0].init is not None
                else None
            )
            mask_arg = (
                [job.mask for job, n in zip(group, counts, strict=True) for _ in range(n)]
                if group[0].mask is not None
                else None
            )
        if mode == "img2img":
            call["image"] = init_arg
            call["strength"] = params.strength
        elif mode == "inpaint":
            call.update(image=init_arg, mask_image=mask_arg, width=params.width, height=params.height)
            call["strength"] = params.strength if params.kind != "txt2img" and params.strength is not None else 1.0
        else:
            call["width"] = params.width
            call["height"] = params.height

        label = f"{params.model_id} {params.width}x{params.height} x{len(seeds)}"
        extra_warning: list[str] = []
        t1 = time.perf_counter()
        try:
            try:
                with torch.inference_mode():
                    outputs = list(pipe(**call).images)
            except torch.cuda.OutOfMemoryError:
                log.warning("out of GPU memory for %s; retrying once with less memory", label)
                self.manager._free_memory()
                outputs = _low_memory_retry(pipe, _per_image_calls(call, seeds, flattened=len(group) > 1))
                extra_warning.append(
                    "the GPU ran out of memory; the job was run again with VAE tiling and slicing, one image at a time"
                )
        except GenerationCancelled as exc:
            return [exc for _ in group]
        except torch.cuda.OutOfMemoryError:
            self.manager._free_memory()
            error = OutOfMemory(
                f"the GPU ran out of memory for {params.width}x{params.height} x{len(seeds)}, even one "
                "image at a time with VAE tiling; ask for a smaller size or fewer images, or set CPU_OFFLOAD=model, "
                "or load fewer models at once (MAX_LOADED_MODELS)"
            )
            return [error for _ in group]
        except (ValueError, TypeError) as exc:
            invalid = InvalidParams(f"the pipeline refused the parameters: {exc}")
            return [invalid for _ in group]
        except RuntimeError as exc:
            log.exception("pipeline failed for %s", label)
            failed = GenerationFailed(f"the pipeline failed: {type(exc).__name__}")
            return [failed for _ in group]
        inference_s = round(time.perf_counter() - t1, 4)
        results: list[list[GeneratedImage] | EngineError] = []
        for k, job in enumerate(group):
            job.timings.update(inference_s=inference_s, batch_jobs=len(group), batch_images=len(seeds))
            job.warnings.extend(extra_warning)
            if cancelled[k]:
                results.append(GenerationCancelled("cancelled while running"))
                continue
            mine = outputs[offsets[k] : offsets[k] + counts[k]]
            if job.member.params.kind == "inpaint":
                mine = [paste_back(img, job.init, job.mask, job.member.params.mask_blur or 0) for img in mine]
            results.append(
                [GeneratedImage(image=img, seed=seed) for img, seed in zip(mine, job.member.params.seeds, strict=True)]
            )
        return results

    # -- what shapes the weights and the prompt -------------------------------------------------
    def _prepare_loras(self, model: Any, pipe: Any, params: GenerationParams) -> _Shared:
        """Activate exactly the call's LoRAs (none: the LoRA-free model); returns what ran."""
        config = self.manager.config
        family = model.spec.family
        available = scan_loras(config.base_dir / config.lora_dir) if params.loras else {}
        chosen = []
        applied = []
        warnings: list[str] = []
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
        # Fused projections bypass the layers LoRAs adapt: the UNet's own attention while any is active.
        fastpath.prepare_for_loras(pipe, active=bool(chosen))
        provenance = {"versions": library_versions(), **model_provenance(model.spec), "loras": applied}
        return _Shared(warnings=warnings, provenance=provenance)

    def _prepare_embeddings(
        self, model: Any, pipe: Any, params: GenerationParams, warnings: list[str]
    ) -> dict[str, Any]:
        """Load the embeddings this member's prompts name; returns them, for the record."""
        config = self.manager.config
        family = model.spec.family
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
        if not fitting:
            return {}
        try:
            loader.ensure(pipe, family, fitting)
        except EmbeddingLoadError as exc:
            raise InvalidParams(str(exc)) from exc
        return {"embeddings": [{"name": e.name, "sha256": e.sha256} for e in fitting]}

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


@dataclass
class _Shared:
    """What every member of a call shares: the LoRAs' record and warnings."""

    warnings: list[str]
    provenance: dict[str, Any]


@dataclass
class _Job:
    """A member made ready for the call: its inputs at size, its prompt encoding, its record."""

    index: int
    member: BatchMember
    init: Any
    mask: Any
    encoding: PromptEncoding
    encoding_shape: tuple[Any, ...]
    warnings: list[str]
    provenance: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)


_PER_IMAGE = ("prompt", "negative_prompt", "image", "mask_image")


def _per_image_calls(call: dict[str, Any], seeds: list[int], *, flattened: bool) -> list[dict[str, Any]]:
    """The call split into one call per image, each with a fresh generator of its own seed (the
    failed attempt consumed the first ones), so each image is still its seed's solo image."""
    import torch

    calls = []
    for i, seed in enumerate(seeds):
        one = {**call, "num_images_per_prompt": 1, "generator": [torch.Generator(device="cpu").manual_seed(seed)]}
        if flattened:
            for key, value in call.items():
                if key in _PER_IMAGE and isinstance(value, list):
                    one[key] = [value[i]]
                elif key.endswith("_embeds") and value is not None:
                    one[key] = value[i : i + 1]
        calls.append(one)
    return calls


def _low_memory_retry(pipe: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """The same images with less memory: VAE tiling and slicing on, one image per call. The
    VAE's settings are restored afterwards, so the next job runs as configured."""
    import torch

    vae = pipe.vae
    tiling, slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        images = []
        for one in calls:
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
