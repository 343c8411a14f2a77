"""A Hugging Face Inference API look-alike on 127.0.0.1, for tests that use the real client.

It checks the protocol the way the service does (one model path, ``Authorization: Bearer
<token>``, a JSON body with ``inputs`` and ``parameters``), records every request, and answers
from a per-test script of replies, then with PNG bytes. The PNG's colour depends on the prompt
and seed, so like a real model the same request gives the same image and another seed another.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from PIL import Image

DEFAULT_PATH = "/models/remote-test/sd"


@dataclass
class Reply:
    """One scripted answer. ``body=None`` with status 200 means: a PNG made from the request."""

    status: int = 200
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait this long before answering (stop() cuts it short)
    size: tuple[int, int] | None = None  # PNG size; default: what the request asked for

    @classmethod
    def png(cls, *, size: tuple[int, int] | None = None) -> Reply:
        return cls(size=size)

    @classmethod
    def error(cls, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> Reply:
        body = json.dumps({"error": message, **extra}).encode()
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def raw(cls, body: bytes, content_type: str = "text/html; charset=utf-8", status: int = 200) -> Reply:
        return cls(status=status, body=body, content_type=content_type)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Reply:
        return cls(delay_s=seconds)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def png_for(payload: dict[str, Any], size: tuple[int, int]) -> bytes:
    parameters = payload.get("parameters") or {}
    key = json.dumps([str(payload.get("inputs"))[:64], parameters.get("prompt"), parameters.get("seed")])
    r, g, b = hashlib.sha256(key.encode()).digest()[:3]
    buf = io.BytesIO()
    Image.new("RGB", size, (r, g, b)).save(buf, format="PNG")
    return buf.getvalue()


def requested_size(payload: dict[str, Any]) -> tuple[int, int]:
    parameters = payload.get("parameters") or {}
    target = parameters.get("target_size") or {}
    width = parameters.get("width") or target.get("width") or 64
    height = parameters.get("height") or target.get("height") or 64
    return int(width), int(height)


class FakeInferenceServer:
    """``with FakeInferenceServer(token="hf_x") as server: ... server.url ... server.requests``."""

    def __init__(self, *, token: str | None = None, path: str = DEFAULT_PATH, echo_credentials: bool = False) -> None:
        self.token = token
        self.path = path
        # A careless service that repeats the credentials it got in its error bodies.
        self.echo_credentials = echo_credentials
        self.requests: list[RecordedRequest] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeInferenceServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval keeps stop() (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-inference-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeInferenceServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base(self) -> str:
        assert self._httpd is not None, "start() first"
        return f"http://127.0.0.1:{self._httpd.server_port}"

    @property
    def url(self) -> str:
        return self.base + self.path

    # -- behaviour ---------------------------------------------------------------------------
    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order; PNGs after that."""
        with self._lock:
            self._script.extend(replies)

    def always(self, reply: Reply, times: int = 50) -> None:
        self.script(*([reply] * times))

    @property
    def bodies(self) -> list[Any]:
        return [r.json for r in self.requests]

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else Reply.png()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        request = RecordedRequest(
            method=h.command,
            path=h.path,
            headers={k.lower(): v for k, v in h.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        with self._lock:
            self.requests.append(request)

        if h.command != "POST":
            return self._send(h, Reply.error(405, "Method not allowed"))
        if h.path != self.path:
            return self._send(h, Reply.error(404, f"Model {h.path} does not exist"))
        if self.token is not None and request.authorization != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header"
            if self.echo_credentials:
                message += f" (got {request.authorization!r})"
            return self._send(h, Reply.error(401, message))
        payload = request.json
        if (
            not isinstance(payload, dict)
            or "inputs" not in payload
            or not isinstance(payload.get("parameters", {}), dict)
        ):
            return self._send(h, Reply.error(400, "Body must be JSON with 'inputs' and 'parameters'"))

        reply = self._next_reply()
        if reply.delay_s:
            self._stopping.wait(reply.delay_s)
        if reply.status == 200 and reply.body is None:
            reply = Reply(
                body=png_for(payload, reply.size or requested_size(payload)),
                content_type="image/png",
                headers=reply.headers,
            )
        self._send(h, reply)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, reply: Reply) -> None:
        body = reply.body or b""
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            h.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer
