"""QUEUE=celery against a real Redis and real `celery worker` processes sharing the test database.

The worker processes are killed with SIGKILL in the middle of a job: the job must be retried
and finish with exactly one set of images, or fail ``worker_lost`` after MAX_ATTEMPTS, and
never stay ``running``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from api.models import Generation, Status
from api.services.executors import set_executor
from api.services.liveness import parse_worker
from tests.conftest import require_service

REDIS_URL = "redis://127.0.0.1:6379/15"
ROOT = Path(__file__).resolve().parents[2]
SLOW = {"width": 64, "height": 64, "steps": 150}


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_env(application_name: str = "") -> dict[str, str]:
    """Points a worker process at the database this test is using (on PostgreSQL, with its
    sessions named ``application_name`` when given)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return {"DATABASE_URL": "", "SQLITE_PATH": str(db["NAME"])}
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return {"DATABASE_URL": url + (f"?application_name={application_name}" if application_name else "")}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Worker:
    """A `celery -A config worker` process on the test's queue, database and media folder."""

    def __init__(self, queue: str, log_dir: Path) -> None:
        self.queue = queue
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="config.settings_test",
            ENV_FILE="none",
            QUEUE="celery",
            CELERY_BROKER_URL=REDIS_URL,
            CELERY_DEFAULT_QUEUE=self.queue,
            MEDIA_ROOT=str(settings.MEDIA_ROOT),
            TINY_MODELS_DIR=str(settings.ENGINE.tiny_models_dir),
            MAX_ATTEMPTS=str(settings.MAX_ATTEMPTS),
            PROGRESS_MIN_INTERVAL="0",
            JOB_RECOVERY_INTERVAL="3600",
            PYTHONUNBUFFERED="1",
            **database_env(self.queue),
        )
        return env

    def start(self, pool: str = "solo") -> None:
        self.starts += 1
        log = self.log_dir / f"worker-{self.starts}.log"
        self.log = log
        cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", pool, "--concurrency", "1"]
        cmd += ["-Q", self.queue, "-n", f"{self.queue}-{self.starts}@%h", "--loglevel", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        wait_for(
            "the worker to be ready", lambda: self._alive() and " ready." in log.read_text(errors="replace"), 90, 0.1
        )

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"worker exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}"
            )
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        # A prefork child left behind dies with its parent's pipe; reap what we started.
        self.proc.wait(30)
        self.proc = None


@pytest.fixture
def celery_mode(live_db, settings, tiny_model_dirs, tmp_path) -> Iterator[Worker]:
    """The web side in QUEUE=celery on a queue of its own, plus a worker to start."""
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    from api.services.celery_executor import CeleryExecutor
    from config.celery import make_app

    queue = f"test-{uuid.uuid4().hex[:10]}"
    settings.QUEUE = "celery"
    settings.CELERY_BROKER_URL = REDIS_URL
    settings.CELERY_DEFAULT_QUEUE = queue
    settings.MAX_ATTEMPTS = 2
    previous = set_executor(CeleryExecutor(app=make_app(REDIS_URL)))
    worker = Worker(queue, tmp_path)
    try:
        yield worker
    finally:
        worker.stop()
        set_executor(previous)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


@pytest.fixture
def no_model_in_web(monkeypatch):  # noqa: ANN001, ANN201
    """In celery mode the web process must never load a model."""
    from backend.manager import ModelManager

    def refuse(self, model_id):  # noqa: ANN001, ANN202
        raise AssertionError(f"the web process tried to load {model_id}")

    monkeypatch.setattr(ModelManager, "get", refuse)


def row(generation_id: str) -> Generation:
    return Generation.objects.get(pk=generation_id)


def pngs(generation_id: str) -> list[str]:
    folder = Path(settings.MEDIA_ROOT) / "generations" / str(generation_id)
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


def running_with_progress(generation_id: str, attempt: int) -> Generation | None:
    g = row(generation_id)
    if g.status == Status.RUNNING and g.attempts == attempt and (g.progress or {}).get("step", 0) >= 1:
        return g
    assert g.status in (Status.QUEUED, Status.RUNNING), (g.status, g.error)
    return None


# --- the broker is down ---------------------------------------------------------------------


@pytest.mark.usefixtures("live_db")
def test_broker_down_gives_a_clear_503_and_leaves_no_row(api, settings, no_model_in_web):
    from api.services.celery_executor import CeleryExecutor
    from config.celery import make_app

    settings.QUEUE = "celery"
    previous = set_executor(CeleryExecutor(app=make_app(f"redis://127.0.0.1:{closed_port()}/0")))
    try:
        started = time.monotonic()
        r = api.post("/api/txt2img/", {"prompt": "x", "async": True}, format="json")
        took = time.monotonic() - started
    finally:
        set_executor(previous)
    assert r.status_code == 503, r.content
    assert r.json()["error"]["code"] == "queue_unavailable"
    assert "queue" in r.json()["error"]["message"]
    assert r["Retry-After"]
    assert took < 15
    assert Generation.objects.count() == 0


# --- a worker at work ------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_jobs_run_on_the_worker_sync_wait_progress_cancel(api, celery_mode, settings, no_model_in_web):
    worker = celery_mode
    worker.start()
    # The finish must wake the waiting request over pub/sub, long before a database poll would.
    settings.SYNC_POLL_INTERVAL = 60
    r = api.post(
        "/api/txt2img/", {"prompt": "a lighthouse", "seed": 5, "steps": 4, "width": 64, "height": 64}, format="json"
    )
    answered = timezone.now()
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["status"] == "succeeded" and len(body["images"]) == 1
    done = row(body["id"])
    # Measured from the job's end (not the request's start, which includes the worker's first
    # model load): a poll would have slept up to 60 s; the pub/sub wake-up comes at once.
    assert (answered - done.finished_at).total_seconds() < 20
    assert done.worker.startswith("celery@") and done.attempts == 1
    assert parse_worker(done.worker).pid != os.getpid()

    # A second delivery of the same message (a redelivery) finds the job done and does nothing.
    from api.services.executors import get_executor

    get_executor().submit(body["id"])

    # Async: 202 at once, progress while running, then a cancel that stops it between steps.
    r = api.post("/api/txt2img/", {"prompt": "slow", "seed": 6, "async": True, **SLOW}, format="json")
    assert r.status_code == 202 and r["Location"].endswith(f"/api/results/{r.json()['id']}/")
    slow_id = r.json()["id"]
    wait_for("progress", lambda: running_with_progress(slow_id, 1))
    progress = api.get(f"/api/results/{slow_id}/").json()["progress"]
    assert progress["total_steps"] == 150 and 1 <= progress["step"] <= 150
    assert progress["fraction"] == pytest.approx(progress["step"] / 150, abs=1e-3)
    r = api.post(f"/api/results/{slow_id}/cancel/")
    assert r.status_code in (200, 202), r.content
    wait_for("the cancel", lambda: row(slow_id).status == Status.CANCELLED, 60)
    assert pngs(slow_id) == [] and not row(slow_id).images.exists()
    assert api.post(f"/api/results/{slow_id}/cancel/").status_code == 409

    # The duplicate message was handled before the slow job (one queue, one worker, FIFO).
    again = row(body["id"])
    assert again.status == Status.SUCCEEDED and again.attempts == 1 and again.finished_at == done.finished_at
    assert pngs(body["id"]) == ["0-5.png"]


@pytest.mark.redis
@pytest.mark.slow
def test_sigkilled_worker_job_is_retried_after_restart_with_one_set_of_images(api, celery_mode, no_model_in_web):
    worker = celery_mode
    worker.start()
    body = {"prompt": "retry me", "seed": 11, "num_images": 2, "async": True, **SLOW, "steps": 40}
    r = api.post("/api/txt2img/", body, format="json")
    assert r.status_code == 202
    gid = r.json()["id"]
    wait_for("the first attempt to be under way", lambda: running_with_progress(gid, 1))
    worker.kill()

    # With no worker alive the job is still marked running: nobody has looked yet.
    assert row(gid).status == Status.RUNNING and row(gid).attempts == 1

    worker.start()  # its start-up pass finds the dead worker's job and sends it again
    wait_for("the retry to finish", lambda: row(gid).status in (Status.SUCCEEDED, Status.FAILED), 300, 0.1)
    done = row(gid)
    assert done.status == Status.SUCCEEDED, done.error
    assert done.attempts == 2
    assert [(i.index, i.seed) for i in done.images.all()] == [(0, 11), (1, 12)]
    assert pngs(gid) == ["0-11.png", "1-12.png"]


@pytest.mark.redis
@pytest.mark.slow
def test_a_job_that_kills_its_worker_every_time_fails_worker_lost_after_max_attempts(api, celery_mode, settings):
    worker = celery_mode
    # prefork: the pool child runs the job, the parent outlives it and hands the message back.
    worker.start(pool="prefork")
    r = api.post("/api/txt2img/", {"prompt": "poison", "seed": 21, "async": True, **SLOW}, format="json")
    gid = r.json()["id"]
    killed = []
    for attempt in range(1, settings.MAX_ATTEMPTS + 1):
        try:
            running = wait_for(f"attempt {attempt}", lambda a=attempt: running_with_progress(gid, a))
        except AssertionError as exc:
            g = row(gid)
            log = worker.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}; the row: {g.status} attempt {g.attempts} {g.worker}\n{log}") from None
        pid = parse_worker(running.worker).pid
        assert pid != worker.proc.pid and pid not in killed
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    wait_for("the job to fail", lambda: row(gid).status != Status.RUNNING, 120, 0.1)
    failed = row(gid)
    assert failed.status == Status.FAILED
    assert failed.error["code"] == "worker_lost"
    assert failed.attempts == settings.MAX_ATTEMPTS
    assert pngs(gid) == [] and not failed.images.exists()
    got = api.get(f"/api/results/{gid}/").json()
    assert got["status"] == "failed" and got["error"]["code"] == "worker_lost"

    # Not requeued forever: nothing is left in the queue, and the job stays failed.
    import redis

    time.sleep(1.0)
    assert redis.Redis.from_url(REDIS_URL).llen(worker.queue) == 0
    assert row(gid).status == Status.FAILED and row(gid).attempts == settings.MAX_ATTEMPTS


@pytest.mark.redis
def test_a_queued_job_whose_message_was_lost_is_sent_again(celery_mode, settings):
    """Redis restarted without persistence, or the web process died between commit and send."""
    import redis

    from api.services.celery_executor import recover_orphans
    from api.services.jobs import generation_create
    from backend.params import GenerationParams

    params = GenerationParams(
        kind="txt2img", model_id="tiny-sd", prompt="x", width=64, height=64, steps=2, guidance_scale=7.0, seed=1
    )
    generation, _ = generation_create(params=params)
    client = redis.Redis.from_url(REDIS_URL)
    assert client.llen(celery_mode.queue) == 1
    client.delete(celery_mode.queue)  # the message is gone; the row still says queued

    assert recover_orphans()["resent"] == []  # not yet stale: it may just be waiting its turn
    Generation.objects.filter(pk=generation.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_AFTER + 1)
    )
    assert recover_orphans()["resent"] == [generation.pk]
    assert client.llen(celery_mode.queue) == 1
    assert recover_orphans()["resent"] == []  # its queue holds a message now: nothing to resend
    Generation.objects.filter(pk=generation.pk).update(status=Status.CANCELLED)


@pytest.mark.redis
@pytest.mark.slow
def test_the_worker_runs_queued_compatible_jobs_as_one_call_and_their_messages_find_them_done(
    api, celery_mode, no_model_in_web
):
    worker = celery_mode
    worker.start()
    # Keep the worker busy while four compatible jobs queue up behind the slow one.
    r = api.post("/api/txt2img/", {"prompt": "slow", "seed": 6, "async": True, **SLOW}, format="json")
    slow_id = r.json()["id"]
    wait_for("the slow job to run", lambda: running_with_progress(slow_id, 1))
    body = {"steps": 3, "width": 64, "height": 64, "async": True}
    ids = [
        api.post("/api/txt2img/", {"prompt": f"scene {i}", "seed": 40 + i, **body}, format="json").json()["id"]
        for i in range(4)
    ]
    assert api.post(f"/api/results/{slow_id}/cancel/").status_code in (200, 202)
    wait_for("the four jobs", lambda: all(row(i).status == Status.SUCCEEDED for i in ids), 120)
    rows = [row(i) for i in ids]
    # The first message's task claimed the other three in one step and ran them in its call.
    assert {g.timings["batch_jobs"] for g in rows} == {4}
    assert len({g.worker for g in rows}) == 1 and all(g.attempts == 1 for g in rows)
    assert [pngs(i) for i in ids] == [[f"0-{40 + n}.png"] for n in range(4)]
    finished = [g.finished_at for g in rows]
    # Their own messages came after and did nothing: nothing ran or changed again.
    time.sleep(1.0)
    assert [row(i).finished_at for i in ids] == finished and all(row(i).attempts == 1 for i in ids)


@pytest.mark.redis
@pytest.mark.postgres
def test_the_worker_keeps_its_database_session_from_one_job_to_the_next(api, celery_mode, no_model_in_web):
    """Celery's Django fix-up would close the connection before and after every task, so each job
    would open a new session on its device's path; the worker keeps a sound one instead."""
    if connection.vendor != "postgresql":
        pytest.skip(
            f"needs the suite on PostgreSQL (DATABASE_URL=postgres://...) to see sessions; on {connection.vendor}"
        )
    worker = celery_mode
    worker.start()
    body = {"prompt": "a quay", "steps": 2, "width": 64, "height": 64}

    def sessions(started_before: Any = None) -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND backend_start < %s",
                [worker.queue, started_before or timezone.now()],
            )
            return {pid for (pid,) in cursor.fetchall()}

    assert api.post("/api/txt2img/", body | {"seed": 1}, format="json").json()["status"] == "succeeded"
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        between = cursor.fetchone()[0]
    assert api.post("/api/txt2img/", body | {"seed": 2}, format="json").json()["status"] == "succeeded"
    # The session that ran the first job is still open after the second (a new one per task
    # would have been closed at the end of the first).
    kept = wait_for("a session from before the second job", lambda: sessions(between), timeout=10)
    assert len(kept) == 1, kept
