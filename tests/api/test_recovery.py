"""Jobs left ``running`` by a dead worker are retried up to MAX_ATTEMPTS, then fail ``worker_lost``.

Which worker is dead: its pid is gone (same machine and pid namespace), its heartbeat is older
than JOB_STALE_AFTER, or, at start-up, it bears this very process's name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from api.models import Generation, Status
from api.services.jobs import generation_execute, generation_recover
from api.services.liveness import OrphanTest, parse_worker, pid_alive, pid_space, worker_identity
from backend.params import GenerationParams


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def running_row(*, worker: str, attempts: int = 1, heartbeat_age: float = 0.0, steps: int = 2, **fields) -> Generation:  # noqa: ANN003
    params = GenerationParams(
        kind="txt2img",
        model_id="tiny-sd",
        prompt="left behind",
        width=64,
        height=64,
        steps=steps,
        guidance_scale=7.0,
        seed=7,
    )
    beat = timezone.now() - timedelta(seconds=heartbeat_age)
    return Generation.objects.create(
        id=uuid.uuid4(),
        kind="txt2img",
        model_id="tiny-sd",
        params=params.to_dict(),
        seed=7,
        status=Status.RUNNING,
        worker=worker,
        attempts=attempts,
        started_at=beat,
        heartbeat_at=beat,
        **fields,
    )


def folder(generation: Generation) -> Path:
    return Path(settings.MEDIA_ROOT) / "generations" / str(generation.id)


def test_worker_identity_names_this_process():
    me = worker_identity("thread")
    ref = parse_worker(me)
    assert me.startswith("thread@") and ref is not None
    assert ref.pid == os.getpid() and ref.space == pid_space()
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid())
    assert parse_worker("") is None and parse_worker("celery@host") is None


@pytest.mark.django_db
def test_who_counts_as_dead():
    here = pid_space()
    me = worker_identity("thread")
    test = OrphanTest(me=me, stale_after=60)
    at_start = OrphanTest(me=me, stale_after=60, startup=True)

    dead_here = running_row(worker=f"thread@h:{dead_pid()}/{here}")
    alive_here = running_row(worker=f"thread@h:{os.getppid()}/{here}")
    elsewhere_fresh = running_row(worker=f"celery@other:{dead_pid()}/another-box")
    elsewhere_stale = running_row(worker=f"celery@other:{os.getpid()}/another-box", heartbeat_age=61)
    alive_but_silent = running_row(worker=f"thread@h:{os.getppid()}/{here}", heartbeat_age=61)
    mine = running_row(worker=me)
    unparsable = running_row(worker="some-old-name")

    assert test(dead_here)
    assert not test(alive_here)
    assert not test(elsewhere_fresh), "another machine's pids can't be checked from here"
    assert test(elsewhere_stale)
    assert test(alive_but_silent)
    assert not test(mine) and at_start(mine)
    assert not test(unparsable)


@pytest.mark.django_db
def test_recover_requeues_under_the_limit_fails_at_it_and_cancels_when_asked(settings):
    settings.MAX_ATTEMPTS = 2
    gone = f"thread@h:{dead_pid()}/{pid_space()}"
    retry = running_row(worker=gone, attempts=1)
    last = running_row(worker=gone, attempts=2)
    cancelled = running_row(worker=gone, attempts=1, cancel_requested=True)
    alive = running_row(worker=f"thread@h:{os.getppid()}/{pid_space()}")
    for g in (retry, last):
        folder(g).mkdir(parents=True)
        (folder(g) / "0-7.png").write_bytes(b"half written by the dead attempt")

    outcome = generation_recover(max_attempts=2, is_orphaned=OrphanTest(me=worker_identity("thread"), stale_after=60))

    assert outcome == {"requeued": [retry.pk], "failed": [last.pk], "cancelled": [cancelled.pk]}
    retry.refresh_from_db()
    assert retry.status == Status.QUEUED and retry.attempts == 1 and retry.started_at is None and retry.progress is None
    last.refresh_from_db()
    assert last.status == Status.FAILED and last.error["code"] == "worker_lost" and last.finished_at is not None
    cancelled.refresh_from_db()
    assert cancelled.status == Status.CANCELLED
    alive.refresh_from_db()
    assert alive.status == Status.RUNNING
    assert not folder(retry).exists() and not folder(last).exists()

    # A second pass (another process recovering at the same time) finds nothing more to do.
    again = generation_recover(max_attempts=2, is_orphaned=OrphanTest(me=worker_identity("thread"), stale_after=60))
    assert again == {"requeued": [], "failed": [], "cancelled": []}


@pytest.mark.django_db
def test_recover_acts_only_if_the_row_still_holds_the_same_attempt():
    gone = f"thread@h:{dead_pid()}/{pid_space()}"
    g = running_row(worker=gone, attempts=1)

    def taken_over_meanwhile(row: Generation) -> bool:
        # Another process recovered it and a worker claimed it again before this pass wrote.
        Generation.objects.filter(pk=row.pk).update(worker="celery@else:1/x", attempts=2)
        return True

    outcome = generation_recover(max_attempts=2, is_orphaned=taken_over_meanwhile)
    assert outcome == {"requeued": [], "failed": [], "cancelled": []}
    g.refresh_from_db()
    assert g.status == Status.RUNNING and g.attempts == 2


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_lost_its_job_cannot_finish_it(tiny_model_dirs, monkeypatch):
    """The first attempt was presumed dead and the job handed on: its result is not written."""
    g = running_row(worker="x", steps=2)
    Generation.objects.filter(pk=g.pk).update(status=Status.QUEUED)
    from api.services import jobs

    real_claim = jobs.generation_claim

    def claim_then_lose(**kwargs):  # noqa: ANN003, ANN202
        ok = real_claim(**kwargs)
        # Recovered and claimed by another worker right after this one claimed it.
        Generation.objects.filter(pk=g.pk).update(worker="celery@else:1/x", attempts=5)
        return ok

    monkeypatch.setattr(jobs, "generation_claim", claim_then_lose)
    status = generation_execute(generation_id=g.pk, worker=worker_identity("thread"))
    g.refresh_from_db()
    assert status == Status.CANCELLED
    assert g.status == Status.RUNNING and g.worker == "celery@else:1/x" and not g.images.exists()


@pytest.mark.usefixtures("live_db")
def test_thread_worker_start_up_retries_or_fails_jobs_a_dead_process_left_running(api, settings):
    from api.services.executors import ThreadExecutor, get_executor

    settings.MAX_ATTEMPTS = 2
    gone = f"thread@{os.uname().nodename}:{dead_pid()}/{pid_space()}"
    retry = running_row(worker=gone, attempts=1)
    exhausted = running_row(worker=gone, attempts=2)
    folder(retry).mkdir(parents=True)
    (folder(retry) / "0-999.png").write_bytes(b"left by the dead attempt")

    executor = get_executor()
    assert isinstance(executor, ThreadExecutor)
    executor.startup()

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        retry.refresh_from_db()
        if retry.status not in (Status.QUEUED, Status.RUNNING):
            break
        time.sleep(0.05)
    assert retry.status == Status.SUCCEEDED, retry.error
    assert retry.attempts == 2 and retry.worker == executor.worker_name
    assert sorted(p.name for p in folder(retry).glob("*.png")) == ["0-7.png"]
    exhausted.refresh_from_db()
    assert exhausted.status == Status.FAILED and exhausted.error["code"] == "worker_lost"
    body = api.get(f"/api/results/{exhausted.pk}/").json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
    assert "http_status" not in body["error"]
