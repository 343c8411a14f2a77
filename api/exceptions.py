"""One error shape for every failure:
``{"error": {"code", "message", "fields"?}}``, never a traceback, path or secret."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from backend.errors import EngineError

log = logging.getLogger("api")


class ApiError(exceptions.APIException):
    """An error with its own machine code, raised by services and views."""

    def __init__(
        self, message: str, *, code: str, status_code: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code
        self.headers = headers or {}


class Conflict(ApiError):
    def __init__(self, message: str, *, code: str = "conflict") -> None:
        super().__init__(message, code=code, status_code=status.HTTP_409_CONFLICT)


class ServiceUnavailable(ApiError):
    def __init__(self, message: str, *, code: str = "service_unavailable", retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(message, code=code, status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)


def _flatten(detail: Any) -> list[str]:
    if isinstance(detail, dict):
        out: list[str] = []
        for value in detail.values():
            out.extend(_flatten(value))
        return out
    if isinstance(detail, list):
        out = []
        for value in detail:
            out.extend(_flatten(value))
        return out
    return [str(detail)]


def _fields(detail: Any) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {str(key): _flatten(value) for key, value in detail.items()}
    return {"non_field_errors": _flatten(detail)}


def error_body(code: str, message: str, fields: dict[str, list[str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


_CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ParseError: "parse_error",
}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, EngineError):
        return Response(error_body(exc.code, exc.message), status=exc.http_status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, SuspiciousOperation):
        # Too many form fields or files, a disallowed host...: the client's fault, not ours.
        return Response(error_body("bad_request", "The request was refused as malformed or unsafe."), status=400)
    if isinstance(exc, exceptions.ValidationError):
        fields = _fields(exc.detail)
        first = next(iter(fields.items()), ("request", ["invalid request"]))
        message = first[1][0] if first[1] else "invalid request"
        if len(fields) > 1:
            message += f" (and {len(fields) - 1} more field error(s))"
        return Response(error_body("invalid_request", message, fields), status=400)
    response = exception_handler(exc, context)
    if response is None:
        if not isinstance(exc, Exception):  # pragma: no cover
            return None
        log.exception("unhandled error in %s", context.get("view").__class__.__name__)
        return Response(error_body("internal_error", "The server hit an unexpected error."), status=500)
    if isinstance(exc, ApiError):
        code = exc.error_code
        for key, value in exc.headers.items():
            response[key] = value
    else:
        code = _CODES.get(type(exc), getattr(exc, "default_code", "error"))
    detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
    message = " ".join(_flatten(detail))
    response.data = error_body(str(code), message)
    return response


# Django's own handlers, for what never reaches a DRF view: a URL that matches no route
# (e.g. /api/results/<not an id>/) and an error outside a view. Under /api/ they answer
# in the one error shape; elsewhere (admin, media) Django's pages stay.


def _protocol_error(request: HttpRequest, status: int, code: str, message: str) -> HttpResponse | None:
    """Under a foreign protocol's prefix (/v1/, /sdapi/, /models/): that protocol's shape."""
    from .middleware import protocol_error

    return protocol_error(request.path, status, code, message)


def not_found_view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return _protocol_error(request, 404, "not_found", "Not Found") or defaults.page_not_found(request, exception)


def bad_request_view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = "The request was refused as malformed or unsafe."
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("bad_request", message), status=400)
    return _protocol_error(request, 400, "bad_request", message) or defaults.bad_request(request, exception)


def permission_denied_view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("permission_denied", "Permission denied."), status=403)
    return defaults.permission_denied(request, exception)


def server_error_view(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("internal_error", "The server hit an unexpected error."), status=500)
    return defaults.server_error(request)
