"""A corpus of hostile request bodies sent to every POST endpoint of every protocol over real
HTTP (raw sockets where a client library would refuse to send them): no answer is a 5xx, and a
refused request creates nothing (no row, no input file)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings
from PIL import Image

from api.models import Generation
from tests.conftest import png_of

POST_ENDPOINTS = [
    "/api/txt2img/",
    "/api/img2img/",
    "/api/inpaint/",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/sdapi/v1/png-info",
    "/sdapi/v1/options",
    "/sdapi/v1/interrupt",
    "/models/tiny-sd",
]


def _lying_png() -> bytes:
    """A PNG whose header claims 60000x60000 pixels over a 64x64 image's data."""
    data = bytearray(png_of())
    data[16:20] = (60000).to_bytes(4, "big")
    data[20:24] = (60000).to_bytes(4, "big")
    return bytes(data)


def _jpeg_named_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


def _json(obj: object) -> tuple[str, bytes]:
    return "application/json", json.dumps(obj).encode()


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[str, bytes]:
    boundary = "hostileboundary42"
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", out


CORPUS: dict[str, tuple[str | None, bytes]] = {
    "deep nesting": ("application/json", b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
    "huge numbers": _json({"prompt": "x", "width": 10**400, "steps": 1e308, "seed": -(10**30), "n": 10**20}),
    "long digit string": ("application/json", b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}"),
    "float infinity": ("application/json", b'{"prompt": "x", "guidance_scale": Infinity, "cfg_scale": NaN}'),
    "invalid utf-8": ("application/json", b'{"prompt": "\xff\xfe\xfd"}'),
    "not json at all": ("application/json", b"\x00\x01\x02 garbage"),
    "wrong content type": ("text/plain", json.dumps({"prompt": "x"}).encode()),
    "no content type": (None, json.dumps({"prompt": "x"}).encode()),
    "xml": ("application/xml", b"<prompt>x</prompt>"),
    "array body": _json([{"prompt": "x"}]),
    "empty body": ("application/json", b""),
    "empty multipart": _multipart([]),
    "duplicate multipart parts": _multipart(
        [("prompt", None, b"a"), ("prompt", None, b"b"), ("image", "a.png", png_of()), ("image", "b.png", b"")]
    ),
    "empty file part": _multipart([("prompt", None, b"x"), ("image", "empty.png", b""), ("mask", "m.png", b"")]),
    "header lies about the size": _json(
        {
            "prompt": "x",
            "image": base64.b64encode(_lying_png()).decode(),
            "init_images": [base64.b64encode(_lying_png()).decode()],
        }
    ),
    "jpeg data called png": _multipart([("prompt", None, b"x"), ("image", "photo.png", _jpeg_named_png()[:200])]),
    "bidi and control characters": _json(
        {"prompt": "\u202e\u0000\u0007\u200f evil \x1b[31m", "inputs": "\u202e\u0000"}
    ),
    "path-like names": _json(
        {
            "prompt": "x",
            "model": "../../etc/passwd",
            "model_id": "/etc/passwd",
            "loras": [{"name": "../../../secret", "weight": 1}],
            "sd_model_checkpoint": "..\\..\\windows\\win.ini",
            "override_settings": {"sd_model_checkpoint": "/dev/zero"},
        }
    ),
    "huge nested override": _json({"prompt": "x", "override_settings": {"a": {"b": {"c": [1] * 10000}}}}),
}


def _send(
    base: str, path: str, content_type: str | None, body: bytes, *, length: int | None = None
) -> tuple[int, bytes]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", path, skip_accept_encoding=True)
    if content_type is not None:
        conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(len(body) if length is None else length))
    conn.endheaders()
    conn.send(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _inputs() -> set[str]:
    folder = Path(settings.MEDIA_ROOT) / "inputs"
    return {p.name for p in folder.glob("*")} if folder.exists() else set()


@pytest.mark.usefixtures("live_db")
def test_no_hostile_body_gets_a_5xx_and_a_refused_one_creates_nothing(live_server, tiny_model_dirs, settings):
    settings.RATE_LIMITS = {"generate": "", "read": ""}
    failures: list[str] = []
    for path in POST_ENDPOINTS:
        for name, (content_type, body) in CORPUS.items():
            rows, files = Generation.objects.count(), _inputs()
            status, answer = _send(live_server.url, path, content_type, body)
            if status >= 500:
                failures.append(f"{path} [{name}] -> {status} {answer[:200]!r}")
            elif status >= 400 and (Generation.objects.count() != rows or _inputs() != files):
                failures.append(f"{path} [{name}] -> {status} but created a row or a file")
    assert not failures, "\n".join(failures)


@pytest.mark.usefixtures("live_db")
@pytest.mark.parametrize("path", ["/api/txt2img/", "/v1/images/generations", "/sdapi/v1/txt2img", "/models/tiny-sd"])
def test_a_content_length_that_lies_is_refused_or_times_out_never_a_5xx(live_server, tiny_model_dirs, path):
    body = json.dumps({"prompt": "x", "inputs": "x"}).encode()
    # Claims more than it sends: the server must not wait forever nor crash.
    url = urlparse(live_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body) + 50}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status < 500, answer[:300]
    # Claims less than it sends: the rest is not read as the body.
    status, answer = _send(live_server.url, path, "application/json", body, length=5)
    assert status < 500, answer[:300]
    # A negative or non-numeric length.
    for bad in ("-1", "abc"):
        url = urlparse(live_server.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", bad)
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        assert response.status < 500, (bad, response.status, response.read()[:300])
        conn.close()
    assert Generation.objects.count() == 0
