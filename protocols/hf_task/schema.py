"""The Hugging Face task route (``POST /models/<model_id>``) in the OpenAPI schema: the body
``payload`` reads and the image bytes ``views`` answers, attached to the view by
drf-spectacular's view extension. docs/compat.md says what each field does.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework.views import APIView

from api.selectors import model_catalog
from api.serializers import limits
from backend.params import SEED_MAX
from backend.schedulers import SCHEDULER_NAMES
from protocols.schema import LORAS, Ref, Shape, described, nullable, size_bounds

from .schedulers import CLASS_TO_NATIVE

TAG = "Hugging Face task"


class HFError(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "error": {"type": "string", "description": "Names the HF field, the limit and the value."},
                "error_type": {"type": "string", "description": "validation (400, 413) or overloaded (429, 503)."},
                "estimated_time": {"type": "number", "description": "503 only: seconds until a retry may work."},
            },
            "required": ["error"],
        }


_ERRORS = {
    400: "An invalid body or parameter, or image-to-image without a prompt; nothing was queued.",
    401: "AUTH_REQUIRED is on and the key is missing or unknown.",
    404: "No such model on this server (a catalogue id, or the hub repository of one), or the generation was "
    "deleted while the request waited.",
    409: "The generation was cancelled before it finished.",
    413: "The request body is over the size limit.",
    429: "Over the rate limit or the key's active-job cap; see Retry-After.",
    500: "The generation failed.",
    502: "The remote inference service answered with an error.",
    503: "The queue or the model is unavailable; see Retry-After.",
    504: "Not finished within SYNC_TIMEOUT; the job goes on, and the message names it under /api/results/.",
}


class HFScheduler(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        classes = sorted(CLASS_TO_NATIVE)
        short = [name.removesuffix("Scheduler") for name in classes]
        return {
            "type": "string",
            "enum": [*dict.fromkeys([*classes, *short, *SCHEDULER_NAMES])],
            "description": "A diffusers scheduler class (the Scheduler suffix optional) or a native name, in any case.",
        }


class HFParameters(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        lim = limits()
        size = size_bounds(lim)
        props = {
            "negative_prompt": {"type": "string", "maxLength": lim["MAX_PROMPT_CHARS"]},
            "width": size,
            "height": size,
            "target_size": {
                "type": "object",
                "properties": {"width": nullable(size), "height": nullable(size)},
                "additionalProperties": False,
                "description": "The same as width and height; refused when it contradicts them.",
            },
            "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": lim["MAX_STEPS"]},
            "guidance_scale": {"type": "number", "minimum": lim["MIN_GUIDANCE"], "maximum": lim["MAX_GUIDANCE"]},
            "seed": {"type": "integer", "minimum": -1, "maximum": SEED_MAX, "description": "-1: random; see X-Seed."},
            "scheduler": ref(HFScheduler),
            "loras": LORAS,
            "prompt": {
                "type": "string",
                "maxLength": lim["MAX_PROMPT_CHARS"],
                "description": "Image-to-image only, and required there.",
            },
            "strength": {
                "type": "number",
                "minimum": 0,
                "exclusiveMinimum": True,
                "maximum": 1,
                "description": "Image-to-image only; default 0.75.",
            },
        }
        return {
            "type": "object",
            "properties": {name: nullable(schema) for name, schema in props.items()},
            "additionalProperties": False,
            "description": "null means absent; any other parameter is refused (400) by name.",
        }


class HFTaskRequest(Shape):
    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:
        inputs = {
            "type": "string",
            "minLength": 1,
            "description": "The prompt (text-to-image), or a base64 image or data: URL (image-to-image).",
        }
        body = {
            "type": "object",
            "properties": {
                "inputs": inputs,
                "image": {"type": "string", "minLength": 1, "description": "Accepted in place of inputs."},
                "parameters": nullable(ref(HFParameters)),
            },
            "anyOf": [{"required": ["inputs"]}, {"required": ["image"]}],
        }
        return {"oneOf": [body, {**inputs, "description": "A JSON string: the prompt."}]}


_IMAGE = {"type": "string", "format": "binary"}
_ANSWER = (
    "The image. Accept picks PNG (the default, the stored file with its parameters chunk), JPEG or WebP; "
    "X-Seed is the seed that made it."
)
_HEADERS = [
    OpenApiParameter(name, {"type": "string", **extra}, OpenApiParameter.HEADER, response=[200], required=True)
    for name, extra in (
        ("X-Generation-Id", {"format": "uuid"}),
        ("X-Seed", {"pattern": "^[0-9]+$"}),
        ("x-compute-time", {"description": "Seconds."}),
        ("x-compute-images", {"enum": ["1"]}),
    )
]


def _model_names() -> list[str]:
    catalog = model_catalog()
    return [*sorted(catalog), *sorted({spec.repo for spec in catalog.values() if spec.repo})]


class ModelTaskViewSchema(OpenApiViewExtension):
    target_class = "protocols.hf_task.views.ModelTaskView"

    def view_replacement(self) -> type[APIView]:
        lim = limits()
        return described(
            self.target,
            tag=TAG,
            post={
                "operation_id": "hf_task",
                "summary": "Text-to-image or image-to-image, answered with the image's bytes",
                "description": "What huggingface_hub.InferenceClient(base_url=.../models/<model_id>) sends. "
                "Raw image bytes are read too, but carry no prompt, which this server needs (400).",
                "parameters": [
                    OpenApiParameter(
                        "model_id",
                        {"type": "string", "enum": _model_names()},
                        OpenApiParameter.PATH,
                        description="A catalogue id, or the hub repository (owner/name) of a catalogue entry, "
                        "in any case.",
                    ),
                    *_HEADERS,
                ],
                "request": {
                    "application/json": HFTaskRequest,
                    "text/plain": {
                        "type": "string",
                        "maxLength": lim["MAX_PROMPT_CHARS"],
                        "description": "The prompt.",
                    },
                },
                "responses": {
                    **{
                        (200, media): OpenApiResponse(_IMAGE, description=_ANSWER)
                        for media in ("image/png", "image/jpeg", "image/webp")
                    },
                    **{status: OpenApiResponse(HFError, description=text) for status, text in _ERRORS.items()},
                },
                "examples": [
                    OpenApiExample(
                        "Text-to-image",
                        value={
                            "inputs": "a red fox",
                            "parameters": {"width": 64, "height": 64, "num_inference_steps": 1},
                        },
                        request_only=True,
                        media_type="application/json",
                    )
                ],
            },
        )
