"""QUEUE=celery: /api/status/ and /api/models/ show what the live Celery workers report.

Real `celery worker` processes on Redis publish their snapshot (models, device plan, GPUs,
current job); a SIGKILLed worker drops out once its snapshot expires, a cleanly stopped one
at once; with the broker down the status still answers, degraded.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from api.services.executors import set_executor
from api.services.liveness import parse_worker
from tests.api.test_celery_worker import REDIS_URL, SLOW, Worker, closed_port, redis_reachable, wait_for
from tests.conftest import require_service

pytestmark = pytest.mark.usefixtures("live_db")


class StatusWorker(Worker):
    """A worker with its own heartbeat cadence (so its snapshot's lifetime) and preloads."""

    def __init__(self, queue: str, log_dir: Any, **extra_env: str) -> None:
        super().__init__(queue, log_dir)
        self.extra_env = extra_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}


@pytest.fixture
def celery_web(settings, tiny_model_dirs, tmp_path) -> Iterator[Callable[..., StatusWorker]]:
    """The web side in QUEUE=celery on a queue of its own; yields a maker of workers on it."""
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    from api.services.celery_executor import CeleryExecutor
    from config.celery import make_app

    queue = f"test-{uuid.uuid4().hex[:10]}"
    settings.QUEUE = "celery"
    settings.CELERY_BROKER_URL = REDIS_URL
    settings.CELERY_DEFAULT_QUEUE = queue
    previous = set_executor(CeleryExecutor(app=make_app(REDIS_URL)))
    workers: list[StatusWorker] = []

    def make(**extra_env: str) -> StatusWorker:
        worker = StatusWorker(queue, tmp_path / f"w{len(workers)}", **extra_env)
        worker.log_dir.mkdir()
        workers.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in workers:
            worker.stop()
        set_executor(previous)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def status(api) -> dict[str, Any]:  # noqa: ANN001
    r = api.get("/api/status/")
    assert r.status_code == 200, r.content
    assert_matches_schema("/api/status/", r)
    return r.json()


def models(api) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    r = api.get("/api/models/")
    assert r.status_code == 200, r.content
    assert_matches_schema("/api/models/", r)
    return {m["id"]: m for m in r.json()}


def entry_on(api, queue: str, check: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any] | None:  # noqa: ANN001
    """This test's worker in /api/status/ (other tests' workers may share the Redis)."""
    for entry in status(api)["workers"]:
        if entry["queues"] == [queue] and check(entry):
            return entry
    return None


_SCHEMA: Any = None


def assert_matches_schema(path: str, response: Any) -> None:
    """The response as the OpenAPI schema says (schemathesis' own response check)."""
    global _SCHEMA
    import schemathesis
    from drf_spectacular.generators import SchemaGenerator

    if _SCHEMA is None:
        raw = SchemaGenerator().get_schema(request=None, public=True)
        _SCHEMA = schemathesis.openapi.from_dict(json.loads(json.dumps(raw, default=str)))
    from schemathesis.core.transport import Response

    fake = Response(
        status_code=response.status_code,
        headers={"Content-Type": [response["Content-Type"]]},
        content=response.content,
        request=requests.Request("GET", f"http://testserver{path}").prepare(),
        elapsed=0.0,
        verify=True,
    )
    _SCHEMA[path]["GET"].validate_response(fake)


# --- real workers --------------------------------------------------------------------------------


@pytest.mark.redis
def test_status_shows_a_live_worker_its_model_facts_and_job_then_drops_it_when_killed(api, celery_web):
    import torch

    worker = celery_web(JOB_HEARTBEAT_INTERVAL="0.5", PRELOAD_MODELS="tiny-sd")
    worker.start()
    queue = worker.queue
    entry = wait_for(
        "the worker with its preloaded model",
        lambda: entry_on(api, queue, lambda e: "tiny-sd" in e["loaded_models"]),
        60,
        0.1,
    )

    assert entry["name"].startswith("celery@")
    assert parse_worker(entry["name"]).pid == worker.proc.pid == entry["pid"]  # solo: the worker runs jobs
    assert entry["node"] == f"{queue}-1@{socket.gethostname()}"
    assert entry["hostname"] == socket.gethostname()
    assert entry["mode"] == "local"
    assert entry["loaded_models"] == ["tiny-sd"]
    assert entry["device"]["device"] == "cpu" and entry["device"]["dtype"] == "fp32"
    facts = entry["system_info"]
    assert facts["pytorch_version"] == torch.__version__
    assert facts["cuda_available"] is False and facts["device_count"] == 0 and facts["devices"] == []
    assert entry["current_job"] is None
    seen = datetime.fromisoformat(entry["updated_at"])
    assert abs((datetime.now(UTC) - seen).total_seconds()) < 5

    body = status(api)
    assert body["status"] == "ok" and body["inference_available"] is True
    assert body["queue_backend"] == "celery" and "detail" not in body
    assert "tiny-sd" in body["loaded_models"]
    assert body["device"] is None  # the web process runs no inference
    assert body["system_info"]["devices_from"] == "web"  # no worker has a GPU here

    listed = models(api)
    assert listed["tiny-sd"]["loaded"] is True and entry["name"] in listed["tiny-sd"]["loaded_on"]
    assert entry["name"] not in listed["tiny-sdxl"]["loaded_on"]

    # While a job runs, the worker names it.
    r = api.post("/api/txt2img/", {"prompt": "slow", "seed": 3, "async": True, **SLOW}, format="json")
    assert r.status_code == 202, r.content
    job = r.json()["id"]
    wait_for("the running job in the status", lambda: entry_on(api, queue, lambda e: e["current_job"] == job), 30, 0.1)
    assert api.post(f"/api/results/{job}/cancel/").status_code in (200, 202)
    wait_for(
        "the job to be gone from the status", lambda: entry_on(api, queue, lambda e: e["current_job"] is None), 30, 0.1
    )

    # Another model, loaded by a job, shows up.
    r = api.post("/api/txt2img/", {"prompt": "x", "model_id": "tiny-sdxl", "steps": 2, "seed": 1}, format="json")
    assert r.status_code == 200, r.content
    wait_for(
        "tiny-sdxl on the worker", lambda: entry_on(api, queue, lambda e: "tiny-sdxl" in e["loaded_models"]), 10, 0.1
    )
    assert entry["name"] in models(api)["tiny-sdxl"]["loaded_on"]

    # SIGKILL: no goodbye; the snapshot expires after 3 x 0.5 s.
    worker.kill()
    killed = time.monotonic()
    wait_for("the killed worker to drop out", lambda: entry_on(api, queue) is None, 10, 0.1)
    assert time.monotonic() - killed < 5
    listed = models(api)
    assert entry["name"] not in listed["tiny-sd"]["loaded_on"] + listed["tiny-sdxl"]["loaded_on"]


@pytest.mark.redis
def test_a_prefork_worker_reports_after_each_job_and_leaves_at_once_on_a_clean_stop(api, celery_web):
    # A 30 s beat (90 s lifetime): anything seen sooner comes from the job's own report and
    # from the shutdown, not from the beat or the expiry.
    worker = celery_web(JOB_HEARTBEAT_INTERVAL="30")
    worker.start(pool="prefork")
    queue = worker.queue
    entry = wait_for("the worker's first report", lambda: entry_on(api, queue), 60, 0.1)
    child = parse_worker(entry["name"]).pid
    assert child == entry["pid"] and child != worker.proc.pid  # the pool child runs the jobs, not the parent
    assert entry["node"] == f"{queue}-1@{socket.gethostname()}"
    assert entry["loaded_models"] == []

    started = time.monotonic()
    r = api.post("/api/txt2img/", {"prompt": "x", "steps": 2, "seed": 1}, format="json")
    assert r.status_code == 200, r.content
    wait_for(
        "the model after the job", lambda: entry_on(api, queue, lambda e: e["loaded_models"] == ["tiny-sd"]), 10, 0.1
    )
    assert time.monotonic() - started < 25

    worker.proc.send_signal(signal.SIGTERM)  # warm shutdown: the child, then the parent, exit
    stopped = time.monotonic()
    wait_for("the stopped worker to drop out", lambda: entry_on(api, queue) is None, 20, 0.1)
    assert time.monotonic() - stopped < 20
    worker.proc.wait(30)


# --- the web side alone --------------------------------------------------------------------------


def test_broker_down_status_answers_degraded_and_models_answer(api, settings):
    from api.services.celery_executor import CeleryExecutor
    from config.celery import make_app

    settings.QUEUE = "celery"
    previous = set_executor(CeleryExecutor(app=make_app(f"redis://127.0.0.1:{closed_port()}/0")))
    try:
        started = time.monotonic()
        body = status(api)
        listed = models(api)
        took = time.monotonic() - started
    finally:
        set_executor(previous)
    assert took < 10
    assert body["status"] == "degraded" and body["inference_available"] is False
    assert body["workers"] == [] and body["loaded_models"] == []
    assert "broker" in body["detail"]
    assert "127.0.0.1" not in body["detail"] and "redis://" not in body["detail"]
    assert all(m["loaded"] is False and m["loaded_on"] == [] for m in listed.values())


def gpu_snapshot(name: str, models: list[str], gpus: list[str], *, job: str | None = None) -> dict[str, Any]:
    devices = [
        {
            "index": i,
            "name": gpu,
            "capability": "9.0",
            "total_memory_mb": 81559,
            "free_memory_mb": 70000,
            "allocated_memory_mb": 5000,
            "reserved_memory_mb": 6000,
        }
        for i, gpu in enumerate(gpus)
    ]
    return {
        "name": name,
        "node": name.split(":")[0].replace("celery@", "gpu@"),
        "hostname": "gpu-box",
        "pid": 4242,
        "queues": ["generations"],
        "mode": "local",
        "loaded_models": models,
        "device": {
            "device": "cuda:0" if gpus else "cpu",
            "dtype": "fp16" if gpus else "fp32",
            "attention_slicing": False,
            "vae_slicing": False,
            "vae_tiling": False,
            "cpu_offload": "off",
            "notes": [],
        },
        "system_info": {
            "python_version": "3.11.9",
            "pytorch_version": "2.13.0+cu128",
            "cuda_available": bool(gpus),
            "cuda_version": "12.8" if gpus else None,
            "cudnn_version": 91000 if gpus else None,
            "device_count": len(gpus),
            "devices": devices,
            "platform": "linux",
        },
        "current_job": job,
        "started_at": datetime.now(UTC).isoformat(),
        "updated_at": datetime.now(UTC).isoformat(),
        "something_newer": {"ignored": True},
    }


@pytest.mark.redis
def test_gpu_facts_and_models_come_from_the_workers_snapshots(api, settings, monkeypatch):
    """Snapshots as GPU workers would write them, under a key prefix of this test's own."""
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    import redis

    from api.services import celery_executor
    from api.services.celery_executor import CeleryExecutor
    from config.celery import make_app

    prefix = f"test-worker-status-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setattr(celery_executor, "WORKER_KEY_PREFIX", prefix)
    settings.QUEUE = "celery"
    previous = set_executor(CeleryExecutor(app=make_app(REDIS_URL)))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # No worker yet: degraded, and it says why.
        body = status(api)
        assert body["status"] == "degraded" and body["inference_available"] is False
        assert body["workers"] == [] and "No Celery worker is alive" in body["detail"]
        assert body["system_info"]["devices_from"] == "web"

        a = gpu_snapshot("celery@gpu-box:11/abc", ["sdxl-base-1.0", "tiny-sd"], ["NVIDIA H100"], job="j-1")
        b = gpu_snapshot("celery@gpu-box:12/abc", ["tiny-sd"], ["NVIDIA H100", "NVIDIA A100"])
        c = gpu_snapshot("celery@cpu-box:13/def", ["tiny-sdxl"], [])
        for snap in (a, b, c):
            client.set(prefix + snap["name"], json.dumps(snap), ex=30)
        client.set(prefix + "garbage", b"not json", ex=30)
        client.set(prefix + "nameless", json.dumps({"queues": []}), ex=30)

        body = status(api)
        assert body["status"] == "ok" and body["inference_available"] is True and "detail" not in body
        assert [w["name"] for w in body["workers"]] == [c["name"], a["name"], b["name"]]
        assert body["loaded_models"] == ["sdxl-base-1.0", "tiny-sd", "tiny-sdxl"]
        by_name = {w["name"]: w for w in body["workers"]}
        assert by_name[a["name"]]["current_job"] == "j-1" and by_name[b["name"]]["current_job"] is None
        assert by_name[a["name"]]["device"]["dtype"] == "fp16"
        assert "something_newer" not in by_name[a["name"]]
        assert by_name[b["name"]]["system_info"]["device_count"] == 2

        info = body["system_info"]
        assert info["devices_from"] == "workers"
        assert info["cuda_available"] is True and info["cuda_version"] == "12.8"
        assert info["device_count"] == 3
        assert [(d["worker"], d["index"], d["name"]) for d in info["devices"]] == [
            (a["name"], 0, "NVIDIA H100"),
            (b["name"], 0, "NVIDIA H100"),
            (b["name"], 1, "NVIDIA A100"),
        ]
        import torch

        assert info["pytorch_version"] == torch.__version__  # the rest is still the web process

        listed = models(api)
        assert listed["tiny-sd"]["loaded"] is True and listed["tiny-sd"]["loaded_on"] == [a["name"], b["name"]]
        assert listed["sdxl-base-1.0"]["loaded_on"] == [a["name"]]
        assert listed["tiny-sdxl"]["loaded_on"] == [c["name"]]
        assert listed["stable-diffusion-v1-5"]["loaded"] is False and listed["stable-diffusion-v1-5"]["loaded_on"] == []
    finally:
        set_executor(previous)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


def test_thread_mode_has_no_worker_fields(api, settings):
    settings.QUEUE = "thread"
    body = status(api)
    assert "workers" not in body and "devices_from" not in body["system_info"]
    assert all("loaded_on" not in m for m in models(api).values())
