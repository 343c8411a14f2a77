"""What a job costs the device thread besides its pipeline call: jobs run back to back share the
worker thread's database connection (a sound one is kept, a broken one replaced)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from django.db import connection, connections, transaction
from django.db.backends.signals import connection_created

from api.models import Generation, Status
from api.services.worker import WORKER_CONN_MAX_IDLE, close_idle_connection, recycle_connection
from tests.conftest import drain_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def connections_made() -> Iterator[list[str]]:
    """The name of the thread that opened each new database connection."""
    made: list[str] = []

    def record(sender, connection, **_) -> None:  # noqa: ANN001
        made.append(threading.current_thread().name)

    connection_created.connect(record, weak=False)
    try:
        yield made
    finally:
        connection_created.disconnect(record)


def test_jobs_back_to_back_share_the_worker_threads_connection(api, live_db, settings, connections_made, monkeypatch):
    settings.BATCH_MAX_IMAGES = 1  # one pipeline call per job
    # DB_CONN_MAX_AGE=0: every request thread closes its connection at the end of a request;
    # the worker thread still keeps its own from one job to the next.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    body = {"prompt": "a harbour", "width": 64, "height": 64, "async": True}
    # The first job is slow, so the others are queued behind it when it ends.
    ids = [api.post("/api/txt2img/", body | {"steps": 40, "seed": 1}, format="json").data["id"]]
    ids += [api.post("/api/txt2img/", body | {"steps": 2, "seed": s}, format="json").data["id"] for s in (2, 3, 4)]
    drain_worker()
    rows = Generation.objects.filter(pk__in=ids)
    assert sorted(r.status for r in rows) == [Status.SUCCEEDED] * 4
    assert {r.timings["batch_jobs"] for r in rows} == {1}
    # Four jobs, one connection: a new one per job was the cost before.
    assert connections_made.count("generation-worker") == 1, connections_made


def test_a_sound_connection_is_kept_and_one_left_outside_autocommit_is_closed():
    Generation.objects.count()
    raw = connection.connection
    recycle_connection()
    Generation.objects.count()
    assert connection.connection is raw

    connection.set_autocommit(False)  # a job that forgot to restore it
    recycle_connection()
    assert connection.connection is None
    assert Generation.objects.count() == 0  # a new one, in autocommit again
    assert connection.get_autocommit()


def test_a_connection_kept_across_a_pause_is_not_trusted_with_the_next_job():
    """A connection idle for long may have been dropped without a word (a NAT or proxy idle
    timeout); a health check on it would hang. After a pause, the next job starts on a new one."""
    Generation.objects.count()
    raw = connection.connection
    recycle_connection()
    close_idle_connection()  # the next job came at once
    assert connection.connection is raw

    recycle_connection()
    connection.sdapi_idle_since -= WORKER_CONN_MAX_IDLE + 1  # the next job came after a pause
    close_idle_connection()
    assert connection.connection is None
    assert Generation.objects.count() == 0


def test_nothing_is_closed_inside_a_transaction():
    with transaction.atomic():
        Generation.objects.count()
        raw = connection.connection
        recycle_connection()
        close_idle_connection()
        assert connection.connection is raw
        assert Generation.objects.count() == 0


@pytest.mark.postgres
def test_a_kept_connection_that_the_database_dropped_is_replaced_before_its_next_use():
    if connection.vendor != "postgresql":
        pytest.skip(
            f"needs the suite on PostgreSQL (DATABASE_URL=postgres://...) to end a session; on {connection.vendor}"
        )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    recycle_connection()

    # The server ends the session between two jobs (a restart, a failover, an idle timeout).
    def terminate() -> None:
        other = connections.create_connection("default")
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        finally:
            other.close()

    killer = threading.Thread(target=terminate)
    killer.start()
    killer.join()

    # The next job's first query finds it dead (the health check) and connects anew.
    assert Generation.objects.count() == 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid
