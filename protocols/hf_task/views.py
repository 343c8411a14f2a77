"""``POST /models/<model_id>``: one HF task request in, one image's bytes out."""

from __future__ import annotations

import io
import time
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from api.models import Generation
from api.selectors import model_catalog
from api.services import jobs
from protocols.common import Problem, ProtocolView, generation_problem

from .payload import INVALID_PARAMETER, TaskRequest, body_parts, task_request

# Accept value -> (PIL format, media type). PNG is the default: it is the stored file itself,
# with the generation parameters in its text chunk.
_FORMATS = {
    "image/png": ("PNG", "image/png"),
    "image/jpeg": ("JPEG", "image/jpeg"),
    "image/jpg": ("JPEG", "image/jpeg"),
    "image/webp": ("WEBP", "image/webp"),
}
_PNG = _FORMATS["image/png"]

# Native field -> HF name, when the request got no further than its parsing.
_DEFAULT_NAMES = {"image": "inputs", "steps": "num_inference_steps", "model_id": "model"}

# HF's error_type words (TGI) for the statuses a client may act on.
_ERROR_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded", 503: "overloaded"}


def output_format(accept: str) -> tuple[str, str]:
    """The first acceptable image type by q-value, in the client's order; PNG for anything else."""
    ranges: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept.split(",")):
        media, *options = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            ranges.append((-q, index, media.lower()))
    for _, _, media in sorted(ranges):
        if media in _FORMATS:
            return _FORMATS[media]
        if media in ("image/*", "*/*"):
            return _PNG
    return _PNG


def resolve_model(model_id: str) -> str:
    """A catalogue id, or the hub repository of a catalogue entry; never a path."""
    catalog = model_catalog()
    if model_id in catalog:
        return model_id
    lowered = model_id.lower()
    for spec in catalog.values():
        if spec.repo and spec.repo.lower() == lowered:
            return spec.id
    raise Problem(
        404,
        "model_not_found",
        f"Model {model_id[:100]} does not exist on this server; available: {', '.join(sorted(catalog))}",
    )


class ModelTaskView(ProtocolView):
    generate_throttled = True
    # The answer is image bytes whatever Accept says; errors are JSON. Never a 406.
    renderer_classes = [JSONRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[Any, str]:
        return JSONRenderer(), JSONRenderer.media_type

    def post(self, request: Request, model_id: str) -> HttpResponse:
        started = time.monotonic()
        self._task: TaskRequest | None = None
        model = resolve_model(model_id.rstrip("/"))
        try:
            body = request.body
        except RequestDataTooBig:
            raise Problem(413, "request_too_large", "the request body is too large") from None
        inputs, parameters, raw_image = body_parts(body, request.content_type or "")
        self._task = task = task_request(model_id=model, inputs=inputs, parameters=parameters, raw_image=raw_image)
        generation = self.generate(kind=task.kind, fields=task.fields)
        problem = generation_problem(generation)
        if problem is not None:
            raise problem
        return self._image_response(generation, request.headers.get("Accept", ""), started)

    @staticmethod
    def _image_response(generation: Generation, accept: str, started: float) -> HttpResponse:
        image = generation.images.order_by("index").first()
        if image is None:
            raise Problem(500, "no_image", f"generation {generation.id} finished without an image")
        data = jobs.image_bytes(image)
        pil_format, media_type = output_format(accept)
        if pil_format != "PNG":
            from PIL import Image

            buf = io.BytesIO()
            with Image.open(io.BytesIO(data)) as img:
                img.convert("RGB").save(buf, format=pil_format, quality=95)
            data = buf.getvalue()
        response = HttpResponse(data, content_type=media_type)
        response["X-Generation-Id"] = str(generation.id)
        response["X-Seed"] = str(image.seed)
        response["x-compute-images"] = "1"
        response["x-compute-time"] = f"{time.monotonic() - started:.3f}"
        response["Access-Control-Expose-Headers"] = "X-Generation-Id, X-Seed, x-compute-time, x-compute-images"
        return response

    # -- errors: {"error": "<message>"} --------------------------------------------------------
    def render_problem(self, problem: Problem) -> Response:
        body: dict[str, Any] = {"error": self._message(problem)}
        error_type = _ERROR_TYPES.get(problem.status)
        if error_type:
            body["error_type"] = error_type
        retry = problem.headers.get("Retry-After")
        if problem.status == 503 and retry and retry.isdigit():
            body["estimated_time"] = float(retry)  # what HF's "model is loading" answer carries
        return Response(body, status=problem.status)

    def _message(self, problem: Problem) -> str:
        if not problem.fields or problem.code == INVALID_PARAMETER:
            return problem.message
        task: TaskRequest | None = getattr(self, "_task", None)
        names = {**_DEFAULT_NAMES, **(task.names if task else {})}
        notes = task.notes if task else {}
        messages: list[str] = []
        for native, texts in problem.fields.items():
            hf = "parameters" if native == "non_field_errors" else names.get(native, native)
            for text in texts:
                if text.startswith(native + " "):
                    text = hf + text[len(native) :]
                elif not text.startswith(hf):
                    text = f"{hf}: {text}"
                if native in notes:
                    text = f"{text} ({notes[native]})"
                messages.append(text)
        return "; ".join(messages) or problem.message
