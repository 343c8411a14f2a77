"""QUEUE=celery through a crash of Redis: a real ``celery worker`` and a private ``redis-server``
that the test kills (SIGKILL) and starts again on the same port, empty, as a Redis without
persistence comes back.

The broker's messages die with it: the running job's (unacknowledged) and the queued ones'.
The rows don't, and the worker's recovery pass sends queued jobs whose message is gone again
(``resend_lost_messages``). A synchronous request waiting on the finish channel meanwhile
loses its subscription and must still return once its job is done.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from api.models import FINISHED, Generation, Status
from api.services.celery_executor import CeleryExecutor, channel_for
from api.services.executors import set_executor
from tests.api.test_celery_worker import pngs, row, running_with_progress, wait_for
from tests.faults.app_processes import EnvWorker
from tests.faults.services import PrivateRedis, redis_server_program, require_program

pytestmark = pytest.mark.redis

# Long enough that the crash and the restart happen while it runs.
SLOW = {"width": 64, "height": 64, "steps": 120}
QUICK = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:  # noqa: ANN001
    require_program(redis_server_program(), "redis-server")
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def celery_on_private_redis(live_db, settings, tiny_model_dirs, tmp_path, private_redis) -> Iterator[EnvWorker]:  # noqa: ANN001
    """The web side (this process) and one worker, both on the private Redis."""
    from config.celery import make_app

    url = private_redis.url(0)
    queue = f"test-{uuid.uuid4().hex[:10]}"
    settings.QUEUE = "celery"
    settings.CELERY_BROKER_URL = url
    settings.CELERY_DEFAULT_QUEUE = queue
    settings.MAX_ATTEMPTS = 2
    previous = set_executor(CeleryExecutor(app=make_app(url)))
    worker = EnvWorker(
        queue,
        tmp_path,
        CELERY_BROKER_URL=url,
        # A recovery pass every half second, and a queued job counts as having lost its
        # message after two seconds (at least 3 heartbeats, as the settings demand).
        JOB_RECOVERY_INTERVAL="0.5",
        JOB_HEARTBEAT_INTERVAL="0.5",
        JOB_STALE_AFTER="2",
    )
    try:
        yield worker
    finally:
        worker.stop()
        set_executor(previous)


@pytest.mark.slow
def test_jobs_queued_and_running_survive_a_redis_crash_and_a_sync_wait_resumes(
    api: Any, celery_on_private_redis: EnvWorker, private_redis: PrivateRedis, settings: Any
) -> None:
    import redis

    from api.services.executors import get_executor

    worker = celery_on_private_redis
    worker.start()
    # A poll of the row would come a minute late: a prompt return means the finish channel
    # was heard again after the crash.
    settings.SYNC_POLL_INTERVAL = 60

    slow = api.post("/api/txt2img/", {"prompt": "slow", "seed": 7, "async": True, **SLOW}, format="json")
    assert slow.status_code == 202, slow.content
    slow_id = slow.json()["id"]
    wait_for("the slow job to run", lambda: running_with_progress(slow_id, 1), 90)
    queued_ids = [
        api.post(
            "/api/txt2img/", {"prompt": f"queued {i}", "seed": 20 + i, "async": True, **QUICK}, format="json"
        ).json()["id"]
        for i in range(2)
    ]
    client = redis.Redis.from_url(private_redis.url(0))
    assert client.llen(worker.queue) == 2  # behind the slow one, in the broker only

    # A synchronous request's wait, as a POST without "async" runs it, on a thread of its own.
    waited: dict[str, Any] = {}

    def wait() -> None:
        try:
            waited["result"] = get_executor().wait(slow_id, 120)
            waited["at"] = time.time()
        finally:
            connection.close()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    wait_for(
        "the wait to subscribe",
        lambda: dict(client.pubsub_numsub(channel_for(slow_id))).get(channel_for(slow_id).encode()),
    )
    client.close()

    private_redis.kill()
    # Meanwhile a new job is refused with the typed 503, and leaves no row behind.
    before = Generation.objects.count()
    refused = api.post("/api/txt2img/", {"prompt": "refused", "async": True, **QUICK}, format="json")
    assert refused.status_code == 503, refused.content
    assert refused.json()["error"]["code"] == "queue_unavailable"
    assert Generation.objects.count() == before
    private_redis.start()
    assert row(slow_id).status == Status.RUNNING  # the crash came while it ran

    ids = [slow_id, *queued_ids]
    try:
        wait_for("all three jobs to end", lambda: all(row(i).status in FINISHED for i in ids), 90, 0.1)
    except AssertionError as exc:
        states = [(str(i), row(i).status, row(i).progress, row(i).attempts) for i in ids]
        raise AssertionError(f"{exc}: {states}\n{worker.log_text()[-4000:]}") from None
    done = {i: row(i) for i in ids}
    assert [done[i].status for i in ids] == [Status.SUCCEEDED] * 3, {i: (g.status, g.error) for i, g in done.items()}
    # The slow job ran on through the crash: one attempt, no retry.
    assert done[slow_id].attempts == 1
    # Each has exactly its own images, one set.
    assert pngs(slow_id) == ["0-7.png"]
    assert [pngs(i) for i in queued_ids] == [["0-20.png"], ["0-21.png"]]
    assert [[(im.index, im.seed) for im in done[i].images.all()] for i in ids] == [[(0, 7)], [(0, 20)], [(0, 21)]]
    # Their messages were lost with the server: the worker's recovery pass sent them again. A
    # pass that came between the two jobs' ages sent only the older one; the other then ran as
    # its companion, in the same pipeline call (micro-batching claims queued rows that match).
    resent = [line for line in worker.log_text().splitlines() if "'resent': [" in line]
    sent_again = [i for i in queued_ids if any(str(i) in line for line in resent)]
    assert sent_again, resent
    for i in queued_ids:
        if i not in sent_again:
            companion = done[sent_again[0]]
            assert done[i].timings.get("batch_jobs") == 2 == companion.timings.get("batch_jobs"), (
                resent,
                done[i].timings,
            )
            # One call: the shared call's time is each member's.
            assert done[i].timings["inference_s"] == companion.timings["inference_s"], resent

    # The wait came back with the job done, not at its timeout nor a minute's poll later.
    waiter.join(30)
    assert waited.get("result") is True, waited
    late = waited["at"] - done[slow_id].finished_at.timestamp()
    assert late < 10, (late, worker.log_text()[-3000:])

    # Nothing ran twice: a duplicate message, if one was sent, found its job finished.
    time.sleep(1.0)
    again = {i: row(i) for i in ids}
    assert all(again[i].finished_at == done[i].finished_at and again[i].attempts == 1 for i in ids)


def subscribers(client: Any, generation_id: Any) -> int:
    channel = channel_for(generation_id)
    return dict(client.pubsub_numsub(channel)).get(channel.encode(), 0)


@pytest.mark.django_db(transaction=True)
def test_a_wait_that_lost_its_channel_subscribes_again_once_redis_is_back(private_redis, settings):  # noqa: ANN001
    import redis

    from config.celery import make_app

    # A poll of the row would come a minute late: only the channel can wake the wait in time.
    settings.SYNC_POLL_INTERVAL = 60
    executor = CeleryExecutor(app=make_app(private_redis.url(0)))
    job = Generation.objects.create(kind="txt2img", model_id="tiny-sd", params={}, seed=1, status=Status.RUNNING)
    waited: dict[str, Any] = {}

    def wait() -> None:
        try:
            waited["result"] = executor.wait(job.pk, 60)
            waited["at"] = time.monotonic()
        finally:
            connection.close()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    client = redis.Redis.from_url(private_redis.url(0))
    wait_for("the wait to subscribe", lambda: subscribers(client, job.pk), 10)
    private_redis.kill()
    time.sleep(0.5)  # the wait notices
    private_redis.start()
    client = redis.Redis.from_url(private_redis.url(0))
    wait_for("the wait to subscribe again", lambda: subscribers(client, job.pk), 10)

    Generation.objects.filter(pk=job.pk).update(status=Status.SUCCEEDED)
    published = time.monotonic()
    executor.notify_finished(job.pk)
    waiter.join(10)
    assert waited.get("result") is True
    assert waited["at"] - published < 3
