"""Refuse an oversized request body from its Content-Length, before anything parses it."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class RequestSizeLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw)
        except ValueError:
            return _error(request, 400, "bad_request", f"Content-Length must be a number, got {raw[:20]!r}")
        if limit is not None and length > limit:
            return _error(
                request, 413, "request_too_large", f"the request body must be at most {limit} bytes, got {length}"
            )
        return self.get_response(request)


def _error(request: HttpRequest, status: int, code: str, message: str) -> HttpResponse:
    return protocol_error(request.path, status, code, message) or JsonResponse(
        {"error": {"code": code, "message": message}}, status=status
    )


def protocol_error(path: str, status: int, code: str, message: str) -> HttpResponse | None:
    """In the error shape of the foreign protocol that owns ``path`` (ERROR_SHAPE_FOR_PATH);
    None under /api/ and anywhere no protocol claims."""
    from django.utils.module_loading import import_string

    hook = getattr(settings, "ERROR_SHAPE_FOR_PATH", "")
    if not hook or path.startswith("/api/"):
        return None
    return import_string(hook)(path, status, code, message)
