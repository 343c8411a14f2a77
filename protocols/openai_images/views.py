"""HTTP for the OpenAI Images API: parse, translate (``fields``), generate, answer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse
from PIL import Image
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from api import storage
from api.models import Generation
from api.selectors import model_catalog
from api.services import jobs
from api.services.requests import RequestInvalid, image_decode
from protocols.common import Problem, ProtocolView, Releasing, generation_problem, json_body

from .encoding import encode_b64
from .errors import PARAM_OF_NATIVE, error_response
from .fields import (
    ImagesRequest,
    edit_request,
    generation_request,
    invalid,
    mask_from_alpha,
    variation_request,
)
from .streaming import image_events


class OpenAIView(ProtocolView):
    renderer_classes = [JSONRenderer]

    def render_problem(self, problem: Problem) -> Response:
        return error_response(problem)


class ImagesView(OpenAIView):
    """What every generating endpoint shares: run the job, answer as JSON or as a stream."""

    generate_throttled = True
    stream_prefix = "image_generation"

    def run(self, req: ImagesRequest) -> Response | StreamingHttpResponse:
        try:
            if req.stream:
                # The stream holds its thread while the job runs, as a synchronous request does.
                generation, slot = self.generate_held(kind=req.kind, fields=req.fields)
            else:
                generation = self.generate(kind=req.kind, fields=req.fields)
        except RequestInvalid as exc:
            raise native_invalid(exc, req) from None
        if req.stream:
            events = image_events(generation_id=generation.id, prefix=self.stream_prefix, req=req)
            response = StreamingHttpResponse(Releasing(events, slot.release), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return response
        problem = generation_problem(generation)
        if problem is not None:
            raise problem
        return Response(self.images_body(generation, req))

    def images_body(self, generation: Generation, req: ImagesRequest) -> dict[str, Any]:
        params = generation.params or {}
        data = []
        for image in generation.images.order_by("index"):
            if req.response_format == "url":
                data.append({"url": storage.url(image.file, self.request)})
            else:
                png = jobs.image_bytes(image)
                data.append({"b64_json": encode_b64(png, output_format=req.output_format, compression=req.compression)})
        return {
            "created": int(generation.created_at.timestamp()),
            "data": data,
            "background": "opaque",
            "output_format": req.output_format,
            "quality": req.quality,
            "size": f"{params.get('width')}x{params.get('height')}",
        }


class GenerationsView(ImagesView):
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return self.run(generation_request(json_body(request)))


class EditsView(ImagesView):
    stream_prefix = "image_edit"

    def post(self, request: Request) -> Response | StreamingHttpResponse:
        data = request.data
        image = decode_field(first_image(request), "image")
        raw_mask = data.get("mask") if isinstance(data, Mapping) else None
        mask = mask_from_alpha(decode_field(raw_mask, "mask")) if raw_mask not in (None, "") else None
        return self.run(edit_request(form_fields(data), image=image, mask=mask))


class VariationsView(ImagesView):
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        image = decode_field(first_image(request), "image")
        return self.run(variation_request(form_fields(request.data), image=image))


class ModelsView(OpenAIView):
    def get(self, request: Request) -> Response:
        return Response({"object": "list", "data": model_objects()})


class ModelView(OpenAIView):
    def get(self, request: Request, model_id: str) -> Response:
        model_id = model_id.rstrip("/")
        for item in model_objects():
            if item["id"] == model_id:
                return Response(item)
        raise Problem(
            404, "model_not_found", f"The model {model_id[:100]!r} does not exist", fields={"model": ["not found"]}
        )


class NotFoundView(OpenAIView):
    """Anything else under /v1/: OpenAI's 404, so the SDK raises NotFoundError."""

    def http_method_not_allowed(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        raise Problem(404, "not_found", f"Invalid URL ({request.method} {request.path[:200]})")

    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.http_method_not_allowed(request)


# --- helpers ----------------------------------------------------------------------------------


def model_objects() -> list[dict[str, Any]]:
    """The catalogue, then the aliases (so a client may look up the name it sends)."""
    items = [
        {"id": spec.id, "object": "model", "created": 0, "owned_by": _owner(spec.repo)}
        for spec in model_catalog().values()
    ]
    for alias, target in sorted(settings.OPENAI_MODEL_ALIASES.items()):
        items.append({"id": alias, "object": "model", "created": 0, "owned_by": "system", "alias_of": target})
    return items


def _owner(repo: str | None) -> str:
    return repo.split("/", 1)[0] if repo and "/" in repo else "system"


def form_fields(data: Any) -> dict[str, Any]:
    """Multipart (one value per text field) or JSON, as a plain dict."""
    if not isinstance(data, Mapping):
        raise Problem(400, "invalid_request", "the request body must be multipart/form-data or a JSON object")
    if hasattr(data, "getlist"):
        return {key: data.get(key) for key in data}
    return dict(data)


def first_image(request: Request) -> Any:
    """The first of ``image`` / ``image[]`` (files, or base64 strings in JSON)."""
    data = request.data
    if hasattr(data, "getlist"):
        for name in ("image", "image[]"):
            values = [v for v in data.getlist(name) if v not in (None, "")]
            if values:
                return values[0]
        return None
    if isinstance(data, Mapping):
        value = data.get("image", data.get("image[]"))
        if isinstance(value, list):
            return value[0] if value else None
        return value
    return None


def decode_field(value: Any, name: str) -> Image.Image:
    if value in (None, ""):
        raise invalid(name, f"Missing required parameter: {name!r}.", code="missing_required_parameter")
    try:
        return image_decode(value, field=name)
    except RequestInvalid as exc:
        message = next(iter(exc.fields.values()))[0]
        raise invalid(name, f"{name}: {message}") from None


def native_invalid(exc: RequestInvalid, req: ImagesRequest) -> Problem:
    """A native refusal, named in the client's terms."""
    name, messages = next(iter(exc.fields.items()), ("request", [exc.message]))
    message = messages[0] if messages else exc.message
    param = PARAM_OF_NATIVE.get(name, name)
    if name in ("width", "height"):
        message = f"size {req.size or 'auto'!r} is not allowed: {message}"
    elif name == "steps" and not req.steps_given:
        param = "quality"
        message = f"quality {req.quality!r}: {message}"
    elif param and param != name:
        message = re.sub(rf"^{re.escape(name)}\b", param, message)
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return invalid(param, message)
