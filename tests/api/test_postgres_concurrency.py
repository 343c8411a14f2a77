"""On PostgreSQL, concurrent requests against the per-key active-job cap and the unique
Idempotency-Key, over real HTTP to a live server.

PostgreSQL runs these transactions side by side (READ COMMITTED): the cap holds only because
``_check_active_cap`` locks the key's row (``select_for_update``) before it counts, and a
duplicate key is stopped only by the unique index. SQLite serialises every writer with its
database lock, so there these tests would prove nothing: they skip, saying so. Run the suite
with DATABASE_URL=postgres://... to run them (CI does).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from django.db import connection

from api.auth import api_key_create
from api.models import Generation, Status
from api.services import executors, jobs
from api.services.executors import ThreadExecutor, set_executor
from tests.api.test_idempotency_race import BODY, bearer, lookups_held_until, post_together
from tests.conftest import IN_CI

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def on_postgres() -> None:
    if connection.vendor == "postgresql":
        return
    if IN_CI and os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        pytest.fail(f"DATABASE_URL names PostgreSQL but the suite runs on {connection.vendor}")
    pytest.skip(
        f"needs the suite on PostgreSQL (DATABASE_URL=postgres://...); on {connection.vendor} every "
        "writer waits for the database lock, so concurrent creates can't overlap"
    )


class BusyWorker(ThreadExecutor):
    """The real executor with its worker thread busy elsewhere: jobs stay queued, as on a
    server whose device is taken, so the cap counts every job these requests create."""

    def start(self) -> None:
        pass


@pytest.fixture
def busy_worker():  # noqa: ANN201
    previous = set_executor(BusyWorker())
    yield
    set_executor(previous)


@pytest.fixture
def creates_overlap(monkeypatch):  # noqa: ANN001, ANN201
    """Every request reaches the transaction that counts and inserts at the same moment, and
    stays a while between the count and the insert: without the row lock, they would all
    count the same jobs and all insert."""
    parties: dict[str, Any] = {}
    real_get_executor = executors.get_executor
    real_check = jobs._check_active_cap

    def arrive() -> Any:
        parties["gate"].wait()
        return real_get_executor()

    def slow_check(owner: Any, **kwargs: Any) -> None:
        real_check(owner, **kwargs)
        time.sleep(0.2)

    monkeypatch.setattr(executors, "get_executor", arrive)
    monkeypatch.setattr(jobs, "_check_active_cap", slow_check)

    def expect(n: int) -> None:
        parties["gate"] = threading.Barrier(n, timeout=60)

    return expect


def test_concurrent_creates_for_one_key_never_pass_the_active_job_cap(
    live_server, settings, busy_worker, creates_overlap
):
    settings.MAX_ACTIVE_JOBS_PER_KEY = 2
    _, key = api_key_create(name="burst")
    n = 6
    creates_overlap(n)
    answers = post_together(f"{live_server.url}/api/txt2img/", [(BODY, bearer(key))] * n)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202, 202, 429, 429, 429, 429], answers
    refused = [body for status, body in answers if status == 429]
    assert all(body["error"]["code"] == "too_many_active_jobs" for body in refused)
    assert Generation.objects.filter(owner__name="burst", status=Status.QUEUED).count() == 2
    # Another key is not held back by this one's cap, nor by its lock.
    _, other = api_key_create(name="other")
    creates_overlap(1)
    ((status, body),) = post_together(f"{live_server.url}/api/txt2img/", [(BODY, bearer(other))])
    assert status == 202, body


def test_concurrent_twins_make_one_job_on_postgres(live_server, monkeypatch, busy_worker, tiny_model_dirs):
    _, key = api_key_create(name="twins")
    n = 4
    with lookups_held_until(monkeypatch, n) as counts:
        answers = post_together(
            f"{live_server.url}/api/txt2img/", [(BODY, {"Idempotency-Key": "pg-race", **bearer(key)})] * n
        )
    assert [status for status, _ in answers] == [202] * n, answers
    assert len({body["id"] for _, body in answers}) == 1
    assert Generation.objects.count() == 1
    assert counts == {"first": n, "after_conflict": n - 1}
