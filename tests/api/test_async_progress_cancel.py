"""Jobs a frontend can follow and stop: async 202, the sync time limit, progress, cancel."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from api.models import Generation, Status
from api.services.jobs import _ProgressWriter

SLOW = {"width": 64, "height": 64, "steps": 150}

pytestmark = pytest.mark.usefixtures("live_db")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def get(api, generation_id: str) -> dict[str, Any]:  # noqa: ANN001
    r = api.get(f"/api/results/{generation_id}/")
    assert r.status_code == 200
    return r.json()


def under_way(api, generation_id: str) -> dict[str, Any] | None:  # noqa: ANN001
    body = get(api, generation_id)
    return body if body["status"] == "running" and (body["progress"] or {}).get("step", 0) >= 1 else None


def files_of(generation_id: str) -> list[Path]:
    folder = Path(settings.MEDIA_ROOT) / "generations" / generation_id
    return list(folder.iterdir()) if folder.exists() else []


@pytest.fixture
def vae_decodes(monkeypatch) -> list[int]:  # noqa: ANN001
    """Counts VAE decodes of the tiny model: a cancelled job must stop before decoding."""
    from backend.manager import get_manager

    vae = get_manager().get("tiny-sd").txt2img.vae
    calls: list[int] = []
    real = vae.decode

    def decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    return calls


def test_progress_queue_position_and_cancel_of_queued_and_running_jobs(api, vae_decodes):
    slow = api.post("/api/txt2img/", {"prompt": "slow", "seed": 1, "async": True, **SLOW}, format="json")
    assert slow.status_code == 202, slow.content
    assert slow["Location"].endswith(f"/api/results/{slow.json()['id']}/")
    waiting = api.post(
        "/api/txt2img/", {"prompt": "behind it", "seed": 2, "steps": 2}, format="json", HTTP_PREFER="respond-async"
    )
    assert waiting.status_code == 202
    slow_id, waiting_id = slow.json()["id"], waiting.json()["id"]

    running = wait_for("progress of the slow job", lambda: under_way(api, slow_id))
    progress = running["progress"]
    assert set(progress) == {"step", "total_steps", "fraction"}
    assert progress["total_steps"] == 150 and 1 <= progress["step"] <= 150
    assert progress["fraction"] == pytest.approx(progress["step"] / 150, abs=1e-3)
    queued = get(api, waiting_id)
    assert queued["status"] == "queued" and queued["progress"] == {"queue_position": 1}

    # A queued job is cancelled on the spot and never runs.
    r = api.post(f"/api/results/{waiting_id}/cancel/")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    # A running job stops at its next step: no VAE decode, no images, no files.
    r = api.post(f"/api/results/{slow_id}/cancel/")
    assert r.status_code in (200, 202), r.content
    wait_for("the running job to stop", lambda: get(api, slow_id)["status"] == "cancelled", 30)
    stopped = Generation.objects.get(pk=slow_id)
    assert stopped.progress["step"] < 150
    assert not stopped.images.exists() and files_of(slow_id) == []
    assert vae_decodes == []
    assert get(api, slow_id)["images"] == []

    # The worker moves on; the cancelled queued job was never started.
    done = api.post("/api/txt2img/", {"prompt": "next", "seed": 3, "steps": 2}, format="json")
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    never = Generation.objects.get(pk=waiting_id)
    assert never.status == Status.CANCELLED and never.started_at is None and never.attempts == 0
    assert files_of(waiting_id) == []

    # Cancelling what is already finished is a clear 409, for every final status.
    for gid in (slow_id, waiting_id, done.json()["id"]):
        r = api.post(f"/api/results/{gid}/cancel/")
        assert r.status_code == 409, r.content
        assert r.json()["error"]["code"] == "already_finished"
    assert Generation.objects.get(pk=done.json()["id"]).status == Status.SUCCEEDED


def test_sync_request_past_the_time_limit_gets_202_and_the_work_goes_on(api, settings):
    settings.SYNC_TIMEOUT = 0.3
    started = time.monotonic()
    r = api.post("/api/txt2img/", {"prompt": "takes a while", "seed": 4, **SLOW}, format="json")
    assert time.monotonic() - started < 10
    assert r.status_code == 202, r.content
    body = r.json()
    assert body["status"] in ("queued", "running")
    assert r["Location"].endswith(f"/api/results/{body['id']}/")

    first = wait_for("progress", lambda: under_way(api, body["id"]))["progress"]["step"]

    def moved_on() -> dict[str, Any] | None:
        now = get(api, body["id"])
        return now if now["status"] != "running" or now["progress"]["step"] > first else None

    assert wait_for("more progress", moved_on)["status"] in ("running", "succeeded")
    api.post(f"/api/results/{body['id']}/cancel/")  # done proving it went on; free the worker


def test_progress_writes_are_throttled(settings):
    g = Generation.objects.create(
        kind="txt2img", model_id="tiny-sd", params={}, seed=1, status=Status.RUNNING, started_at=timezone.now()
    )
    settings.PROGRESS_MIN_INTERVAL = 60.0
    writer = _ProgressWriter(g.pk)
    with CaptureQueriesContext(connection) as writes:
        for step in range(1, 101):
            writer(step, 100)
    # The first step, then nothing for a minute, except the last step, which always lands.
    assert len([q for q in writes.captured_queries if q["sql"].startswith("UPDATE")]) == 2
    g.refresh_from_db()
    assert g.progress == {"step": 100, "total_steps": 100, "fraction": 1.0}

    settings.PROGRESS_MIN_INTERVAL = 0.0
    writer = _ProgressWriter(g.pk)
    with CaptureQueriesContext(connection) as writes:
        for step in range(1, 11):
            writer(step, 10)
    assert len([q for q in writes.captured_queries if q["sql"].startswith("UPDATE")]) == 10
    Generation.objects.filter(pk=g.pk).update(status=Status.CANCELLED)
