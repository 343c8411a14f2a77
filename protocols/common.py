"""What every foreign protocol shares: auth, one way to run a generation, and errors as facts.

A protocol view subclasses :class:`ProtocolView` and says how a :class:`Problem` looks on its
wire (``render_problem``). Everything that can go wrong (a parse error, a refused field, a
rate limit, a full queue, a failed job) becomes one ``Problem`` here, so no protocol has to
know DRF's exception zoo and none ever leaks a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.http import Http404, HttpResponse, QueryDict
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.auth import ClientCompatibleAuthentication, GenerateRateThrottle, KeyRequiredIfConfigured, request_key
from api.exceptions import _CODES, ApiError, _fields, _flatten
from api.models import ApiKey, Generation, Status
from api.services import backpressure, jobs
from api.services.backpressure import WaiterSlot
from api.services.requests import GenerationRequest, RequestInvalid, generation_request_validate
from backend.errors import EngineError

log = logging.getLogger("protocols")


@dataclass(eq=False)
class Problem(Exception):
    """One failure, protocol-neutral. ``fields`` uses the native field names."""

    status: int
    code: str
    message: str
    fields: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def problem_from(exc: BaseException) -> Problem:
    """Any exception raised while serving a protocol request, as a Problem."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, RequestInvalid):
        return Problem(400, "invalid_request", exc.message, fields=exc.fields)
    if isinstance(exc, EngineError):
        return Problem(exc.http_status, exc.code, exc.message)
    if isinstance(exc, Http404):
        return Problem(404, "not_found", "Not found.")
    if isinstance(exc, SuspiciousOperation):
        return Problem(400, "bad_request", "The request was refused as malformed or unsafe.")
    if isinstance(exc, RecursionError):
        return Problem(400, "parse_error", "The request body is nested too deeply.")
    if isinstance(exc, exceptions.ValidationError):
        fields = _fields(exc.detail)
        first = next(iter(fields.values()), ["invalid request"])
        return Problem(400, "invalid_request", first[0] if first else "invalid request", fields=fields)
    if isinstance(exc, exceptions.APIException):
        headers: dict[str, str] = {}
        if isinstance(exc, ApiError):
            code = exc.error_code
            headers.update(exc.headers)
        else:
            code = _CODES.get(type(exc), getattr(exc, "default_code", "error"))
        if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(max(int(exc.wait), 1))
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", 'Bearer realm="api"')
        return Problem(exc.status_code, str(code), " ".join(_flatten(exc.detail)), headers=headers)
    log.error("unhandled error in a protocol view", exc_info=exc)
    return Problem(500, "internal_error", "The server hit an unexpected error.")


def generation_problem(generation: Generation) -> Problem | None:
    """Why a finished (or still unfinished) generation has no images to give, if it hasn't."""
    if generation.status == Status.SUCCEEDED:
        return None
    if generation.status == Status.FAILED:
        error = generation.error or {}
        status = int(error.get("http_status", 500))
        headers = {"Retry-After": "30"} if status in (429, 503) else {}
        return Problem(
            status, str(error.get("code", "generation_failed")), str(error.get("message", "")), headers=headers
        )
    if generation.status == Status.CANCELLED:
        return Problem(409, "cancelled", f"generation {generation.id} was cancelled before it finished")
    return Problem(
        504,
        "timeout",
        f"generation {generation.id} did not finish within {settings.SYNC_TIMEOUT:g}s; it goes on running and "
        f"its result will be at /api/results/{generation.id}/",
    )


class ProtocolView(APIView):
    """Base of every foreign protocol view: lenient auth when keys are off, errors as Problems."""

    authentication_classes = [ClientCompatibleAuthentication]
    # Always JSON (or the protocol's bytes): never DRF's browsable HTML nor a 406, whatever
    # Accept says; these clients don't negotiate.
    renderer_classes = [JSONRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[Any, str]:
        return JSONRenderer(), JSONRenderer.media_type

    permission_classes = [KeyRequiredIfConfigured]
    # Reads are throttled by the project default; generating views add GenerateRateThrottle.
    generate_throttled = False

    def get_throttles(self) -> list[Any]:
        throttles = super().get_throttles()
        if self.generate_throttled and self.request.method == "POST":
            throttles.append(GenerateRateThrottle())
        return throttles

    def render_problem(self, problem: Problem) -> Response:  # pragma: no cover - every protocol overrides it
        raise NotImplementedError

    def get_exception_handler(self):  # noqa: ANN201 - DRF's hook
        def handle(exc: Exception, context: dict[str, Any]) -> Response:
            problem = problem_from(exc)
            response = self.render_problem(problem)
            for key, value in problem.headers.items():
                response[key] = value
            return response

        return handle

    def handle_exception(self, exc: Exception) -> Response:
        # DRF only hands APIException/Http404/PermissionDenied to the handler; give it all.
        try:
            return super().handle_exception(exc)
        except Exception as raised:  # noqa: BLE001 - turned into a Problem, logged when unknown
            return self.get_exception_handler()(raised, {"view": self})

    # -- the one way to generate --------------------------------------------------------------
    def owner(self) -> ApiKey | None:
        return request_key(self.request)

    def generate(self, *, kind: str, fields: Mapping[str, Any]) -> Generation:
        """Validate native-named ``fields``, create the job under the caller's key and wait for
        it up to SYNC_TIMEOUT. Raises RequestInvalid / ApiError; past MAX_SYNC_WAITERS a 503
        ``too_many_sync_requests``, before anything is created (these protocols have no 202)."""
        generation, slot = self.generate_held(kind=kind, fields=fields)
        try:
            if not generation.is_finished:
                generation = jobs.generation_wait(generation=generation, timeout=settings.SYNC_TIMEOUT)
        finally:
            slot.release()
        return generation

    def generate_held(self, *, kind: str, fields: Mapping[str, Any]) -> tuple[Generation, WaiterSlot]:
        """Create the job without waiting, holding one of the MAX_SYNC_WAITERS places for the
        caller to wait in (a stream, say) and release when it is done."""
        valid: GenerationRequest = generation_request_validate(kind=kind, data=fields)
        slot = backpressure.sync_slot_acquire()
        try:
            generation, _ = jobs.generation_create(
                params=valid.params,
                init_image=valid.init_image,
                mask_image=valid.mask_image,
                response_format=valid.response_format,
                owner=self.owner(),
            )
        except BaseException:
            slot.release()
            raise
        return generation, slot


class Releasing:
    """A streamed body that calls ``release`` once it is done: read to its end, or closed by
    the server (as it is when the client goes away), even before its first item."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None]) -> None:
        self._body = iter(body)
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        finally:
            self.close()

    def close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            release()


def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a Problem naming what is wrong with it."""
    data = request.data
    if not isinstance(data, Mapping) or isinstance(data, QueryDict):
        # A form or multipart body (a QueryDict) is not JSON: its files can't be read as fields.
        raise Problem(400, "invalid_request", "the request body must be a JSON object")
    return dict(data.items()) if not isinstance(data, dict) else data


def sse(data: Mapping[str, Any], *, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` as compact JSON on a single line."""
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


# Where each protocol lives, and the view whose ``render_problem`` speaks its error shape.
# For what is refused before any view runs: an oversized body (middleware), an unknown path.
PROTOCOL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("v1/", "protocols.openai_images.views.OpenAIView"),
    ("sdapi/", "protocols.a1111.views.A1111View"),
    ("internal/", "protocols.a1111.views.A1111View"),
    ("models/", "protocols.hf_task.views.ModelTaskView"),
)


def problem_response_for_path(path: str, status: int, code: str, message: str) -> HttpResponse | None:
    """The error response in the shape of the protocol that owns ``path``; None for the rest."""
    from django.utils.module_loading import import_string

    bare = path.lstrip("/")
    for prefix, view_path in PROTOCOL_PREFIXES:
        if bare.startswith(prefix) or bare == prefix.rstrip("/"):
            problem = Problem(status, code, message)
            response = import_string(view_path)().render_problem(problem)
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
            response.renderer_context = {}
            for key, value in problem.headers.items():
                response[key] = value
            return response.render()
    return None
