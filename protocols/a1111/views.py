"""AUTOMATIC1111's ``/sdapi/v1/`` API over the native job services.

Every generation is an ordinary job (history, owner, limits, rate limits, cancel, recovery).
The checkpoint, ``progress`` and ``interrupt`` belong to the caller's API key; callers without
a key share one anonymous scope.
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.http import HttpResponse
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response

from api.images import INFOTEXT_SAMPLERS, model_hash, model_sha256, parameters_text
from api.models import Generation, Status
from api.selectors import embedding_catalog, generation_active, generation_preview, lora_catalog, model_catalog
from api.services import jobs
from api.services.requests import RequestInvalid, image_decode

from ..common import Problem, ProtocolView, generation_problem, json_body
from . import protocol
from .mapping import FIELD_NAMES, A1111Invalid, a1111_message, checkpoint_of, echoed, to_native
from .pnginfo import png_info
from .state import checkpoint_get, checkpoint_set, title_of


def json_null() -> HttpResponse:
    # A1111 answers some POSTs with ``null``; clients call .json() on it, so it must be JSON.
    return HttpResponse(b"null", content_type="application/json")


class A1111View(ProtocolView):
    """Errors in A1111's shapes: FastAPI's 422 for a refused field, its middleware's otherwise."""

    def render_problem(self, problem: Problem) -> Response:
        if problem.code in ("invalid_request", "parse_error"):
            return Response({"detail": self._validation_detail(problem)}, status=422)
        if problem.code == "method_not_allowed":
            return Response({"detail": "Method Not Allowed"}, status=405)
        if problem.status >= 500:
            # What A1111's middleware makes of an exception raised while generating.
            body = {"error": "RuntimeError", "detail": problem.message, "body": "", "errors": problem.message}
        else:
            body = {"error": "HTTPException", "detail": problem.message, "body": "", "errors": ""}
        return Response(body, status=problem.status)

    @staticmethod
    def _validation_detail(problem: Problem) -> list[dict[str, Any]]:
        detail: list[dict[str, Any]] = []
        for name, messages in (problem.fields or {"": [problem.message]}).items():
            if isinstance(problem, A1111Invalid):
                loc = tuple(name.split(".")) if name else ()
            else:
                loc = FIELD_NAMES.get(name, ()) if name != "non_field_errors" else ()
            label = ".".join(loc)
            for message in messages:
                text = a1111_message(message)
                if label and loc[-1] not in text:
                    text = f"{label}: {text}"
                detail.append({"loc": ["body", *loc], "msg": text, "type": "value_error"})
        return detail


# --- generation ---------------------------------------------------------------------------


def _info(generation: Generation, body: dict[str, Any], *, interrupted: bool) -> dict[str, Any]:
    """What A1111's ``Processed.js()`` holds, for the images this job made."""
    params = generation.params
    images = list(generation.images.all())
    seeds = [image.seed for image in images] or [generation.seed]
    count = len(images) or int(params.get("num_images") or 1)
    sampler, _schedule = INFOTEXT_SAMPLERS.get(params.get("scheduler") or "", (None, None))
    prompt, negative = params.get("prompt", ""), params.get("negative_prompt", "")
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": generation.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": params.get("width"),
        "height": params.get("height"),
        "sampler_name": sampler,
        "cfg_scale": params.get("guidance_scale"),
        "steps": params.get("steps"),
        "batch_size": body.get("batch_size") or 1,
        "n_iter": body.get("n_iter") or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": generation.model_id,
        "sd_model_hash": model_hash(generation.model_id),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [parameters_text(params, image.seed) for image in images],
        "styles": [],
        "job_timestamp": protocol.timestamp(generation.started_at or generation.created_at),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": None,
        "interrupted": interrupted,
        "generation_id": str(generation.id),
    }


class GenerateView(A1111View):
    generate_throttled = True
    endpoint = "txt2img"

    def post(self, request: Request) -> Response:
        body = json_body(request)
        kind, fields = to_native(body, endpoint=self.endpoint, caller_model=checkpoint_get(self.owner()))
        generation = self.generate(kind=kind, fields=fields)
        interrupted = generation.status == Status.CANCELLED
        if not interrupted:
            problem = generation_problem(generation)
            if problem is not None:
                raise problem
        images = [jobs.image_b64(image) for image in generation.images.all()] if not interrupted else []
        parameters = echoed(body)
        if self.endpoint == "img2img" and not body.get("include_init_images"):
            # A1111 leaves the (large) input images out of the echo unless asked.
            parameters["init_images"] = None
            parameters["mask"] = None
        info = _info(generation, body, interrupted=interrupted)
        return Response({"images": images, "parameters": parameters, "info": json.dumps(info)})


class Txt2ImgView(GenerateView):
    endpoint = "txt2img"


class Img2ImgView(GenerateView):
    endpoint = "img2img"


# --- checkpoint and options ---------------------------------------------------------------


def _options(model_id: str) -> dict[str, Any]:
    """The settings A1111 clients read, shaped like A1111's; only the checkpoint is per caller."""
    return {
        "sd_model_checkpoint": title_of(model_id),
        "sd_checkpoint_hash": model_sha256(model_id),
        "sd_checkpoints_limit": 1,
        "sd_checkpoints_keep_in_cpu": True,
        "sd_vae": "Automatic",
        "sd_vae_overrides_per_model_preferences": True,
        "sd_unet": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "samples_save": True,
        "samples_format": "png",
        "samples_filename_pattern": "",
        "save_images_add_number": True,
        "grid_save": False,
        "grid_format": "png",
        "return_grid": False,
        "enable_pnginfo": True,
        "save_txt": False,
        "outdir_samples": "",
        "outdir_txt2img_samples": "",
        "outdir_img2img_samples": "",
        "jpeg_quality": 80,
        "export_for_4chan": False,
        "img_downscale_threshold": 4.0,
        "target_side_length": 4000,
        "img_max_size_mp": 200,
        "use_original_name_batch": True,
        "face_restoration": False,
        "face_restoration_model": "CodeFormer",
        "code_former_weight": 0.5,
        "upscaler_for_img2img": None,
        "show_progressbar": True,
        "live_previews_enable": True,
        "live_previews_image_format": "png",
        "show_progress_every_n_steps": 1,
        "show_progress_type": "Approx cheap",
        "interrupt_after_current": True,
        "add_model_hash_to_info": True,
        "add_model_name_to_info": True,
        "add_version_to_info": False,
        "sd_lora": "None",
        "lora_preferred_name": "Alias from file",
        "img2img_fix_steps": False,
        "initial_noise_multiplier": 1.0,
        "inpainting_mask_weight": 1.0,
        "s_churn": 0.0,
        "s_tmin": 0.0,
        "s_tmax": 0.0,
        "s_noise": 1.0,
        "k_sched_type": "Automatic",
        "sigma_min": 0.0,
        "sigma_max": 0.0,
        "rho": 0.0,
        "always_discard_next_to_last_sigma": False,
        "sd_noise_schedule": "Default",
        "enable_emphasis": True,
        "use_old_emphasis_implementation": False,
        "comma_padding_backtrack": 20,
        "token_merging_ratio": 0.0,
        "hide_samplers": [],
        "api_enable_requests": True,
        "api_forbid_local_requests": True,
        "api_useragent": "",
        "auto_launch_browser": "Disable",
    }


class OptionsView(A1111View):
    def get(self, request: Request) -> Response:
        return Response(_options(checkpoint_get(self.owner())))

    def post(self, request: Request) -> HttpResponse:
        # Clients post the whole dict back (Open WebUI) or just the checkpoint (SillyTavern,
        # webuiapi); only the checkpoint means anything here, the rest is ignored.
        body = json_body(request)
        value = body.get("sd_model_checkpoint")
        if value not in (None, ""):  # Open WebUI may post "": leave the choice as it is
            checkpoint_set(self.owner(), checkpoint_of(value, field="sd_model_checkpoint"))
        return json_null()


class SdModelsView(A1111View):
    def get(self, request: Request) -> Response:
        # ``filename`` is the catalogue id, never a path on this server.
        rows = [
            {
                "title": title_of(model_id),
                "model_name": model_id,
                "hash": model_hash(model_id),
                "sha256": model_sha256(model_id),
                "filename": model_id,
                "config": None,
            }
            for model_id in sorted(model_catalog())
        ]
        return Response(rows)


class RefreshCheckpointsView(A1111View):
    def post(self, request: Request) -> HttpResponse:
        # The folders (checkpoints, LoRAs, embeddings) are rescanned whenever they are read.
        return json_null()


# --- progress, interrupt, skip --------------------------------------------------------------


def _state(job_count: int, running: Generation | None) -> dict[str, Any]:
    progress = (running.progress or {}) if running is not None else {}
    return {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": running.kind if running is not None else "",
        "job_count": job_count,
        "job_timestamp": protocol.timestamp(running.started_at) if running is not None else "0",
        "job_no": 0,
        "sampling_step": int(progress.get("step") or 0),
        "sampling_steps": int(progress.get("total_steps") or (running.params.get("steps", 0) if running else 0)),
    }


class ProgressView(A1111View):
    def get(self, request: Request) -> Response:
        active = list(generation_active(owner=self.owner()))
        running = next((g for g in active if g.status == Status.RUNNING), None)
        fraction, eta, image = 0.0, 0.0, None
        if running is not None:
            fraction = float((running.progress or {}).get("fraction") or 0.0)
            if fraction > 0 and running.started_at is not None:
                from django.utils import timezone

                elapsed = (timezone.now() - running.started_at).total_seconds()
                eta = max(elapsed / fraction - elapsed, 0.0)
            skip_image = request.query_params.get("skip_current_image", "false").lower() in ("1", "true", "yes")
            if not skip_image:
                image = generation_preview(generation_id=running.id) or None
        state = _state(len(active), running)
        textinfo = f"Sampling step {state['sampling_step']}/{state['sampling_steps']}" if running else None
        return Response(
            {
                "progress": fraction,
                "eta_relative": eta,
                "state": state,
                "current_image": image,
                "textinfo": textinfo,
            }
        )


class InterruptView(A1111View):
    def post(self, request: Request) -> Response:
        # Only the caller's running job(s): its queued ones go on, as in A1111, and never
        # another key's.
        for generation in generation_active(owner=self.owner()).filter(status=Status.RUNNING):
            try:
                jobs.generation_cancel(generation=generation)
            except APIException:
                pass  # it finished (or was deleted) meanwhile
        return Response({})


class SkipView(A1111View):
    def post(self, request: Request) -> HttpResponse:
        # A batch is one pipeline call here, so there is no next image to skip to: no effect.
        return json_null()


# --- fixed listings -----------------------------------------------------------------------


class ListingView(A1111View):
    payload: Any = None

    def get(self, request: Request) -> Response:
        return Response(self.payload() if callable(self.payload) else self.payload)


def _memory() -> dict[str, Any]:
    try:
        page, pages, free = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        total, available = page * pages, page * free
        ram: dict[str, Any] = {"free": available, "used": total - available, "total": total}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "not available on this system"}
    # GPU memory is reported by the native /api/status/; this process may not own a GPU.
    return {"ram": ram, "cuda": {"error": "see /api/status/ for accelerator memory"}}


CMD_FLAGS: dict[str, Any] = {
    "api": True,
    "nowebui": True,
    "api_auth": None,
    "api_log": False,
    "listen": False,
    "port": None,
    "ckpt": None,
    "ckpt_dir": None,
    "vae_dir": None,
    "lora_dir": None,
    "embeddings_dir": None,
    "lowvram": False,
    "medvram": False,
    "xformers": False,
    "no_half": False,
    "precision": "autocast",
    "disable_safe_unpickle": False,
    "skip_torch_cuda_test": False,
}


def listing(payload: Any) -> Any:
    return ListingView.as_view(payload=payload)


def samplers_payload() -> list[dict[str, Any]]:
    return protocol.samplers_listing()


def schedulers_payload() -> list[dict[str, Any]]:
    return protocol.schedulers_listing()


def upscalers_payload() -> list[dict[str, Any]]:
    return protocol.UPSCALERS


def latent_modes_payload() -> list[dict[str, str]]:
    return protocol.LATENT_UPSCALE_MODES


def memory_payload() -> dict[str, Any]:
    return _memory()


def empty_list() -> list[Any]:
    return []


def loras_payload() -> list[dict[str, Any]]:
    """A1111's Lora extension listing; ``path`` is the file name, never a server path."""
    return [
        {
            "name": name,
            "alias": name,
            "path": f"{name}.safetensors",
            "metadata": {"ss_sd_model_name": lora.family or "", "sha256": lora.sha256},
        }
        for name, lora in sorted(lora_catalog().items())
    ]


def embeddings_payload() -> dict[str, Any]:
    """A1111's shape; every embedding in EMBEDDINGS_DIR loads on first use, so all are listed
    as loaded."""
    loaded = {
        name: {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": emb.dims[-1] if emb.dims else None,
            "vectors": emb.vectors,
        }
        for name, emb in sorted(embedding_catalog().items())
    }
    return {"loaded": loaded, "skipped": {}}


def scripts_payload() -> dict[str, Any]:
    return {"txt2img": [], "img2img": []}


def cmd_flags_payload() -> dict[str, Any]:
    return dict(CMD_FLAGS)


class PngInfoView(A1111View):
    """The parameters a PNG carries (this server's and A1111's own images alike)."""

    def post(self, request: Request) -> Response:
        body = json_body(request)
        source = body.get("image")
        if not isinstance(source, str) or not source.strip():
            raise A1111Invalid({"image": ["image is required: a base64 PNG or data URL"]})
        try:
            image = image_decode(source, field="image")
        except RequestInvalid as exc:
            raise A1111Invalid({"image": exc.fields.get("image", [exc.message])}) from None
        return Response(png_info(dict(image.info)))


class NotFoundView(A1111View):
    """Any other ``/sdapi/v1/`` path: FastAPI's 404 body, as A1111 answers it."""

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        return HttpResponse(b'{"detail":"Not Found"}', status=404, content_type="application/json")


class PingView(A1111View):
    """``/internal/ping``: A1111 answers ``{}`` without asking for credentials."""

    permission_classes: list[Any] = []

    def get(self, request: Request) -> Response:
        return Response({})
