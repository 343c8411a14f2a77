"""A job through a crash of PostgreSQL: the server's real processes (gunicorn in QUEUE=thread,
which runs the job itself; or gunicorn in QUEUE=celery plus a ``celery worker``) on a private
PostgreSQL cluster that the test stops in immediate mode, so every connection dies.

Whatever the moment of the crash, the job ends ``succeeded``, with exactly its files and image
rows, within a bounded time; it never stays ``running``, and no job is lost. And the processes
reconnect: the next job runs.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from api.services.worker import DB_RETRY_DELAYS
from tests.api.test_celery_worker import ROOT, wait_for
from tests.faults.app_processes import EnvWorker, WebServer
from tests.faults.services import (
    PrivatePostgres,
    PrivateRedis,
    postgres_bin_dir,
    redis_server_program,
    require_program,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.own_database]

# Long enough that the stop lands while it runs.
SLOW = {"width": 64, "height": 64, "steps": 60}
QUICK = {"width": 64, "height": 64, "steps": 3}
ENDED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    require_program(postgres_bin_dir(), "PostgreSQL's server programs (initdb, pg_ctl)")
    pg = PrivatePostgres()
    try:
        pg.init().start()
        pg.migrate(root=ROOT, python=sys.executable)
        yield pg
    finally:
        pg.destroy()


@dataclass
class App:
    mode: str
    web: WebServer
    media: Path
    worker: EnvWorker | None = None

    def logs(self) -> str:
        text = self.web.log_text()[-4000:]
        if self.worker is not None:
            text += "\n--- worker ---\n" + self.worker.log_text()[-4000:]
        return text

    def logged(self, line: str) -> bool:
        """Whether the process that runs the jobs has logged ``line``."""
        return line in (self.worker.log_text() if self.worker is not None else self.web.log_text())


def start_app(mode: str, pg: PrivatePostgres, tmp_path: Path, **env: str) -> Iterator[App]:
    """The server on the private cluster: gunicorn, and in celery mode a worker on a private Redis."""
    media = tmp_path / "media"
    full = {
        "DATABASE_URL": pg.url,
        "QUEUE": mode,
        "MEDIA_ROOT": str(media),
        "TINY_MODELS_DIR": str(settings.ENGINE.tiny_models_dir),
        "PROGRESS_MIN_INTERVAL": "0",
        "MAX_ATTEMPTS": "2",
        "JOB_HEARTBEAT_INTERVAL": "0.5",
        "JOB_RECOVERY_INTERVAL": "1",
        **env,
    }
    redis: PrivateRedis | None = None
    app: App | None = None
    try:
        if mode == "celery":
            require_program(redis_server_program(), "redis-server")
            redis = PrivateRedis(tmp_path / "redis").start()
            full.update(CELERY_BROKER_URL=redis.url(0), CELERY_DEFAULT_QUEUE=f"faults-{uuid.uuid4().hex[:8]}")
        app = App(mode, WebServer(tmp_path, full), media)
        app.web.start()
        if mode == "celery":
            app.worker = EnvWorker(full["CELERY_DEFAULT_QUEUE"], tmp_path, **full)
            app.worker.start()
        yield app
    finally:
        if app is not None:
            app.web.stop()
            if app.worker is not None:
                app.worker.stop()
        if redis is not None:
            redis.stop()


MODES = ["thread", pytest.param("celery", marks=pytest.mark.redis)]


def job(pg: PrivatePostgres, gid: str) -> dict[str, Any] | None:
    """The row, read straight from the cluster; None while it is down."""
    import psycopg

    try:
        rows = pg.query("SELECT status, attempts, error, progress FROM api_generation WHERE id = %s", gid)
    except psycopg.OperationalError:
        return None
    if not rows:
        return {"status": "deleted"}
    status, attempts, error, progress = rows[0]
    return {"status": status, "attempts": attempts, "error": error, "progress": progress or {}}


def images(pg: PrivatePostgres, gid: str) -> list[tuple[int, int]]:
    return pg.query("SELECT index, seed FROM api_generatedimage WHERE generation_id = %s ORDER BY index", gid)


def pngs(app: App, gid: str) -> list[str]:
    folder = app.media / "generations" / gid
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


def submit_slow(app: App, pg: PrivatePostgres, seed: int) -> str:
    status, body = app.web.request("POST", "/api/txt2img/", {"prompt": "slow", "seed": seed, "async": True, **SLOW})
    assert status == 202, body
    gid = body["id"]

    def mid_steps() -> bool:
        row = job(pg, gid)
        assert row is None or row["status"] in ("queued", "running"), (row, app.logs())
        return bool(row) and row["status"] == "running" and row["progress"].get("step", 0) >= 2

    wait_for("the job to be mid-steps", mid_steps, 120, 0.05)
    return gid


def wait_until_ended(app: App, pg: PrivatePostgres, gid: str, timeout: float) -> dict[str, Any]:
    try:
        wait_for("the job to end", lambda: (job(pg, gid) or {}).get("status") in ENDED, timeout, 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {job(pg, gid)}\n{app.logs()}") from None
    row = job(pg, gid)
    assert row is not None
    return row


def assert_succeeded_whole(app: App, pg: PrivatePostgres, gid: str, row: dict[str, Any], seed: int) -> None:
    """Succeeded with exactly its one image: one image row, one file."""
    assert row["status"] == "succeeded", (row, app.logs())
    assert images(pg, gid) == [(0, seed)]
    assert pngs(app, gid) == [f"0-{seed}.png"]


def assert_next_job_runs(app: App, seed: int) -> None:
    """A synchronous request after the restart: the web process and the worker reconnected."""
    status, body = app.web.request("POST", "/api/txt2img/", {"prompt": "after", "seed": seed, **QUICK}, timeout=90)
    assert status == 200, (body, app.logs())
    assert body["status"] == "succeeded" and [i["seed"] for i in body["images"]] == [seed]


@pytest.fixture(params=MODES)
def app(request, private_pg, tiny_model_dirs, tmp_path) -> Iterator[App]:  # noqa: ANN001
    yield from start_app(request.param, private_pg, tmp_path, JOB_STALE_AFTER="60")


def test_a_job_running_through_a_restart_ends_and_the_next_one_runs(app: App, private_pg: PrivatePostgres) -> None:
    gid = submit_slow(app, private_pg, seed=3)
    private_pg.restart()
    row = wait_until_ended(app, private_pg, gid, 60)
    assert_succeeded_whole(app, private_pg, gid, row, seed=3)
    # Its worker lived on through the restart: its own attempt ended it.
    assert row["attempts"] == 1, (row, app.logs())
    assert_next_job_runs(app, seed=4)


def test_a_job_that_ends_while_the_database_is_down_is_written_once_it_is_back(
    app: App, private_pg: PrivatePostgres
) -> None:
    gid = submit_slow(app, private_pg, seed=5)
    private_pg.stop("immediate")
    try:
        # The device is done, the image is on disk, and the write of the job's end failed.
        wait_for(
            "the end's write to fail",
            lambda: app.logged(f"ending generation {gid}: the database is unavailable"),
            120,
            0.1,
        )
    finally:
        private_pg.start()
    row = wait_until_ended(app, private_pg, gid, 60)
    assert_succeeded_whole(app, private_pg, gid, row, seed=5)
    # Written by the attempt that made it, once the database was back: not run a second time.
    assert row["attempts"] == 1, (row, app.logs())
    assert_next_job_runs(app, seed=6)


@pytest.fixture(params=MODES)
def app_quick_to_recover(request, private_pg, tiny_model_dirs, tmp_path) -> Iterator[App]:  # noqa: ANN001
    yield from start_app(request.param, private_pg, tmp_path, JOB_STALE_AFTER="3")


def test_jobs_the_worker_could_not_write_for_long_are_recovered_and_none_is_lost(
    app_quick_to_recover: App, private_pg: PrivatePostgres
) -> None:
    app = app_quick_to_recover
    gid = submit_slow(app, private_pg, seed=7)
    status, body = app.web.request("POST", "/api/txt2img/", {"prompt": "behind", "seed": 9, "async": True, **QUICK})
    assert status == 202, body
    behind = body["id"]
    private_pg.stop("immediate")
    try:
        # Down for longer than the worker goes on trying to write the first job's end, and to
        # claim the one queued behind it.
        gave_up = f"generation {gid}: its end could not be written to the database"
        wait_for("the worker to give up writing the end", lambda: app.logged(gave_up), 120, 0.1)
        last_try = (
            f"claiming generation {behind}: the database is unavailable; trying again in {DB_RETRY_DELAYS[-1]:g}s"
        )
        wait_for("the claim of the next job to fail", lambda: app.logged(last_try), 60, 0.1)
        time.sleep(DB_RETRY_DELAYS[-1] + 1.5)  # its last try fails at once: the port is closed
    finally:
        private_pg.start()
    row = wait_until_ended(app, private_pg, gid, 60)
    # Its worker gave up writing; recovery found the row's heartbeat stale and ran it again.
    assert_succeeded_whole(app, private_pg, gid, row, seed=7)
    assert row["attempts"] == 2, (row, app.logs())
    # The one behind it stayed queued in its row, and ran once the database was back (thread:
    # it waited in the worker's line; celery: its message was spent, and recovery sent it again).
    row = wait_until_ended(app, private_pg, behind, 60)
    assert_succeeded_whole(app, private_pg, behind, row, seed=9)
    assert row["attempts"] == 1, (row, app.logs())
    assert_next_job_runs(app, seed=8)
