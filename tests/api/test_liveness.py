"""Liveness of running jobs, on the real worker thread and tiny pipelines.

- While a job runs (model load, steps and saving), its worker's side thread keeps
  ``heartbeat_at`` fresh, so a recovery pass in another process never takes a job that is only
  slow: a job several times longer than JOB_STALE_AFTER runs once.
- The embedded worker keeps recovering after start-up: ``startup()`` starts the periodic loop,
  and the loop finds a job a dead process left running, with nobody calling it by hand.
"""

from __future__ import annotations

import dataclasses
import math
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
from api.services.executors import ThreadExecutor, get_executor
from api.services.jobs import generation_recover
from api.services.liveness import OrphanTest, pid_space
from backend.manager import get_manager
from backend.params import GenerationParams

pytestmark = pytest.mark.usefixtures("live_db")


def folder(generation_id) -> Path:  # noqa: ANN001
    return Path(settings.MEDIA_ROOT) / "generations" / str(generation_id)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def heartbeat_only(settings, monkeypatch):  # noqa: ANN001, ANN201
    """Tiny liveness intervals, and the side thread's heartbeat as the only thing that stamps
    ``heartbeat_at`` during the run: progress writes and previews stamp it too, so they are
    turned down (progress only at the last step, no previews)."""
    settings.JOB_HEARTBEAT_INTERVAL = 0.1
    settings.JOB_STALE_AFTER = 0.5
    settings.PROGRESS_MIN_INTERVAL = 3600.0
    settings.MAX_ATTEMPTS = 2
    manager = get_manager()
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, previews=False))


def steps_lasting(api, seconds: float) -> int:  # noqa: ANN001
    """How many 64x64 steps of tiny-sd take about ``seconds`` on this machine right now."""
    probe = api.post("/api/txt2img/", {"prompt": "probe", "seed": 1, "steps": 4}, format="json").json()
    assert probe["status"] == "succeeded", probe
    per_step = max(probe["timings"]["inference_s"] / 4, 1e-3)
    return min(settings.GENERATION_LIMITS["MAX_STEPS"], max(8, math.ceil(seconds / per_step)))


def test_a_job_slower_than_job_stale_after_keeps_its_heartbeat_and_runs_once(api, heartbeat_only):
    stale = settings.JOB_STALE_AFTER
    steps = steps_lasting(api, 4 * stale)
    r = api.post("/api/txt2img/", {"prompt": "slow", "seed": 3, "steps": steps, "async": True}, format="json")
    assert r.status_code == 202, r.content
    job_id = r.json()["id"]

    # Another process (another machine: it can judge our worker by the heartbeat alone) and this
    # process's own executor both look for orphans throughout the run.
    elsewhere = OrphanTest(me="thread@elsewhere:1/another-box", stale_after=stale)
    beats: list = []
    taken: list = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        row = Generation.objects.filter(pk=job_id).values("status", "heartbeat_at").get()
        if row["status"] in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
            break
        if row["status"] == Status.RUNNING:
            if not beats or row["heartbeat_at"] != beats[-1]:
                beats.append(row["heartbeat_at"])
            outcome = generation_recover(max_attempts=settings.MAX_ATTEMPTS, is_orphaned=elsewhere)
            taken += [pk for ids in outcome.values() for pk in ids]
            outcome = get_executor().recover_once()
            taken += [pk for ids in outcome.values() for pk in ids]
            if taken:
                break
        time.sleep(0.05)

    done = Generation.objects.get(pk=job_id)
    assert done.status == Status.SUCCEEDED, done.error
    assert taken == [], "a recovery pass took a job whose worker was alive"
    assert done.attempts == 1
    assert done.images.count() == 1
    assert sorted(p.name for p in folder(job_id).glob("*.png")) == [f"0-{done.seed}.png"]
    ran = (done.finished_at - done.started_at).total_seconds()
    assert ran > 2 * stale, f"the job ran {ran:.2f}s: not long enough to outlive JOB_STALE_AFTER={stale}"
    # The stamp moved all along: no gap between two beats came near JOB_STALE_AFTER.
    assert len(beats) >= 3, beats
    gaps = [(b - a).total_seconds() for a, b in zip(beats, beats[1:], strict=False)]
    assert max(gaps) < stale, gaps


def test_start_up_starts_the_recovery_loop_and_it_finds_an_orphan_on_its_own(settings):
    settings.JOB_RECOVERY_INTERVAL = 0.1
    settings.MAX_ATTEMPTS = 2
    executor = ThreadExecutor()
    executor.startup()
    try:
        loop = executor._recovery
        assert loop.is_alive() and loop.name == "job-recovery"

        # After start-up, a process on this machine dies holding a job. Its heartbeat is fresh,
        # so only its pid tells that it is gone; nobody calls recover_once().
        params = GenerationParams(
            kind="txt2img",
            model_id="tiny-sd",
            prompt="orphan",
            width=64,
            height=64,
            steps=2,
            guidance_scale=7.0,
            seed=9,
        )
        orphan = Generation.objects.create(
            id=uuid.uuid4(),
            kind="txt2img",
            model_id="tiny-sd",
            params=params.to_dict(),
            seed=9,
            status=Status.RUNNING,
            worker=f"thread@{os.uname().nodename}:{dead_pid()}/{pid_space()}",
            attempts=1,
            started_at=timezone.now(),
            heartbeat_at=timezone.now(),
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            orphan.refresh_from_db()
            if orphan.status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
                break
            time.sleep(0.05)
        assert orphan.status == Status.SUCCEEDED, (orphan.status, orphan.error)
        assert orphan.attempts == 2 and orphan.worker == executor.worker_name
        assert orphan.heartbeat_at - orphan.started_at < timedelta(seconds=60)
        assert orphan.images.count() == 1
    finally:
        stop_recovery_loop(executor)


def stop_recovery_loop(executor: ThreadExecutor) -> None:
    loop = executor._recovery
    executor.stop_recovery()
    assert loop is None or not loop.is_alive(), "the recovery loop did not stop"
