"""Counts and times every request by the route it matched (its pattern, never the raw path,
so ids and typos make no new series) and the status code answered."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, resolve

log = logging.getLogger("api.metrics")

UNMATCHED = "unmatched"
_REGEX_ROUTE = re.compile(r"\(\?P<(\w+)>[^)]*\)")


class RequestMetricsMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        # At start-up, not at the first request: this process's metric files are made now, and
        # where it runs jobs itself (QUEUE=thread), model loads are counted from the first.
        from . import recording, registry

        recording.listen_to_models()
        self._requests = registry.REQUESTS
        self._seconds = registry.REQUEST_SECONDS

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        try:
            endpoint = endpoint_of(request)
            self._requests.labels(endpoint, str(response.status_code)).inc()
            self._seconds.labels(endpoint).observe(time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - a metric must never cost a response
            log.warning("metrics: could not record a request", exc_info=True)
        return response


def endpoint_of(request: HttpRequest) -> str:
    """The route pattern the request matched, e.g. ``/api/results/<uuid:pk>/``, or
    ``unmatched``. A request answered before routing (a body over the size limit) is looked up."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        try:
            match = resolve(request.path_info, getattr(request, "urlconf", None))
        except Resolver404:
            return UNMATCHED
    if not match.route:
        return UNMATCHED
    # A regex route reads like a path one: "^results/(?P<pk>[0-9a-f-]+)/$" -> "results/<pk>/".
    return "/" + _REGEX_ROUTE.sub(lambda g: f"<{g[1]}>", match.route).replace("^", "").replace("$", "")
