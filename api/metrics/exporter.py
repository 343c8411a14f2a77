"""A worker's own /metrics, for a worker on a machine of its own (WORKER_METRICS_PORT): the
files of this worker's processes only, behind METRICS_TOKEN when it is set."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import scrape

log = logging.getLogger("api.metrics")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def make_app(folder: Path, tag: str, token: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refused = _refusal(environ.get("HTTP_AUTHORIZATION", ""), token)
        if refused is not None:
            start_response(
                "401 Unauthorized",
                [("Content-Type", "application/json"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [json.dumps({"error": refused}).encode()]
        body, content_type = scrape.render_own(folder, tag)
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    return app


def _refusal(header: str, token: str) -> dict[str, str] | None:
    if not token:
        return None
    scheme, _, presented = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
        return None
    if not header:
        return {
            "code": "not_authenticated",
            "message": "/metrics needs METRICS_TOKEN: send 'Authorization: Bearer <token>'",
        }
    return {
        "code": "authentication_failed",
        "message": "/metrics needs METRICS_TOKEN; the bearer token sent is not valid",
    }


def serve(*, port: int, addr: str, folder: Path, tag: str, token: str) -> WSGIServer:
    """Serve on a daemon thread; returns the server (its port, when ``port`` was 0)."""
    httpd = make_server(addr, port, make_app(folder, tag, token), server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    log.info("worker metrics on http://%s:%d/metrics", addr, httpd.server_port)
    return httpd
