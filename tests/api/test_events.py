"""Server-sent events of one job over real HTTP: the event order, resume with Last-Event-ID,
pings, the end of the stream, isolation per key, the stream limit, and a Celery worker's job."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

import pytest

from api.models import Generation, Status
from tests.api.test_access import new_key

SLOW = {"width": 64, "height": 64, "steps": 40}


class Stream:
    """A raw SSE client: reads events (and comments) from a real HTTP connection."""

    def __init__(self, base: str, generation_id: str, *, key: str | None = None, last_event_id: str | None = None):
        url = urlparse(base)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", f"/api/results/{generation_id}/events/", headers=headers)
        self.response = self.conn.getresponse()
        self.comments: list[str] = []

    def events(self) -> Any:
        """Yields (event, id, data) until the server ends the stream."""
        event: dict[str, str] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\n")
            if line == "":
                if "event" in event:
                    yield event["event"], int(event["id"]), json.loads(event["data"])
                event = {}
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                name, _, value = line.partition(": ")
                event[name] = value

    def close(self) -> None:
        self.conn.close()


def post(base: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", "/api/txt2img/", body=json.dumps({**body, "async": True}), headers=headers)
    response = conn.getresponse()
    data = json.loads(response.read())
    assert response.status == 202, data
    return data


@pytest.mark.usefixtures("live_db")
def test_a_job_streams_started_progress_with_previews_then_completed_and_the_stream_ends(
    live_server, tiny_model_dirs, settings
):
    settings.PROGRESS_MIN_INTERVAL = 0.0
    settings.PREVIEW_INTERVAL = 0.0
    job = post(live_server.url, {"prompt": "a lighthouse", "seed": 3, **SLOW})
    stream = Stream(live_server.url, job["id"])
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    assert stream.response.getheader("Cache-Control") == "no-cache"
    assert stream.response.getheader("X-Accel-Buffering") == "no"
    seen = list(stream.events())  # returns only once the server ends the stream
    names = [name for name, _, _ in seen]
    ids = [event_id for _, event_id, _ in seen]
    assert ids == sorted(set(ids)), "event ids must grow"
    assert names[-1] == "completed" and names.count("completed") == 1
    assert "started" in names and names.index("started") < names.index("progress")
    progress = [data for name, _, data in seen if name == "progress"]
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[-1] <= 40 and len(steps) >= 3
    assert all(p["total_steps"] == 40 and 0 < p["fraction"] <= 1 and "eta_s" in p for p in progress)
    assert any("preview" in p for p in progress)
    done = seen[-1][2]
    assert done["id"] == job["id"] and done["status"] == "succeeded" and len(done["images"]) == 1
    assert done["images"][0]["url"].startswith("http")


@pytest.mark.usefixtures("live_db")
def test_last_event_id_resumes_after_what_the_client_saw(live_server, tiny_model_dirs, settings):
    settings.PROGRESS_MIN_INTERVAL = 0.0
    job = post(live_server.url, {"prompt": "resume me", "seed": 4, **SLOW})
    first = Stream(live_server.url, job["id"])
    got: list[tuple[str, int, Any]] = []
    for item in first.events():
        got.append(item)
        if item[0] == "progress" and item[2]["step"] >= 2:
            break
    first.close()
    last_id = got[-1][1]
    again = Stream(live_server.url, job["id"], last_event_id=str(last_id))
    rest = list(again.events())
    assert rest[-1][0] == "completed"
    assert all(event_id > last_id for _, event_id, _ in rest)
    assert "started" not in [name for name, _, _ in rest]  # already seen before the break
    # A client that saw the end gets it again (and only it).
    final = Stream(live_server.url, job["id"], last_event_id=str(rest[-1][1]))
    assert [name for name, _, _ in final.events()] == ["completed"]


@pytest.mark.usefixtures("live_db")
def test_a_queued_job_gets_its_position_and_pings_then_its_cancel(live_server, tiny_model_dirs, settings, api):
    settings.SSE_PING_INTERVAL = 0.2
    busy = post(live_server.url, {"prompt": "hold the worker", "seed": 5, "width": 64, "height": 64, "steps": 150})
    waiting = post(live_server.url, {"prompt": "behind it", "seed": 6, **SLOW})
    stream = Stream(live_server.url, waiting["id"])
    seen: list[tuple[str, int, Any]] = []

    def read() -> None:
        seen.extend(stream.events())

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(stream.comments) < 2:
        time.sleep(0.05)
    assert stream.comments[:2] == [": ping", ": ping"]
    assert seen[0][0] == "queued" and seen[0][2]["queue_position"] == 1
    assert api.post(f"/api/results/{waiting['id']}/cancel/").status_code == 200
    reader.join(30)
    assert not reader.is_alive()
    assert seen[-1][0] == "cancelled" and seen[-1][2]["error"]["code"] == "cancelled"
    api.post(f"/api/results/{busy['id']}/cancel/")


@pytest.mark.usefixtures("live_db")
def test_another_keys_job_is_404_and_the_stream_limit_answers_503(live_server, tiny_model_dirs, settings):
    settings.AUTH_REQUIRED = True
    alice, bob = new_key("alice"), new_key("bob")
    job = post(live_server.url, {"prompt": "mine", "seed": 7, "width": 64, "height": 64, "steps": 150}, key=alice)
    other = Stream(live_server.url, job["id"], key=bob)
    assert other.response.status == 404
    assert json.loads(other.response.read())["error"]["code"] == "not_found"
    anonymous = Stream(live_server.url, job["id"])
    assert anonymous.response.status == 401

    settings.SSE_MAX_STREAMS = 1
    mine = Stream(live_server.url, job["id"], key=alice)
    assert mine.response.status == 200
    second = Stream(live_server.url, job["id"], key=alice)
    assert second.response.status == 503
    assert second.response.getheader("Retry-After")
    error = json.loads(second.response.read())["error"]
    assert error["code"] == "too_many_streams" and "SSE_MAX_STREAMS" in error["message"]
    mine.close()
    Generation.objects.filter(pk=job["id"]).update(cancel_requested=True)
    # The closed stream's slot comes back (at its next write, at the latest).
    deadline = time.monotonic() + 30
    while True:
        third = Stream(live_server.url, job["id"], key=alice)
        if third.response.status == 200 or time.monotonic() > deadline:
            break
        third.close()
        time.sleep(0.2)
    assert third.response.status == 200, Generation.objects.filter(pk=job["id"]).values(
        "status", "progress", "cancel_requested", "worker", "heartbeat_at"
    )
    third.close()


@pytest.mark.redis
@pytest.mark.slow
def test_a_celery_workers_job_streams_through_redis(live_server, settings, tiny_model_dirs, tmp_path):
    from tests.api.test_celery_worker import Worker, redis_reachable  # noqa: F401
    from tests.conftest import require_service

    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    _celery_stream_check(live_server, settings, tmp_path)


def _celery_stream_check(live_server, settings, tmp_path) -> None:  # noqa: ANN001
    import uuid

    from api.services.celery_executor import CeleryExecutor
    from api.services.executors import set_executor
    from config.celery import make_app
    from tests.api.test_celery_worker import REDIS_URL, Worker

    queue = f"test-{uuid.uuid4().hex[:10]}"
    settings.QUEUE = "celery"
    settings.CELERY_BROKER_URL = REDIS_URL
    settings.CELERY_DEFAULT_QUEUE = queue
    # The database is read only every 60 s: every event below came through a Redis wake-up.
    settings.SSE_POLL_INTERVAL = 60
    previous = set_executor(CeleryExecutor(app=make_app(REDIS_URL)))
    worker = Worker(queue, tmp_path)
    try:
        worker.start()
        job = post(live_server.url, {"prompt": "via redis", "seed": 8, **SLOW})
        stream = Stream(live_server.url, job["id"])
        seen = list(stream.events())
        names = [name for name, _, _ in seen]
        assert names[-1] == "completed"
        # The rows are read only every 60 s: several progress events mean Redis woke the hub.
        assert names.count("progress") >= 3, names
        assert Generation.objects.get(pk=job["id"]).status == Status.SUCCEEDED
    finally:
        worker.stop()
        set_executor(previous)
