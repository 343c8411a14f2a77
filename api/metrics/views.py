"""GET /metrics: Prometheus' text format, for a scraper holding METRICS_TOKEN or an API key."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions

from ..auth import ApiKeyAuthentication
from ..exceptions import error_body

CHALLENGE = 'Bearer realm="metrics"'


def metrics_view(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        response = JsonResponse(
            error_body("method_not_allowed", f"/metrics answers GET only, got {request.method}"), status=405
        )
        response["Allow"] = "GET, HEAD"
        return response
    refused = access_refused(request)
    if refused is not None:
        return refused
    # Imported here: a management command that only loads the URLconf makes no metric files.
    from . import scrape

    body, content_type = scrape.render_all()
    return HttpResponse(body, content_type=content_type)


def access_refused(request: HttpRequest) -> HttpResponse | None:
    """None when the request may read the metrics; otherwise the 401 to answer.

    METRICS_TOKEN set: that token (``Authorization: Bearer <token>``) or a valid API key.
    Not set: as the rest of the API, a valid API key when AUTH_REQUIRED, anyone otherwise.
    """
    token = settings.METRICS_TOKEN
    if not token and not settings.AUTH_REQUIRED:
        return None
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.encode(), token.encode()):
        return None
    what = "METRICS_TOKEN or an API key" if token else "an API key"
    try:
        found = ApiKeyAuthentication().authenticate(request)  # type: ignore[arg-type]
    except exceptions.AuthenticationFailed:
        return _refuse("authentication_failed", f"/metrics needs {what}; the bearer token sent is not valid")
    if found is None:
        return _refuse("not_authenticated", f"/metrics needs {what}: send 'Authorization: Bearer <token>'")
    return None


def _refuse(code: str, message: str) -> JsonResponse:
    response = JsonResponse(error_body(code, message), status=401)
    response["WWW-Authenticate"] = CHALLENGE
    return response
