"""Backpressure over real HTTP to a live server with its real worker thread.

A slow job keeps the worker busy, so whatever comes after it stays queued: past
MAX_QUEUED_JOBS every protocol answers 503 ``queue_full`` in its own shape with Retry-After
and creates nothing; past MAX_SYNC_WAITERS the native API answers 202 (the job runs) and the
foreign protocols 503 ``too_many_sync_requests`` before creating anything; reads keep
answering throughout. The slow job is cancelled at the end, so no test waits for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from api.models import Generation, Status
from api.services import backpressure, jobs
from tests.api.test_async_progress_cancel import wait_for
from tests.api.test_idempotency_race import post_together
from tests.conftest import png_of

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")

TIMEOUT = 120
# Longer than any test here even on an idle machine (500 steps of 4 images; DDIM's 1000 train
# steps allow at most 500 with its offset); cancelled at its next step when the test ends.
BLOCKER = {"prompt": "keeps the worker busy", "width": 128, "height": 128, "steps": 500, "num_images": 4}
SMALL = {"width": 64, "height": 64, "steps": 2}


def native(base: str, body: dict[str, Any], *, path: str = "/api/txt2img/", **kwargs: Any) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=TIMEOUT, **kwargs)


def foreign(base: str, protocol: str) -> httpx.Response:
    """One generate request of each foreign protocol, as its clients send it."""
    if protocol == "openai":
        body: dict[str, Any] = {"prompt": "a fox", "size": "64x64", "steps": 2}
        return httpx.post(base + "/v1/images/generations", json=body, timeout=TIMEOUT)
    if protocol == "openai-stream":
        body = {"prompt": "a fox", "size": "64x64", "steps": 2, "stream": True}
        return httpx.post(base + "/v1/images/generations", json=body, timeout=TIMEOUT)
    if protocol == "a1111":
        return httpx.post(base + "/sdapi/v1/txt2img", json={"prompt": "a fox", **SMALL}, timeout=TIMEOUT)
    assert protocol == "hf"
    body = {"inputs": "a fox", "parameters": {"num_inference_steps": 2, "width": 64, "height": 64}}
    return httpx.post(base + "/models/tiny-sd", json=body, timeout=TIMEOUT)


FOREIGN = ("openai", "openai-stream", "a1111", "hf")


def retry_after(response: httpx.Response) -> int:
    value = response.headers.get("Retry-After")
    assert value is not None and value.isdigit(), (response.status_code, response.headers, response.text)
    seconds = int(value)
    assert backpressure.RETRY_AFTER_MIN_S <= seconds <= backpressure.RETRY_AFTER_MAX_S
    return seconds


def message_of(protocol: str, response: httpx.Response) -> str:
    """The protocol's own error shape, checked, and the message in it."""
    body = response.json()
    if protocol.startswith("openai"):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == "server_error" and body["error"]["param"] is None
        assert "x-should-retry" not in response.headers  # the SDK may retry, after Retry-After
        return body["error"]["message"]
    if protocol == "a1111":
        assert set(body) == {"error", "detail", "body", "errors"}, body
        return body["detail"]
    if protocol == "hf":
        assert body["error_type"] == "overloaded", body
        assert body["estimated_time"] == float(response.headers["Retry-After"])
        return body["error"]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["message"]


def code_of(protocol: str, response: httpx.Response) -> str | None:
    body = response.json()
    if protocol.startswith("openai"):
        return body["error"]["code"]
    if protocol == "native":
        return body["error"]["code"]
    return None  # A1111 and HF have no code field: the message says it


def reads_answer(base: str) -> None:
    for path in ("/api/health/", "/api/results/?page_size=5", "/api/status/"):
        r = httpx.get(base + path, timeout=TIMEOUT)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])


def queued() -> int:
    return Generation.objects.filter(status=Status.QUEUED).count()


def input_files() -> set[Path]:
    folder = Path(django_settings.MEDIA_ROOT) / "inputs"
    return set(folder.rglob("*")) if folder.exists() else set()


@pytest.fixture
def busy_worker(live_server, settings) -> Iterator[str]:  # noqa: ANN001
    """The worker runs BLOCKER until the test ends; jobs created meanwhile stay queued."""
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_STEPS": 500}
    settings.BATCH_MAX_IMAGES = 1  # nothing joins the running job
    r = native(live_server.url, {**BLOCKER, "async": True})
    assert r.status_code == 202, r.text
    blocker = r.json()["id"]
    wait_for(
        "the slow job to start", lambda: Generation.objects.filter(pk=blocker, status=Status.RUNNING).exists(), 600
    )
    try:
        yield blocker
        # Otherwise the queue may have moved under the test, and what it saw proves nothing.
        assert Generation.objects.get(pk=blocker).status == Status.RUNNING, "the slow job ended during the test"
    finally:
        for row in Generation.objects.filter(status__in=[Status.QUEUED, Status.RUNNING]).order_by("-created_at"):
            try:
                jobs.generation_cancel(generation=row)
            except Exception:  # noqa: BLE001 - it finished meanwhile
                pass


# --- MAX_QUEUED_JOBS ------------------------------------------------------------------------


def test_past_max_queued_jobs_every_protocol_answers_503_queue_full_with_retry_after_and_creates_nothing(
    live_server, settings, busy_worker
):
    base = live_server.url
    settings.MAX_QUEUED_JOBS = 3
    # Below the limit: accepted, until the queue holds 3.
    for n in range(3):
        r = native(base, {"prompt": f"queued {n}", "async": True, **SMALL})
        assert r.status_code == 202, r.text
    assert queued() == 3
    rows, files = Generation.objects.count(), input_files()

    # At the limit: every protocol, synchronous or not, is refused before anything is made.
    refused = {
        "native": native(base, {"prompt": "one too many", "async": True, **SMALL}),
        "native-sync": native(base, {"prompt": "one too many", **SMALL}),
        "native-img2img": httpx.post(
            base + "/api/img2img/",
            data={"prompt": "one too many", **{k: str(v) for k, v in SMALL.items()}},
            files={"image": ("in.png", png_of(), "image/png")},
            timeout=TIMEOUT,
        ),
        **{protocol: foreign(base, protocol) for protocol in FOREIGN},
    }
    for name, r in refused.items():
        protocol = "native" if name.startswith("native") else name
        assert r.status_code == 503, (name, r.status_code, r.text[:300])
        retry_after(r)
        message = message_of(protocol, r)
        assert "3 generations waiting" in message and "limit is 3 (MAX_QUEUED_JOBS)" in message, (name, message)
        assert code_of(protocol, r) in ("queue_full", None), name
    assert Generation.objects.count() == rows and queued() == 3
    assert input_files() == files  # the refused img2img left no input image behind
    reads_answer(base)

    # Above the limit (lowered under a queue that holds more): refused as well.
    settings.MAX_QUEUED_JOBS = 2
    r = native(base, {"prompt": "still too many", "async": True, **SMALL})
    assert r.status_code == 503 and "limit is 2" in r.json()["error"]["message"]

    # A place frees up (one queued job cancelled): the next create gets it, and only that one.
    settings.MAX_QUEUED_JOBS = 3
    first = Generation.objects.filter(status=Status.QUEUED).order_by("created_at").first()
    assert httpx.post(f"{base}/api/results/{first.id}/cancel/", timeout=TIMEOUT).status_code == 200
    assert native(base, {"prompt": "got the place", "async": True, **SMALL}).status_code == 202
    assert native(base, {"prompt": "too late", "async": True, **SMALL}).status_code == 503
    # Off (0): no limit.
    settings.MAX_QUEUED_JOBS = 0
    assert native(base, {"prompt": "no limit", "async": True, **SMALL}).status_code == 202


def test_concurrent_creates_never_pass_max_queued_jobs(live_server, settings, busy_worker, monkeypatch):
    """All at once, each lingering between counting the queue and inserting: without the lock
    around the two, they would all count the same queue and all get in."""
    settings.MAX_QUEUED_JOBS = 3
    real_depth = backpressure.queue_depth

    def lingering_depth() -> int:
        depth = real_depth()
        time.sleep(0.2)
        return depth

    monkeypatch.setattr(backpressure, "queue_depth", lingering_depth)
    n = 8
    answers = post_together(
        f"{live_server.url}/api/txt2img/", [({"prompt": f"burst {i}", "async": True, **SMALL}, {}) for i in range(n)]
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 3 + [503] * (n - 3), answers
    assert {body["error"]["code"] for status, body in answers if status == 503} == {"queue_full"}
    assert queued() == 3


def test_an_idempotent_retry_gets_its_job_even_when_the_queue_is_full(live_server, settings, busy_worker):
    settings.MAX_QUEUED_JOBS = 1
    headers = {"Idempotency-Key": "overload-retry"}
    first = native(live_server.url, {"prompt": "mine", "async": True, **SMALL}, headers=headers)
    assert first.status_code == 202 and queued() == 1
    again = native(live_server.url, {"prompt": "mine", "async": True, **SMALL}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert native(live_server.url, {"prompt": "another", "async": True, **SMALL}).status_code == 503


# --- MAX_SYNC_WAITERS -----------------------------------------------------------------------


def test_past_max_sync_waiters_native_answers_202_and_foreign_protocols_503_before_creating(
    live_server, settings, busy_worker
):
    base = live_server.url
    settings.MAX_SYNC_WAITERS = 2
    assert backpressure.sync_waiters_held() == 0
    waiting: list[httpx.Response] = []

    def wait_synchronously(n: int) -> None:
        waiting.append(native(base, {"prompt": f"waits {n}", **SMALL}))

    holders = [threading.Thread(target=wait_synchronously, args=(n,)) for n in range(2)]
    for thread in holders:
        thread.start()
    wait_for(
        "two synchronous requests to wait for their jobs",
        lambda: backpressure.sync_waiters_held() == 2 and queued() == 2,
        TIMEOUT,
    )
    rows = Generation.objects.count()

    # Native: answered like an async request; the job is created and will run.
    r = native(base, {"prompt": "no place to wait", **SMALL})
    assert r.status_code == 202, r.text
    assert r.headers["Location"].endswith(f"/api/results/{r.json()['id']}/")
    assert r.json()["status"] == "queued"
    assert Generation.objects.filter(pk=r.json()["id"], status=Status.QUEUED).exists()
    rows += 1

    # Foreign: refused in the protocol's shape, nothing created.
    for protocol in FOREIGN:
        r = foreign(base, protocol)
        assert r.status_code == 503, (protocol, r.status_code, r.text[:300])
        retry_after(r)
        message = message_of(protocol, r)
        assert "holds 2 requests open" in message and "limit is 2 (MAX_SYNC_WAITERS)" in message, message
        assert code_of(protocol, r) in ("too_many_sync_requests", None)
    assert Generation.objects.count() == rows

    # Async requests and reads are not held back.
    assert native(base, {"prompt": "async", "async": True, **SMALL}).status_code == 202
    reads_answer(base)
    assert backpressure.sync_waiters_held() == 2

    # The waiting requests end (their jobs cancelled): their places are given back.
    for row in Generation.objects.filter(status=Status.QUEUED):
        jobs.generation_cancel(generation=row)
    for thread in holders:
        thread.join(TIMEOUT)
    assert [(r.status_code, r.json()["status"]) for r in waiting] == [(200, "cancelled")] * 2
    assert backpressure.sync_waiters_held() == 0


def test_a_stream_holds_its_place_until_it_ends_or_its_client_hangs_up(live_server, settings):
    base = live_server.url
    settings.MAX_SYNC_WAITERS = 1
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_STEPS": 500}
    body = {"prompt": "a fox", "size": "64x64", "stream": True, "steps": 500}
    with httpx.stream("POST", base + "/v1/images/generations", json=body, timeout=TIMEOUT) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())  # the stream is open, its job under way
        assert backpressure.sync_waiters_held() == 1
        r = foreign(base, "hf")
        assert r.status_code == 503 and "MAX_SYNC_WAITERS" in r.json()["error"]
    # Hung up mid-stream: the job is cancelled and the place given back.
    wait_for("the place to be given back", lambda: backpressure.sync_waiters_held() == 0, TIMEOUT)
    wait_for("the job to stop", lambda: not Generation.objects.filter(status__in=["queued", "running"]).exists())

    # Read to its end: given back too.
    with httpx.stream("POST", base + "/v1/images/generations", json={**body, "steps": 2}, timeout=TIMEOUT) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert json.loads(events[-1][5:])["type"] == "image_generation.completed"
    wait_for("the place to be given back", lambda: backpressure.sync_waiters_held() == 0, TIMEOUT)


def test_places_are_given_back_after_answers_and_refusals(live_server, settings, monkeypatch):
    settings.MAX_SYNC_WAITERS = 1
    assert native(live_server.url, {"prompt": "done", **SMALL}).status_code == 200
    assert foreign(live_server.url, "a1111").status_code == 200
    assert backpressure.sync_waiters_held() == 0
    # Refused for a full queue after taking a place: the place is given back all the same.
    settings.MAX_QUEUED_JOBS = 1
    monkeypatch.setattr(backpressure, "queue_depth", lambda: 1)
    for protocol in FOREIGN:
        assert foreign(live_server.url, protocol).status_code == 503
    assert native(live_server.url, {"prompt": "refused", **SMALL}).status_code == 503
    assert backpressure.sync_waiters_held() == 0


# --- Retry-After and settings ---------------------------------------------------------------


@pytest.fixture
def fresh_pace(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(backpressure, "_pace_cache", (float("-inf"), None))


def finished_job(started_s_ago: float, ran_s: float) -> Generation:
    now = timezone.now()
    started = now - timedelta(seconds=started_s_ago)
    return Generation.objects.create(
        kind="txt2img",
        model_id="tiny-sd",
        seed=1,
        status=Status.SUCCEEDED,
        started_at=started,
        finished_at=started + timedelta(seconds=ran_s),
    )


@pytest.mark.usefixtures("fresh_pace")
def test_retry_after_is_the_work_ahead_at_the_recent_pace_within_bounds():
    assert backpressure.retry_after_s(jobs_ahead=10) == backpressure.RETRY_AFTER_UNKNOWN_S  # no data
    # Back to back, 2 s each: 2 s a job.
    for i in range(5):
        finished_job(started_s_ago=100 - 2 * i, ran_s=2)
    backpressure._pace_cache = (float("-inf"), None)
    assert backpressure.seconds_per_job() == pytest.approx(2.0, abs=0.05)
    assert backpressure.retry_after_s(jobs_ahead=10) in (20, 21)
    assert backpressure.retry_after_s(jobs_ahead=0) == backpressure.RETRY_AFTER_MIN_S
    assert backpressure.retry_after_s(jobs_ahead=10_000) == backpressure.RETRY_AFTER_MAX_S


@pytest.mark.usefixtures("fresh_pace")
def test_the_pace_counts_batches_and_idle_gaps_once():
    # A batch of 4 that ran 8 s together: 2 s a job, not 8.
    for _ in range(4):
        finished_job(started_s_ago=60, ran_s=8)
    assert backpressure.seconds_per_job() == pytest.approx(2.0, abs=0.05)
    # Two workers side by side, 4 s a job each: 2 s a job.
    Generation.objects.all().delete()
    for i in range(3):
        finished_job(started_s_ago=60 - 4 * i, ran_s=4)
        finished_job(started_s_ago=60 - 4 * i, ran_s=4)
    assert backpressure.seconds_per_job() == pytest.approx(2.0, abs=0.05)
    Generation.objects.all().delete()
    # Two 1 s jobs ten minutes apart: 1 s a job, not the idle gap.
    finished_job(started_s_ago=700, ran_s=1)
    finished_job(started_s_ago=100, ran_s=1)
    assert backpressure.seconds_per_job() == pytest.approx(1.0, abs=0.05)
    # Jobs older than the window don't count.
    Generation.objects.update(finished_at=timezone.now() - backpressure.PACE_WINDOW - timedelta(minutes=1))
    assert backpressure.seconds_per_job() is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_QUEUED_JOBS": "-1"}, "MAX_QUEUED_JOBS must be >= 0, got -1"),
        ({"MAX_SYNC_WAITERS": "0"}, "MAX_SYNC_WAITERS must be >= 1, got 0"),
    ],
)
def test_bad_values_stop_the_server_at_start_naming_the_variable(env: dict[str, str], message: str):
    code = "import django; django.setup()"
    environ = {**os.environ, "ENV_FILE": "none", "DJANGO_SETTINGS_MODULE": "config.settings", **env}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=django_settings.BASE_DIR,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(("threads", "waiters"), [("1", 1), ("16", 12)])
def test_the_default_max_sync_waiters_leaves_a_quarter_of_the_threads(threads: str, waiters: int):
    code = "from django.conf import settings; print(settings.MAX_SYNC_WAITERS)"
    environ = {**os.environ, "ENV_FILE": "none", "DJANGO_SETTINGS_MODULE": "config.settings"}
    environ.pop("MAX_SYNC_WAITERS", None)
    environ["GUNICORN_THREADS"] = threads
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=django_settings.BASE_DIR, env=environ, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) == waiters
