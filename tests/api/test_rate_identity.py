"""Who a rate limit counts: a key, or else the client's address, read from X-Forwarded-For only
as many hops back as NUM_PROXIES says proxies stand in front (0: never, since anyone can send
the header). RATE_LIMIT_READ covers the reading endpoints; health is never limited."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from api.auth import api_key_create
from api.models import Generation

pytestmark = pytest.mark.django_db

CLIENT_A, CLIENT_B = "198.51.100.7", "198.51.100.8"
PROXY = "10.0.0.1"


@pytest.fixture(autouse=True)
def read_limit_of_two(settings):  # noqa: ANN001, ANN201
    settings.RATE_LIMITS = {"generate": "", "read": "2/minute"}
    cache.clear()
    yield
    cache.clear()


def proxies(settings, n: int) -> None:  # noqa: ANN001
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": n}


def get(path: str = "/api/results/", *, addr: str, xff: str | None = None, key: str | None = None) -> int:
    client = APIClient(REMOTE_ADDR=addr)
    headers = {}
    if xff is not None:
        headers["HTTP_X_FORWARDED_FOR"] = xff
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client.get(path, **headers).status_code


def test_a_refusal_is_429_in_the_error_shape_with_retry_after():
    assert [get(addr=CLIENT_A) for _ in range(2)] == [200, 200]
    r = APIClient(REMOTE_ADDR=CLIENT_A).get("/api/results/")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    assert 0 < int(r["Retry-After"]) <= 60


def test_without_proxies_a_forged_x_forwarded_for_buys_no_new_budget(settings):
    proxies(settings, 0)
    assert get(addr=CLIENT_A, xff="203.0.113.1") == 200
    assert get(addr=CLIENT_A, xff="203.0.113.2") == 200
    assert get(addr=CLIENT_A, xff="203.0.113.3") == 429
    assert get(addr=CLIENT_A) == 429
    # Each address without a key has a budget of its own.
    assert get(addr=CLIENT_B, xff="203.0.113.1") == 200


def test_behind_one_proxy_the_client_is_the_address_the_proxy_saw(settings):
    proxies(settings, 1)
    # Every request reaches the server from the proxy; the proxy appends the client's address.
    assert get(addr=PROXY, xff=CLIENT_A) == 200
    assert get(addr=PROXY, xff=CLIENT_A) == 200
    assert get(addr=PROXY, xff=CLIENT_A) == 429
    # Another client behind the same proxy is counted apart.
    assert get(addr=PROXY, xff=CLIENT_B) == 200
    # A client that sends its own X-Forwarded-For gets it prefixed to the proxy's entry: forged.
    assert get(addr=PROXY, xff=f"203.0.113.9, {CLIENT_A}") == 429
    assert get(addr=PROXY, xff=f"{CLIENT_B}, {CLIENT_A}") == 429


def test_behind_two_proxies_the_client_is_two_hops_back(settings):
    proxies(settings, 2)
    inner = "10.0.0.2"
    for _ in range(2):
        assert get(addr=PROXY, xff=f"forged, {CLIENT_A}, {inner}") == 200
    assert get(addr=PROXY, xff=f"other-forgery, {CLIENT_A}, {inner}") == 429
    assert get(addr=PROXY, xff=f"{CLIENT_B}, {inner}") == 200


def test_a_key_is_counted_by_the_key_not_by_the_address():
    _, alice = api_key_create(name="alice")
    _, bob = api_key_create(name="bob")
    assert [get(addr=CLIENT_A) for _ in range(2)] == [200, 200]
    assert get(addr=CLIENT_A) == 429
    # The same address with a key: the key's own budget, untouched by the anonymous requests.
    assert get(addr=CLIENT_A, key=alice) == 200
    # The key from another address spends the same budget.
    assert get(addr=CLIENT_B, key=alice) == 200
    assert get(addr=CLIENT_B, key=alice) == 429
    assert get(addr=CLIENT_A, key=bob) == 200
    # ... and the address's anonymous budget was not the key's: CLIENT_B still has its own.
    assert get(addr=CLIENT_B) == 200


def test_rate_limit_read_is_one_budget_over_the_reading_endpoints_and_spares_health_and_generate(settings):
    assert get("/api/models/", addr=CLIENT_A) == 200
    assert get("/api/status/", addr=CLIENT_A) == 200
    for path in ("/api/results/", "/api/models/", "/api/loras/", "/api/status/"):
        assert get(path, addr=CLIENT_A) == 429, path
    assert get("/api/health/", addr=CLIENT_A) == 200
    # Generation has its own limit (RATE_LIMIT_GENERATE, off here): a read budget spent
    # doesn't refuse it (this body is refused for itself, 400, and creates nothing).
    r = APIClient(REMOTE_ADDR=CLIENT_A).post("/api/txt2img/", {"width": 1}, format="json")
    assert r.status_code == 400
    assert Generation.objects.count() == 0


def test_rate_limit_read_empty_means_no_limit(settings):
    settings.RATE_LIMITS = {"generate": "", "read": ""}
    assert {get(addr=CLIENT_A) for _ in range(10)} == {200}


def test_generate_and_read_budgets_are_apart(settings):
    settings.RATE_LIMITS = {"generate": "1/minute", "read": "2/minute"}
    client = APIClient(REMOTE_ADDR=CLIENT_A)
    assert client.post("/api/txt2img/", {"width": 1}, format="json").status_code == 400
    assert client.post("/api/txt2img/", {"width": 1}, format="json").status_code == 429
    assert [get(addr=CLIENT_A) for _ in range(2)] == [200, 200]
    assert get(addr=CLIENT_A) == 429
    assert Generation.objects.count() == 0
