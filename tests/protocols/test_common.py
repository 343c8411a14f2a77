"""What the protocols share: errors in each one's shape even before a view runs, JSON whatever
Accept says, and Basic credentials read only where a protocol needs them."""

from __future__ import annotations

import base64

import pytest

from api.auth import api_key_create
from api.models import Generation

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/images/generations", lambda b: set(b["error"]) == {"message", "type", "param", "code"}),
        ("/sdapi/v1/txt2img", lambda b: set(b) == {"error", "detail", "body", "errors"}),
        ("/models/tiny-sd", lambda b: isinstance(b["error"], str)),
        ("/api/txt2img/", lambda b: set(b["error"]) == {"code", "message"}),
    ],
)
def test_an_oversized_body_is_refused_in_the_shape_of_the_protocol_it_came_through(client, settings, path, shape):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    r = client.post(path, data=b'{"prompt": "' + b"x" * 200 + b'"}', content_type="application/json")
    assert r.status_code == 413
    body = r.json()
    assert shape(body), body
    assert "at most 100 bytes, got 214" in r.content.decode()
    assert Generation.objects.count() == 0


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/nothing/here", lambda b: b["error"]["type"] == "invalid_request_error"),
        ("/sdapi/v1/nothing", lambda b: b == {"detail": "Not Found"}),
        ("/models/", lambda b: isinstance(b["error"], str)),
        ("/models", lambda b: isinstance(b["error"], str)),
    ],
)
def test_unknown_paths_answer_404_in_the_protocol_shape_not_html(client, path, shape):
    r = client.get(path)
    assert r.status_code == 404
    assert r["Content-Type"].startswith("application/json")
    assert shape(r.json()), r.content


def test_protocol_endpoints_answer_json_even_to_a_browser_accept(client):
    for path in ("/sdapi/v1/samplers", "/v1/models"):
        r = client.get(path, HTTP_ACCEPT="text/html,application/xhtml+xml")
        assert r.status_code == 200 and r["Content-Type"].startswith("application/json"), path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_native_api_ignores_a_proxys_basic_login_with_auth_off(client):
    # A reverse proxy with its own Basic login forwards the header; it is not an API key.
    assert client.get("/api/results/", HTTP_AUTHORIZATION=basic("alice", "proxy-password")).status_code == 200


def test_basic_with_a_key_as_password_authenticates_on_a1111_and_bearer_on_native(client, settings):
    settings.AUTH_REQUIRED = True
    _, key = api_key_create(name="basic")
    assert client.get("/sdapi/v1/options", HTTP_AUTHORIZATION=basic("anyone", key)).status_code == 200
    assert client.get("/sdapi/v1/options", HTTP_AUTHORIZATION=basic("anyone", "sdk_wrong")).status_code == 401
    assert client.get("/sdapi/v1/options").status_code == 401
    assert client.get("/api/results/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    # The native API reads Bearer only.
    assert client.get("/api/results/", HTTP_AUTHORIZATION=basic("anyone", key)).status_code == 401
