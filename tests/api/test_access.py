"""API keys, per-key isolation, rate limits, the active-job cap, Idempotency-Key, body size."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import pytest
from django.core.cache import cache
from django.core.management import call_command
from rest_framework.test import APIClient

from api.auth import hash_key
from api.models import ApiKey, Generation


def new_key(name: str = "alice", staff: bool = False) -> str:
    out = io.StringIO()
    with redirect_stderr(io.StringIO()):
        call_command("create_api_key", name, *(["--staff"] if staff else []), stdout=out)
    return out.getvalue().strip()


def client_for(key: str | None) -> APIClient:
    client = APIClient()
    if key:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.mark.django_db
def test_create_api_key_prints_once_and_stores_only_a_hash():
    key = new_key("ci-bot")
    assert key.startswith("sdk_") and len(key) > 40
    row = ApiKey.objects.get(name="ci-bot")
    assert row.key_hash == hash_key(key)
    stored = " ".join(str(getattr(row, f.name)) for f in ApiKey._meta.fields)
    assert key not in stored


@pytest.mark.django_db
def test_auth_required_needs_a_key_everywhere_but_health(settings, tiny_model_dirs):
    settings.AUTH_REQUIRED = True
    anon = client_for(None)
    for path in ("/api/results/", "/api/models/", "/api/status/"):
        r = anon.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "not_authenticated"
        assert r["WWW-Authenticate"].startswith("Bearer")
    r = anon.post("/api/txt2img/", {"prompt": "x"}, format="json")
    assert r.status_code == 401
    assert Generation.objects.count() == 0
    assert anon.get("/api/health/").status_code == 200
    assert client_for("sdk_wrong").get("/api/results/").status_code == 401
    assert client_for(new_key()).get("/api/results/").status_code == 200


@pytest.mark.django_db
def test_revoked_key_is_refused(settings):
    settings.AUTH_REQUIRED = True
    key = new_key("temp")
    assert client_for(key).get("/api/results/").status_code == 200
    call_command("revoke_api_key", "temp", stdout=io.StringIO())
    r = client_for(key).get("/api/results/")
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]


@pytest.mark.usefixtures("live_db")
def test_each_key_sees_and_deletes_only_its_own_results(settings, tiny_model_dirs):
    settings.AUTH_REQUIRED = True
    alice, bob, admin = new_key("alice"), new_key("bob"), new_key("admin", staff=True)
    mine = client_for(alice).post("/api/txt2img/", {"prompt": "alice's", "seed": 1}, format="json").json()
    theirs = client_for(bob).post("/api/txt2img/", {"prompt": "bob's", "seed": 2}, format="json").json()
    listed = client_for(alice).get("/api/results/").json()
    assert [g["id"] for g in listed["results"]] == [mine["id"]]
    assert client_for(alice).get(f"/api/results/{theirs['id']}/").status_code == 404
    assert client_for(alice).delete(f"/api/results/{theirs['id']}/").status_code == 404
    assert client_for(alice).post(f"/api/results/{theirs['id']}/cancel/").status_code == 404
    assert Generation.objects.filter(pk=theirs["id"]).exists()
    staff = client_for(admin).get("/api/results/").json()
    assert {g["id"] for g in staff["results"]} == {mine["id"], theirs["id"]}
    assert client_for(admin).delete(f"/api/results/{theirs['id']}/").status_code == 204


@pytest.mark.django_db
def test_generate_rate_limit_gives_429_with_retry_after(settings):
    settings.RATE_LIMITS = {"generate": "2/minute", "read": ""}
    cache.clear()
    client = client_for(new_key("fast"))
    # Invalid bodies still count against the rate, and create nothing.
    for _ in range(2):
        assert client.post("/api/txt2img/", {"width": 1}, format="json").status_code == 400
    r = client.post("/api/txt2img/", {"prompt": "x"}, format="json")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    assert int(r["Retry-After"]) > 0
    # Another key has its own budget.
    assert client_for(new_key("other")).post("/api/txt2img/", {"width": 1}, format="json").status_code == 400
    assert Generation.objects.count() == 0
    cache.clear()


@pytest.mark.django_db
def test_active_job_cap_is_counted_in_the_database(settings):
    settings.MAX_ACTIVE_JOBS_PER_KEY = 2
    key = new_key("busy")
    row = ApiKey.objects.get(name="busy")
    # Jobs another process queued for this key (rows, not in-memory state).
    for i in range(2):
        Generation.objects.create(
            kind="txt2img", model_id="tiny-sd", seed=i, status="queued" if i else "running", owner=row
        )
    r = client_for(key).post("/api/txt2img/", {"prompt": "x"}, format="json")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "too_many_active_jobs"
    assert "limit is 2" in r.json()["error"]["message"]
    assert r["Retry-After"]
    assert Generation.objects.count() == 2
    Generation.objects.filter(owner=row, status="queued").update(status="succeeded")
    # Below the cap again: accepted (async, so the test doesn't wait on it).
    ok = client_for(key).post("/api/txt2img/", {"prompt": "x", "async": True}, format="json")
    assert ok.status_code == 202


@pytest.mark.usefixtures("live_db")
def test_idempotency_key_returns_the_first_generation(api):
    body = {"prompt": "once", "seed": 5}
    first = api.post("/api/txt2img/", body, format="json", HTTP_IDEMPOTENCY_KEY="req-123")
    again = api.post("/api/txt2img/", body, format="json", HTTP_IDEMPOTENCY_KEY="req-123")
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert Generation.objects.count() == 1
    other = api.post("/api/txt2img/", {"prompt": "different"}, format="json", HTTP_IDEMPOTENCY_KEY="req-123")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert Generation.objects.count() == 1
    fresh = api.post("/api/txt2img/", body, format="json", HTTP_IDEMPOTENCY_KEY="req-456")
    assert fresh.json()["id"] != first.json()["id"]


@pytest.mark.django_db
def test_body_over_the_limit_is_refused_unparsed(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    at_limit = b'{"prompt": "' + b"a" * (1000 - 14) + b'"}'
    assert len(at_limit) == 1000
    r = api.post("/api/txt2img/", data=b'{"prompt": "' + b"a" * 2000 + b'"}', content_type="application/json")
    assert r.status_code == 413
    assert r.json()["error"] == {
        "code": "request_too_large",
        "message": "the request body must be at most 1000 bytes, got 2014",
    }
    assert Generation.objects.count() == 0
    # At the limit the body is parsed (and here refused for the prompt cap, not the size).
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_PROMPT_CHARS": 10}
    assert api.post("/api/txt2img/", data=at_limit, content_type="application/json").status_code == 400
