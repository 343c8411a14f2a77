"""The OpenAPI schema and its Swagger UI are API endpoints like the others: with
AUTH_REQUIRED=true they need a key (README_BACKEND.md, "Access"); without it they are open."""

from __future__ import annotations

import pytest

from api.auth import api_key_create

pytestmark = pytest.mark.django_db

PAGES = ("/api/schema/", "/api/schema/?format=json", "/api/docs/")


@pytest.mark.parametrize("path", PAGES)
def test_with_keys_required_the_schema_and_docs_answer_401_without_a_key(client, settings, path):
    settings.AUTH_REQUIRED = True
    r = client.get(path)
    assert r.status_code == 401, (path, r.status_code, r.content[:200])
    assert r["WWW-Authenticate"].startswith("Bearer")
    # Nothing of the schema leaks into the refusal.
    assert b"openapi" not in r.content and b"/api/txt2img/" not in r.content
    if "format=json" in path:
        assert r.json()["error"]["code"] == "not_authenticated"
    wrong = client.get(path, HTTP_AUTHORIZATION="Bearer sdk_not-a-key")
    assert wrong.status_code == 401 and b"openapi" not in wrong.content


def test_with_keys_required_a_key_opens_the_schema_and_docs(client, settings):
    settings.AUTH_REQUIRED = True
    _, key = api_key_create(name="docs-reader")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    schema = client.get("/api/schema/?format=json", **auth)
    assert schema.status_code == 200
    body = schema.json()
    assert body["openapi"].startswith("3.") and "/api/txt2img/" in body["paths"]
    docs = client.get("/api/docs/", **auth)
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


def test_without_keys_required_the_schema_and_docs_are_open(client, settings):
    settings.AUTH_REQUIRED = False
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200 and "/api/txt2img/" in schema.json()["paths"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


def test_health_stays_open_with_keys_required(client, settings):
    settings.AUTH_REQUIRED = True
    assert client.get("/api/health/").json() == {"status": "ok"}
