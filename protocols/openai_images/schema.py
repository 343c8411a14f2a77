"""The OpenAI Images API in the OpenAPI schema: the shapes ``fields`` reads and ``views``
answers, attached to the views by drf-spectacular's view extensions.

docs/compat.md says what each field does; this module says what each one accepts. The
bounds are the limits in force when the schema is built.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework.views import APIView

from api.selectors import model_catalog
from api.serializers import limits
from backend.params import SEED_MAX
from backend.schedulers import SCHEDULER_NAMES
from protocols.schema import LORAS, Ref, Shape, described, nullable

from .fields import IGNORED, MAX_PARTIAL_IMAGES, OUTPUT_FORMATS, QUALITY_LABEL, QUALITY_STEPS
from .views import model_objects

TAG = "OpenAI Images"

# --- errors ---------------------------------------------------------------------------------


class OpenAIError(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "description": "OpenAI's error body; the SDK raises it as an APIStatusError of the status.",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string", "description": "Names the field, the limit and the value."},
                        "type": {
                            "type": "string",
                            "description": "invalid_request_error (4xx), requests (429) or server_error (5xx).",
                        },
                        "param": {
                            "type": "string",
                            "nullable": True,
                            "description": "The request field the message is about; null for the whole request.",
                        },
                        "code": {
                            "type": "string",
                            "nullable": True,
                            "description": "E.g. invalid_value, unknown_parameter, model_not_found, invalid_api_key.",
                        },
                    },
                    "required": ["message", "type", "param", "code"],
                },
            },
            "required": ["error"],
        }


_ERRORS = {
    400: "A refused field (`invalid_value`, `unknown_parameter`, `unsupported_parameter`, "
    "`missing_required_parameter`, `model_not_found`, `invalid_json`); nothing was queued.",
    401: "AUTH_REQUIRED is on and the key is missing or unknown (`invalid_api_key`).",
    404: "No such model (`model_not_found`), or the generation was deleted while the request waited.",
    409: "The generation was cancelled before it finished (`cancelled`).",
    413: "The request body is over the size limit (`request_too_large`).",
    415: "A Content-Type this endpoint doesn't read (`unsupported_media_type`).",
    429: "Over the rate limit (`rate_limit_exceeded`) or the key's active-job cap (`too_many_active_jobs`); "
    "see Retry-After.",
    500: "The generation failed (`generation_failed`, `out_of_memory`, ...).",
    502: "The remote inference service answered with an error.",
    503: "The queue or the model is unavailable, or the server is full (`queue_unavailable`, `model_unavailable`, `queue_full`, `too_many_sync_requests`); see Retry-After.",
    504: "Not finished within SYNC_TIMEOUT (`timeout`); the job goes on, under /api/results/.",
}
_GENERATION_ERRORS = (400, 401, 404, 409, 413, 415, 429, 500, 502, 503, 504)


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(OpenAIError, description=_ERRORS[status]) for status in statuses}


# --- enums ----------------------------------------------------------------------------------


class OpenAIModelName(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": [*sorted(model_catalog()), *sorted(settings.OPENAI_MODEL_ALIASES), ""],
            "description": 'A catalogue id (GET /v1/models) or an alias of one; "" or absent: DEFAULT_MODEL.',
        }


class OpenAIQuality(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": list(QUALITY_STEPS),
            "description": "Steps as a share of the model's default_steps: low 0.5, medium/standard/auto 1, "
            "high/hd 1.5, xhigh/max 2 (at most MAX_STEPS); an explicit steps wins.",
        }


class OpenAIReportedQuality(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {"type": "string", "enum": sorted({QUALITY_LABEL.get(q, q) for q in QUALITY_STEPS})}


class OpenAIOutputFormat(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {"type": "string", "enum": list(OUTPUT_FORMATS)}


class OpenAIResponseFormat(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": ["b64_json", "url"],
            "description": "Default: url for model dall-e-2 and dall-e-3 (as OpenAI), b64_json for any other model.",
        }


class OpenAIBackground(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": ["opaque", "auto"],
            "description": "The output is always opaque; transparent is refused (400).",
        }


class NativeScheduler(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": [*SCHEDULER_NAMES, "default", ""],
            "description": 'A native scheduler name; "default", "" or absent: the model\'s own.',
        }


# --- requests -------------------------------------------------------------------------------


def _fields(ref: Ref, *, form: bool, streams: bool, from_image: bool) -> dict[str, Any]:
    """The fields an images endpoint reads. In a form every value is a string, so none is
    nullable there."""
    lim = limits()
    maybe = (lambda schema: schema) if form else nullable
    default_size = "in the input's aspect ratio" if from_image else "square"
    fields: dict[str, Any] = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": lim["MAX_PROMPT_CHARS"]},
        "model": maybe(ref(OpenAIModelName)),
        "n": maybe({"type": "integer", "minimum": 1, "maximum": lim["MAX_NUM_IMAGES"]}),
        "size": maybe(
            {
                "type": "string",
                "pattern": r"^(auto|\s*\d{1,6}\s*[xX]\s*\d{1,6}\s*)$",
                "description": f"WIDTHxHEIGHT, each a multiple of 8 from {lim['MIN_SIZE']} to {lim['MAX_SIZE']}; "
                f"auto or absent: the model's default_size, {default_size}.",
            }
        ),
        "quality": maybe(ref(OpenAIQuality)),
        "response_format": maybe(ref(OpenAIResponseFormat)),
        "output_format": maybe(ref(OpenAIOutputFormat)),
        "output_compression": maybe(
            {"type": "integer", "minimum": 0, "maximum": 100, "description": "jpeg/webp quality; default 100."}
        ),
        # Extensions (the SDK's extra_body), with their native meaning and limits.
        "negative_prompt": maybe({"type": "string", "maxLength": lim["MAX_PROMPT_CHARS"]}),
        "seed": maybe({"type": "integer", "minimum": -1, "maximum": SEED_MAX, "description": "-1: random."}),
        "steps": maybe({"type": "integer", "minimum": 1, "maximum": lim["MAX_STEPS"]}),
        "guidance_scale": maybe({"type": "number", "minimum": lim["MIN_GUIDANCE"], "maximum": lim["MAX_GUIDANCE"]}),
        "scheduler": maybe(ref(NativeScheduler)),
        "loras": {"type": "string", "description": "A JSON list: " + LORAS["description"]} if form else LORAS,
    }
    if streams:
        fields.update(
            {
                "background": maybe(ref(OpenAIBackground)),
                "stream": maybe({"type": "boolean", "description": "true: answer as server-sent events."}),
                "partial_images": maybe(
                    {"type": "integer", "minimum": 0, "maximum": MAX_PARTIAL_IMAGES, "description": "While streaming."}
                ),
            }
        )
    for name in sorted(IGNORED):
        fields[name] = {"description": "Accepted and ignored."}
    return fields


def _image(*, form: bool, name: str) -> dict[str, Any]:
    if form:
        return {"type": "string", "format": "binary", "description": f"The {name}: PNG, JPEG or WebP."}
    return {"type": "string", "description": f"The {name} as base64 or a data: URL (PNG, JPEG or WebP)."}


def _strength(default: float) -> dict[str, Any]:
    return {
        "type": "number",
        "exclusiveMinimum": True,
        "minimum": 0,
        "maximum": 1,
        "description": f"Share of the schedule redone; default {default}. steps x strength must be at least 1.",
    }


class OpenAIImageGenerationRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": _fields(ref, form=False, streams=True, from_image=False),
            "required": ["prompt"],
            "additionalProperties": False,
            "description": "Unknown fields are refused (400 unknown_parameter); null means omitted.",
        }


def _edit(ref: Ref, *, form: bool) -> dict[str, Any]:
    image = _image(form=form, name="input image")
    props = {
        "image": image if form else {"oneOf": [image, {"type": "array", "items": image, "minItems": 1}]},
        "image[]": {"type": "array", "items": image, "minItems": 1},
        "mask": _image(form=form, name="mask, whose fully transparent pixels mark the area to edit"),
        **_fields(ref, form=form, streams=True, from_image=True),
        "strength": _strength(0.75),
        "mask_blur": {"type": "integer", "minimum": 0, "maximum": 64},
    }
    if not form:
        for name in ("strength", "mask_blur"):
            props[name] = nullable(props[name])
    return {
        "type": "object",
        "properties": props,
        "required": ["prompt"],
        "additionalProperties": False,
        "description": "image or image[] is required; only the first image is used. With a mask the edit is an "
        "inpaint (default strength 1.0), without one an img2img (0.75).",
    }


class OpenAIImageEditRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _edit(ref, form=True)


class OpenAIImageEditJSONRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _edit(ref, form=False)


def _variation(ref: Ref, *, form: bool) -> dict[str, Any]:
    props = {
        "image": _image(form=form, name="input image"),
        **_fields(ref, form=form, streams=False, from_image=True),
        "strength": _strength(0.6) if form else nullable(_strength(0.6)),
    }
    props["prompt"] = {**props["prompt"], "description": 'Default: "a variation of the image".'}
    return {
        "type": "object",
        "properties": props,
        "required": ["image"],
        "additionalProperties": False,
        "description": "An img2img of the image at strength 0.6. Unknown fields are refused.",
    }


class OpenAIImageVariationRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _variation(ref, form=True)


class OpenAIImageVariationJSONRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return _variation(ref, form=False)


# --- answers --------------------------------------------------------------------------------


class OpenAIImage(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "b64_json": {"type": "string", "description": "The image in output_format, base64."},
                "url": {"type": "string", "description": "With response_format url: the stored PNG."},
            },
        }


class OpenAIImagesResponse(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "created": {"type": "integer", "description": "When the job was created (unix seconds)."},
                "data": {"type": "array", "items": ref(OpenAIImage)},
                "background": ref(OpenAIBackground),
                "output_format": ref(OpenAIOutputFormat),
                "quality": ref(OpenAIReportedQuality),
                "size": {"type": "string", "description": "The size made, WIDTHxHEIGHT."},
            },
            "required": ["created", "data", "background", "output_format", "quality", "size"],
        }


class OpenAIModel(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer", "description": "0: the catalogue keeps no date."},
                "owned_by": {"type": "string", "description": 'The hub organisation, or "system".'},
                "alias_of": {"type": "string", "description": "Aliases only: the model id it stands for."},
            },
            "required": ["id", "object", "created", "owned_by"],
        }


class OpenAIModelList(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": ref(OpenAIModel)},
            },
            "required": ["object", "data"],
        }


_ANSWER = "The images, in JSON."
_STREAMED = (
    "The images, in JSON; with stream=true, server-sent events instead: `image_generation.partial_image` "
    "(edits: `image_edit.*`) previews, then one `*.completed` event per image, or one `error` event."
)

# A 64x64 PNG, small enough for any upload limit.
_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAUUlEQVR42u3PMQ0AMAgAMJhMlCARWVPBQdI6aFZPXPbiOAEB"
    "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAYF9H4hVAhoavLyNAAAAAElFTkSuQmCC"
)


def _events(prefix: str) -> dict[str, Any]:
    """One server-sent event of a stream."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": [f"{prefix}.partial_image", f"{prefix}.completed", "error"]},
            "data": {
                "type": "string",
                "description": "JSON: {type, b64_json, created_at, size, quality, background, output_format, "
                "partial_image_index | usage}, or {type: error, error: {message, type, param, code}}.",
            },
        },
        "required": ["event", "data"],
    }


def _images_operation(
    *, operation_id: str, summary: str, form: type[Shape] | None, json: type[Shape], streams: str, example: dict
) -> dict[str, Any]:
    """``streams``: the prefix of its stream's event types, or "" when it doesn't stream."""
    request: dict[str, Any] = {"application/json": json}
    if form is not None:
        request["multipart/form-data"] = form
    answer = _STREAMED if streams else _ANSWER
    responses: dict[Any, Any] = {(200, "application/json"): OpenApiResponse(OpenAIImagesResponse, description=answer)}
    if streams:
        responses[(200, "text/event-stream")] = OpenApiResponse(_events(streams), description=answer)
    return {
        "operation_id": operation_id,
        "summary": summary,
        "request": request,
        "responses": {**responses, **errors(*_GENERATION_ERRORS)},
        "examples": [
            OpenApiExample("A small request", value=example, request_only=True, media_type="application/json")
        ],
    }


# --- the views ------------------------------------------------------------------------------


class GenerationsViewSchema(OpenApiViewExtension):
    target_class = "protocols.openai_images.views.GenerationsView"

    def view_replacement(self) -> type[APIView]:
        return described(
            self.target,
            tag=TAG,
            post=_images_operation(
                operation_id="createImage",
                summary="Create images from a prompt",
                form=None,
                json=OpenAIImageGenerationRequest,
                streams="image_generation",
                example={"prompt": "a red fox in the snow", "size": "64x64", "n": 1},
            ),
        )


class EditsViewSchema(OpenApiViewExtension):
    target_class = "protocols.openai_images.views.EditsView"

    def view_replacement(self) -> type[APIView]:
        return described(
            self.target,
            tag=TAG,
            post=_images_operation(
                operation_id="createImageEdit",
                summary="Edit an image (img2img), or inpaint where the mask is transparent",
                form=OpenAIImageEditRequest,
                json=OpenAIImageEditJSONRequest,
                streams="image_edit",
                example={"prompt": "the same fox at night", "image": _PNG_B64, "size": "64x64"},
            ),
        )


class VariationsViewSchema(OpenApiViewExtension):
    target_class = "protocols.openai_images.views.VariationsView"

    def view_replacement(self) -> type[APIView]:
        return described(
            self.target,
            tag=TAG,
            post=_images_operation(
                operation_id="createImageVariation",
                summary="Create variations of an image",
                form=OpenAIImageVariationRequest,
                json=OpenAIImageVariationJSONRequest,
                streams="",
                example={"image": _PNG_B64, "size": "64x64"},
            ),
        )


class ModelsViewSchema(OpenApiViewExtension):
    target_class = "protocols.openai_images.views.ModelsView"

    def view_replacement(self) -> type[APIView]:
        return described(
            self.target,
            tag=TAG,
            get={
                "operation_id": "listModels",
                "summary": "The catalogue's models, then the aliases",
                "responses": {200: OpenAIModelList, **errors(401, 429)},
            },
        )


class ModelViewSchema(OpenApiViewExtension):
    target_class = "protocols.openai_images.views.ModelView"

    def view_replacement(self) -> type[APIView]:
        return described(
            self.target,
            tag=TAG,
            get={
                "operation_id": "retrieveModel",
                "summary": "One model or alias",
                "parameters": [
                    OpenApiParameter(
                        "model_id",
                        {"type": "string", "enum": [item["id"] for item in model_objects()]},
                        OpenApiParameter.PATH,
                        description="A model id or alias of GET /v1/models.",
                    )
                ],
                "responses": {200: OpenAIModel, **errors(401, 404, 429)},
            },
        )
