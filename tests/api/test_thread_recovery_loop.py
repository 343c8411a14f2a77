"""The thread worker keeps recovering orphans after start-up, not only once."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from api.models import Generation
from api.services.executors import ThreadExecutor

pytestmark = pytest.mark.usefixtures("live_db")


def test_a_job_whose_worker_dies_later_is_requeued_by_a_later_pass(tiny_model_dirs):
    params = {
        "kind": "txt2img",
        "model_id": "tiny-sd",
        "prompt": "x",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": 5,
    }
    # Held by a worker in another container whose heartbeat is still fresh: not ours to take.
    row = Generation.objects.create(
        kind="txt2img",
        model_id="tiny-sd",
        params=params,
        seed=5,
        status="running",
        attempts=1,
        worker="thread@elsewhere:4242/0123456789ab",
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
    )
    executor = ThreadExecutor()
    assert executor.recover_once() == {"requeued": [], "failed": [], "cancelled": []}
    assert Generation.objects.get(pk=row.pk).status == "running"
    # Its heartbeat goes stale: the next pass requeues it and this process runs it.
    Generation.objects.filter(pk=row.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    outcome = executor.recover_once()
    assert [str(pk) for pk in outcome["requeued"]] == [str(row.pk)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Generation.objects.get(pk=row.pk).status != "succeeded":
        time.sleep(0.05)
    done = Generation.objects.get(pk=row.pk)
    assert done.status == "succeeded" and done.attempts == 2
    assert done.images.count() == 1
