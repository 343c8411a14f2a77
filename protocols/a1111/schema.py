"""AUTOMATIC1111's ``/sdapi/v1/`` in the OpenAPI schema: the shapes ``mapping`` reads and
``views`` answers, attached to the views by drf-spectacular's view extensions.

Paths are written as A1111 clients send them, without the trailing slash (both forms are
served). docs/compat.md says what each field does; this module says what each one accepts.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework.views import APIView

from api.selectors import model_catalog
from api.serializers import limits
from backend.params import SEED_MAX
from protocols.schema import ProtocolAutoSchema, Ref, Shape, described, nullable, size_bounds

from . import views
from .protocol import SAMPLERS, SCHEDULES
from .state import title_of

TAG = "AUTOMATIC1111"
ROOT = "/sdapi/v1/"


class A1111AutoSchema(ProtocolAutoSchema):
    """Operation ids from the path (``a1111_post_txt2img``): one view class serves several
    paths (the listings, the refresh endpoints)."""

    def get_operation_id(self) -> str:
        tail = self.path.removeprefix(ROOT).strip("/")
        return f"a1111_{self.method.lower()}_{re.sub(r'[^0-9A-Za-z]+', '_', tail)}"


# --- errors ---------------------------------------------------------------------------------


class A1111ValidationError(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "description": "FastAPI's validation error, as A1111 answers a refused field.",
            "properties": {
                "detail": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": '["body", <A1111 field>, ...]; ["body"] for a rule across fields.',
                            },
                            "msg": {"type": "string", "description": "Names the field, the limit and the value."},
                            "type": {"type": "string"},
                        },
                        "required": ["loc", "msg", "type"],
                    },
                }
            },
            "required": ["detail"],
        }


class A1111HTTPError(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "description": "What A1111's middleware answers for an HTTPException (4xx) or a failure while "
            "generating (RuntimeError, 5xx).",
            "properties": {
                "error": {"type": "string", "description": "HTTPException or RuntimeError."},
                "detail": {"type": "string"},
                "body": {"type": "string"},
                "errors": {"type": "string"},
            },
            "required": ["error", "detail", "body", "errors"],
        }


_ERRORS = {
    400: "The request was refused as malformed (e.g. too many fields).",
    401: "AUTH_REQUIRED is on and the key (Basic password or Bearer) is missing or unknown.",
    404: "The generation was deleted while the request waited.",
    413: "The request body is over the size limit.",
    415: "A Content-Type other than JSON.",
    422: "A known field with a bad value, or a body that is not a JSON object; nothing was queued.",
    429: "Over the rate limit, or the key's active-job cap; see Retry-After.",
    500: "The generation failed.",
    502: "The remote inference service answered with an error.",
    503: "The queue or the model is unavailable; see Retry-After.",
    504: "Not finished within SYNC_TIMEOUT; the job goes on, under /api/results/.",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {
        status: OpenApiResponse(A1111ValidationError if status == 422 else A1111HTTPError, description=_ERRORS[status])
        for status in statuses
    }


_READ_ERRORS = (401, 429)
_BODY_ERRORS = (400, 401, 413, 415, 422, 429)
_GENERATION_ERRORS = (400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504)

_NULL = OpenApiResponse(
    {"type": "object", "nullable": True, "enum": [None]}, description="`null`, as A1111 answers this endpoint."
)
_EMPTY_OBJECT = OpenApiResponse({"type": "object", "maxProperties": 0}, description="`{}`")


# --- names ----------------------------------------------------------------------------------


class A1111SamplerName(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        names = [name for s in SAMPLERS for name in (s.name, *s.aliases)]
        return {
            "type": "string",
            "enum": [*dict.fromkeys(names), ""],
            "description": 'A sampler of GET /sdapi/v1/samplers or an alias, in any case; "" or absent: Euler.',
        }


class A1111ScheduleType(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        names = [name for c in SCHEDULES for name in (c.name, c.label, *(c.aliases or ()))]
        return {
            "type": "string",
            "enum": [*dict.fromkeys(names), ""],
            "description": "A schedule type of GET /sdapi/v1/schedulers, in any case; only Karras changes what runs.",
        }


class A1111Checkpoint(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        ids = sorted(model_catalog())
        return {
            "type": "string",
            "enum": [*ids, *(title_of(model_id) for model_id in ids)],
            "description": "A title or model name of GET /sdapi/v1/sd-models (also its hash or sha256, in any case).",
        }


# --- requests -------------------------------------------------------------------------------


def _generation_fields(ref: Ref) -> dict[str, Any]:
    lim = limits()
    count = {"type": "integer", "minimum": 1, "maximum": lim["MAX_NUM_IMAGES"]}
    any_size = {k: v for k, v in size_bounds(lim).items() if k != "multipleOf"}
    rounded = "Rounded down to a multiple of 8, as A1111 does."
    return {
        "prompt": {
            "type": "string",
            "minLength": 1,
            "maxLength": lim["MAX_PROMPT_CHARS"],
            "description": "Required and not blank here (A1111 would run unconditioned).",
        },
        "negative_prompt": nullable({"type": "string", "maxLength": lim["MAX_PROMPT_CHARS"]}),
        "width": nullable({**any_size, "description": "Default: the model's size. " + rounded}),
        "height": nullable({**any_size, "description": "Default: the model's size. " + rounded}),
        "steps": nullable({"type": "integer", "minimum": 1, "maximum": lim["MAX_STEPS"]}),
        "cfg_scale": nullable({"type": "number", "minimum": lim["MIN_GUIDANCE"], "maximum": lim["MAX_GUIDANCE"]}),
        "seed": nullable({"type": "integer", "minimum": -1, "maximum": SEED_MAX, "description": "-1: random."}),
        "batch_size": nullable({**count, "description": "batch_size x n_iter images, made as one batch."}),
        "n_iter": nullable(count),
        "sampler_name": nullable(ref(A1111SamplerName)),
        "sampler_index": nullable({**ref(A1111SamplerName), "description": "Read when sampler_name is empty."}),
        "scheduler": nullable(ref(A1111ScheduleType)),
        "override_settings": nullable(
            {
                "type": "object",
                "properties": {"sd_model_checkpoint": nullable(ref(A1111Checkpoint))},
                "description": "Only sd_model_checkpoint is read: the model for this request.",
            }
        ),
    }


_IGNORED = (
    "Any other A1111 field (styles, subseed, restore_faces, enable_hr and hr_*, alwayson_scripts, "
    "send_images, save_images, ...) is accepted and ignored; null means omitted."
)


class A1111Txt2ImgRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": _generation_fields(ref),
            "required": ["prompt"],
            "description": _IGNORED,
        }


class A1111Img2ImgRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        image = {"type": "string", "description": "Base64 or a data: URL (PNG, JPEG or WebP)."}
        props = {
            **_generation_fields(ref),
            "init_images": {
                "type": "array",
                "items": image,
                "minItems": 1,
                "description": "Only the first image is used.",
            },
            "denoising_strength": nullable(
                {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "description": "Default 0.75."}
            ),
            "mask": nullable({**image, "description": "Makes the job an inpaint: white repaints, black keeps."}),
            "mask_blur": nullable({"type": "integer", "minimum": 0, "maximum": 64}),
            "inpainting_mask_invert": nullable(
                {"type": "integer", "minimum": 0, "maximum": 1, "description": "1: the mask marks what to keep."}
            ),
            "include_init_images": nullable(
                {"type": "boolean", "description": "true: parameters echoes the input images."}
            ),
        }
        return {"type": "object", "properties": props, "required": ["prompt", "init_images"], "description": _IGNORED}


class A1111OptionsUpdate(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "sd_model_checkpoint": nullable(
                    {
                        "anyOf": [ref(A1111Checkpoint), {"type": "string", "enum": [""]}],
                        "description": 'The caller\'s checkpoint from now on; null or "" leaves it as it is.',
                    }
                )
            },
            "description": "The whole options dict may be posted back; only sd_model_checkpoint is read.",
        }


class A1111PngInfoRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"image": {"type": "string", "minLength": 1, "description": "A PNG as base64 or data: URL."}},
            "required": ["image"],
        }


# --- answers --------------------------------------------------------------------------------


class A1111GenerationResponse(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "images": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Raw base64 PNGs, no data: prefix; empty when the job was interrupted.",
                },
                "parameters": {"type": "object", "description": "The request as sent."},
                "info": {
                    "type": "string",
                    "description": "A JSON string: A1111's Processed.js() keys, plus interrupted and generation_id.",
                },
            },
            "required": ["images", "parameters", "info"],
        }


class A1111Options(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "sd_model_checkpoint": {"type": "string", "description": "The caller's checkpoint title."},
                "sd_checkpoint_hash": {"type": "string"},
                "sd_vae": {"type": "string"},
                "CLIP_stop_at_last_layers": {"type": "integer"},
                "samples_format": {"type": "string"},
            },
            "required": ["sd_model_checkpoint", "sd_checkpoint_hash"],
            "description": "A1111's settings with its defaults; only the checkpoint is per caller.",
        }


class A1111SdModel(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "title": {"type": "string", "description": "<model_name> [<hash>]"},
                "model_name": {"type": "string", "description": "The catalogue id."},
                "hash": {"type": "string"},
                "sha256": {"type": "string"},
                "filename": {"type": "string", "description": "The catalogue id, never a server path."},
                "config": {"type": "string", "nullable": True},
            },
            "required": ["title", "model_name", "hash", "sha256", "filename", "config"],
        }


class A1111Progress(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        integer, boolean, string = {"type": "integer"}, {"type": "boolean"}, {"type": "string"}
        state = {
            "skipped": boolean,
            "interrupted": boolean,
            "stopping_generation": boolean,
            "job": string,
            "job_count": {**integer, "description": "The caller's queued and running jobs."},
            "job_timestamp": string,
            "job_no": integer,
            "sampling_step": integer,
            "sampling_steps": integer,
        }
        return {
            "type": "object",
            "properties": {
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "eta_relative": {"type": "number", "minimum": 0},
                "state": {"type": "object", "properties": state, "required": list(state)},
                "current_image": {"type": "string", "nullable": True, "description": "Raw base64 PNG preview."},
                "textinfo": {"type": "string", "nullable": True},
            },
            "required": ["progress", "eta_relative", "state", "current_image", "textinfo"],
        }


class A1111PngInfo(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        strings = {"type": "object", "additionalProperties": {"type": "string"}}
        return {
            "type": "object",
            "properties": {
                "info": {"type": "string", "description": "The PNG's parameters text; empty without one."},
                "items": {**strings, "description": "Its other text chunks."},
                "parameters": {**strings, "description": "The text parsed as A1111 does; values stay strings."},
            },
            "required": ["info", "items", "parameters"],
        }


def _list_of(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    item = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "array", "items": item, **({"description": description} if description else {})}


class A1111Samplers(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _list_of(
            {
                "name": {"type": "string"},
                "aliases": {"type": "array", "items": {"type": "string"}},
                "options": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "Only the samplers this server runs.",
        )


class A1111Schedulers(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _list_of(
            {
                "name": {"type": "string"},
                "label": {"type": "string"},
                "aliases": {"type": "array", "items": {"type": "string"}, "nullable": True},
                "default_rho": {"type": "number"},
                "need_inner_model": {"type": "boolean"},
            }
        )


class A1111Upscalers(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        text = {"type": "string", "nullable": True}
        return _list_of(
            {"name": {"type": "string"}, "model_name": text, "model_path": text, "model_url": text, "scale": {}},
            'Nothing upscales here: only "None".',
        )


class A1111LatentUpscaleModes(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _list_of({"name": {"type": "string"}})


class A1111Loras(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _list_of(
            {
                "name": {"type": "string"},
                "alias": {"type": "string"},
                "path": {"type": "string", "description": "The file name, never a server path."},
                "metadata": {"type": "object"},
            },
            "The LoRAs in LORA_DIR.",
        )


class A1111Embeddings(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        number = {"type": "integer", "nullable": True}
        text = {"type": "string", "nullable": True}
        embedding = {
            "type": "object",
            "properties": {
                "step": number,
                "sd_checkpoint": text,
                "sd_checkpoint_name": text,
                "shape": number,
                "vectors": {"type": "integer"},
            },
        }
        return {
            "type": "object",
            "properties": {
                "loaded": {"type": "object", "additionalProperties": embedding, "description": "By name."},
                "skipped": {"type": "object"},
            },
            "required": ["loaded", "skipped"],
        }


class A1111Scripts(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        names = {"type": "array", "items": {"type": "string"}}
        return {
            "type": "object",
            "properties": {"txt2img": names, "img2img": names},
            "required": ["txt2img", "img2img"],
        }


class A1111CmdFlags(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"api": {"type": "boolean"}, "nowebui": {"type": "boolean"}},
            "description": "A fixed A1111-shaped flags dict; no paths, no secrets.",
        }


class A1111Memory(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "ram": {"type": "object", "description": "{free, used, total} in bytes, or {error}."},
                "cuda": {"type": "object", "description": "{error}: accelerator memory is in /api/status/."},
            },
            "required": ["ram", "cuda"],
        }


_EMPTY_LIST = OpenApiResponse(
    {"type": "array", "items": {"type": "object"}, "maxItems": 0},
    description="Always `[]`: nothing of this kind exists on this server.",
)

# What each listing route's payload answers.
_LISTINGS: dict[Any, Any] = {
    views.samplers_payload: A1111Samplers,
    views.schedulers_payload: A1111Schedulers,
    views.upscalers_payload: A1111Upscalers,
    views.latent_modes_payload: A1111LatentUpscaleModes,
    views.loras_payload: A1111Loras,
    views.embeddings_payload: A1111Embeddings,
    views.scripts_payload: A1111Scripts,
    views.cmd_flags_payload: A1111CmdFlags,
    views.memory_payload: A1111Memory,
    views.empty_list: _EMPTY_LIST,
}


# --- the views ------------------------------------------------------------------------------


def _a1111(view: type[APIView], **methods: dict[str, Any]) -> type[APIView]:
    return described(view, tag=TAG, schema=A1111AutoSchema(), **methods)


def _generate(summary: str, request: type[Shape], example: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "request": {"application/json": request},
        "responses": {200: A1111GenerationResponse, **errors(*_GENERATION_ERRORS)},
        "examples": [OpenApiExample("A small request", value=example, request_only=True)],
    }


# A 64x64 PNG, small enough for any upload limit.
_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAUUlEQVR42u3PMQ0AMAgAMJhMlCARWVPBQdI6aFZPXPbiOAEB"
    "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAYF9H4hVAhoavLyNAAAAAElFTkSuQmCC"
)


class Txt2ImgViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.Txt2ImgView"

    def view_replacement(self) -> type[APIView]:
        example = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1, "sampler_name": "Euler a"}
        return _a1111(self.target, post=_generate("Generate from a prompt", A1111Txt2ImgRequest, example))


class Img2ImgViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.Img2ImgView"

    def view_replacement(self) -> type[APIView]:
        example = {"prompt": "the fox at night", "init_images": [_PNG_B64], "steps": 2, "denoising_strength": 0.5}
        return _a1111(
            self.target, post=_generate("Generate from an image (inpaint with a mask)", A1111Img2ImgRequest, example)
        )


class OptionsViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.OptionsView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            get={
                "summary": "The settings, with the caller's checkpoint",
                "responses": {200: A1111Options, **errors(*_READ_ERRORS)},
            },
            post={
                "summary": "Set the caller's checkpoint",
                "request": {"application/json": A1111OptionsUpdate},
                "responses": {200: _NULL, **errors(*_BODY_ERRORS)},
            },
        )


class SdModelsViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.SdModelsView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            get={
                "summary": "The catalogue as checkpoints",
                "responses": {200: A1111SdModel(many=True), **errors(*_READ_ERRORS)},
            },
        )


class RefreshCheckpointsViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.RefreshCheckpointsView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            post={
                "summary": "No effect: the folders are read afresh whenever they are listed",
                "request": None,
                "responses": {200: _NULL, **errors(*_READ_ERRORS)},
            },
        )


class ProgressViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.ProgressView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            get={
                "summary": "The caller's running job",
                "parameters": [
                    OpenApiParameter(
                        "skip_current_image", bool, OpenApiParameter.QUERY, description="true: no current_image."
                    )
                ],
                "responses": {200: A1111Progress, **errors(*_READ_ERRORS)},
            },
        )


class InterruptViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.InterruptView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            post={
                "summary": "Cancel the caller's running jobs",
                "request": None,
                "responses": {200: _EMPTY_OBJECT, **errors(*_READ_ERRORS)},
            },
        )


class SkipViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.SkipView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            post={
                "summary": "No effect: a batch is one pipeline call",
                "request": None,
                "responses": {200: _NULL, **errors(*_READ_ERRORS)},
            },
        )


class PngInfoViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.PngInfoView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            post={
                "summary": "The generation parameters a PNG carries",
                "request": {"application/json": A1111PngInfoRequest},
                "responses": {200: A1111PngInfo, **errors(*_BODY_ERRORS)},
                "examples": [OpenApiExample("A PNG", value={"image": _PNG_B64}, request_only=True)],
            },
        )


class ListingViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.ListingView"

    def view_replacement(self) -> type[APIView]:
        payload = self.target_callback.initkwargs.get("payload")
        return _a1111(self.target, get={"responses": {200: _LISTINGS[payload], **errors(*_READ_ERRORS)}})


class PingViewSchema(OpenApiViewExtension):
    target_class = "protocols.a1111.views.PingView"

    def view_replacement(self) -> type[APIView]:
        return _a1111(
            self.target,
            get={
                "summary": "Liveness, without credentials",
                "auth": [],
                "responses": {200: _EMPTY_OBJECT, **errors(429)},
            },
        )
