"""Idempotency-Key under concurrent requests, over real HTTP to a live server, and its scope.

Several requests with one key arrive together: all of them find no job on their first look,
all try to insert, the unique index lets one in, and the others (the ``IntegrityError`` branch
of ``generation_create``) answer with the winner's job. One job, one id for all.

A key is scoped to its API key: the same Idempotency-Key from two keys is two jobs.

To make the race certain rather than lucky, the server threads are held at one point (each
request's first look-up has found nothing) until all of them have reached it; the look-up, the
insert and the unique index are the real ones. Runs on the suite's database: SQLite, or
PostgreSQL with DATABASE_URL.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from api.auth import api_key_create
from api.models import Generation
from api.services import jobs

pytestmark = pytest.mark.usefixtures("live_db")

BODY = {"prompt": "once only", "seed": 5, "steps": 2, "async": True}


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_together(url: str, requests: list[tuple[dict[str, Any], dict[str, str]]]) -> list[tuple[int, dict]]:
    """Send every request at once, each from its own thread; answers in the same order."""
    start = threading.Barrier(len(requests))
    answers: list[Any] = [None] * len(requests)

    def send(i: int) -> None:
        body, headers = requests[i]
        start.wait()
        try:
            answers[i] = post(url, body, headers)
        except Exception as exc:  # noqa: BLE001 - reported below as that request's answer
            answers[i] = (0, {"exception": repr(exc)})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return answers


@contextmanager
def lookups_held_until(monkeypatch: pytest.MonkeyPatch, parties: int) -> Iterator[dict[str, int]]:
    """Hold each request after its first Idempotency-Key look-up until ``parties`` requests
    have made theirs; count the first look-ups and the second ones (the IntegrityError branch)."""
    real = jobs._idempotent_match
    gate = threading.Barrier(parties, timeout=60)
    counts = {"first": 0, "after_conflict": 0}
    lock = threading.Lock()
    mine = threading.local()  # the live server answers each request on a thread of its own

    def held(**kwargs: Any) -> Generation | None:
        found = real(**kwargs)
        if getattr(mine, "looked", False):
            with lock:
                counts["after_conflict"] += 1
            return found
        mine.looked = True
        with lock:
            counts["first"] += 1
        gate.wait()
        return found

    monkeypatch.setattr(jobs, "_idempotent_match", held)
    yield counts


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize("with_key", [False, True], ids=["anonymous", "api-key"])
def test_concurrent_requests_with_one_idempotency_key_make_one_job(live_server, monkeypatch, tiny_model_dirs, with_key):
    key = api_key_create(name="racer")[1] if with_key else None
    n = 4
    url = f"{live_server.url}/api/txt2img/"
    with lookups_held_until(monkeypatch, n) as counts:
        answers = post_together(url, [(BODY, {"Idempotency-Key": "race-1", **bearer(key)})] * n)

    assert all(status in (200, 202) for status, _ in answers), answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1, answers
    assert Generation.objects.count() == 1
    assert str(Generation.objects.get().pk) in ids
    # All n looked first and found nothing; all but the winner then lost on the unique index.
    assert counts == {"first": n, "after_conflict": n - 1}


def test_a_concurrent_twin_gets_the_job_even_at_the_active_job_cap(live_server, monkeypatch, settings, tiny_model_dirs):
    """With one slot left, the twin of the request that took it is not refused for the cap its
    own job fills: it gets that job, as a retry after it would."""
    settings.MAX_ACTIVE_JOBS_PER_KEY = 1
    _, key = api_key_create(name="retrier")
    url = f"{live_server.url}/api/txt2img/"
    with lookups_held_until(monkeypatch, 2):
        answers = post_together(url, [(BODY, {"Idempotency-Key": "retry-1", **bearer(key)})] * 2)
    assert [status for status, _ in answers] != [429, 429], answers
    assert all(status in (200, 202) for status, _ in answers), answers
    assert answers[0][1]["id"] == answers[1][1]["id"]
    assert Generation.objects.count() == 1


def test_the_same_idempotency_key_from_two_api_keys_is_two_jobs(api, tiny_model_dirs):
    _, alice = api_key_create(name="alice")
    _, bob = api_key_create(name="bob")

    def send(key: str | None, body: dict[str, Any]):  # noqa: ANN202
        headers = {"HTTP_IDEMPOTENCY_KEY": "shared-key"}
        if key:
            headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        return api.post("/api/txt2img/", body, format="json", **headers)

    a = send(alice, BODY)
    # Another key, another body, the same Idempotency-Key: not a reuse (no 422), a job of its own.
    b = send(bob, BODY | {"prompt": "bob's own"})
    anonymous = send(None, BODY)
    assert (a.status_code, b.status_code, anonymous.status_code) == (202, 202, 202), (a.content, b.content)
    ids = [r.json()["id"] for r in (a, b, anonymous)]
    assert len(set(ids)) == 3
    owners = dict(Generation.objects.values_list("id", "owner__name"))
    assert [owners[uuid.UUID(i)] for i in ids] == ["alice", "bob", None]
    # Each key's retry gets its own job back.
    assert send(alice, BODY).json()["id"] == ids[0]
    assert send(bob, BODY | {"prompt": "bob's own"}).json()["id"] == ids[1]
    assert send(None, BODY).json()["id"] == ids[2]
    # Alice's key reused with Bob's body is a reuse within her scope: refused.
    reused = send(alice, BODY | {"prompt": "bob's own"})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert Generation.objects.count() == 3


def test_two_api_keys_racing_with_one_idempotency_key_get_a_job_each(live_server, monkeypatch, tiny_model_dirs):
    keys = [api_key_create(name=name)[1] for name in ("alice", "bob")]
    url = f"{live_server.url}/api/txt2img/"
    with lookups_held_until(monkeypatch, 2) as counts:
        answers = post_together(url, [(BODY, {"Idempotency-Key": "same", **bearer(k)}) for k in keys])
    assert [status for status, _ in answers] == [202, 202], answers
    assert answers[0][1]["id"] != answers[1][1]["id"]
    assert sorted(Generation.objects.values_list("owner__name", flat=True)) == ["alice", "bob"]
    assert counts == {"first": 2, "after_conflict": 0}
