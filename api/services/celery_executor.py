"""QUEUE=celery: jobs go to Celery workers over the broker; the web process never loads a model.

Web side (``CeleryExecutor``): a job is sent after its row is committed, to the queue of its
model. A synchronous request waits on a Redis pub/sub channel of its own that the worker
publishes to when the job ends, and reads the row only every SYNC_POLL_INTERVAL seconds as
a fallback (a lost message, or a broker that isn't Redis).

Worker side (``worker_run``, ``start_recovery``): run a job through the same service as the
embedded worker, publish its end, and find jobs whose worker died.

Worker status (``WorkerStatus``, ``live_workers``): each worker process that runs jobs keeps a
JSON snapshot of itself in Redis (its name, queues, loaded models, device plan, GPUs, current
job) under a key that expires unless renewed; the web process reads the live ones for
/api/status/ and /api/models/, since it loads no model and sees no GPU of its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

from ..models import Status
from .executors import _is_finished
from .jobs import SubmitError

log = logging.getLogger("api.executor")

CHANNEL_PREFIX = "sdapi:generation-finished:"
WORKER_KEY_PREFIX = "sdapi:worker:"
# A wait whose finish channel broke (Redis restarted) tries to subscribe again this often.
RESUBSCRIBE_INTERVAL = 1.0


def queue_for_model(model_id: str) -> str:
    """CELERY_MODEL_QUEUES sends a model to the workers that hold it; the rest share one queue."""
    return settings.CELERY_MODEL_QUEUES.get(model_id, settings.CELERY_DEFAULT_QUEUE)


def channel_for(generation_id: Any) -> str:
    return f"{CHANNEL_PREFIX}{generation_id}"


class CeleryExecutor:
    name = "celery"

    def __init__(self, app: Any = None) -> None:
        if app is None:
            from config.celery import app as default_app

            app = default_app
        self.app = app
        self._redis: Any = None
        self._redis_lock = threading.Lock()

    # -- Executor API ----------------------------------------------------------------------
    def submit(self, generation_id: Any) -> None:
        from config.celery import SUBMIT_RETRY_POLICY, TASK_NAME

        from ..models import Generation

        model_id = Generation.objects.filter(pk=generation_id).values_list("model_id", flat=True).first()
        if model_id is None:
            return  # deleted before it could be sent
        try:
            self.app.send_task(
                TASK_NAME,
                args=[str(generation_id)],
                queue=queue_for_model(model_id),
                retry=True,
                retry_policy=SUBMIT_RETRY_POLICY,
            )
        except Exception as exc:  # noqa: BLE001 - kombu raises several kinds; all mean "not sent"
            raise SubmitError(f"the broker refused generation {generation_id}: {type(exc).__name__}: {exc}") from exc

    def wait(self, generation_id: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pubsub = self._subscribe(generation_id)
        try:
            while True:
                # Checked after (re)subscribing, so a finish published in between isn't missed.
                if _is_finished(generation_id):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(remaining, settings.SYNC_POLL_INTERVAL)
                if pubsub is None:
                    # Until the channel is back, the row is read every SYNC_POLL_INTERVAL.
                    pubsub = self._resubscribe(generation_id, pause)
                    continue
                try:
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=pause)
                except Exception:  # noqa: BLE001 - Redis went away: poll, and subscribe again once it is back
                    log.warning("lost the finish channel for generation %s; polling the database", generation_id)
                    self._close(pubsub)
                    pubsub = None
        finally:
            self._close(pubsub)

    def request_cancel(self, generation_id: Any) -> None:
        # The worker reads the row's cancel_requested flag every half second while it runs.
        return None

    def notify_finished(self, generation_id: Any) -> None:
        client = self._client()
        if client is None:
            return
        try:
            client.publish(channel_for(generation_id), "finished")
        except Exception:  # noqa: BLE001 - waiters fall back to polling the row
            log.warning("could not publish the end of generation %s", generation_id, exc_info=True)

    # -- Redis pub/sub -----------------------------------------------------------------------
    def _client(self) -> Any:
        url = str(self.app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://")):
            return None
        with self._redis_lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(
                    url, socket_connect_timeout=3, socket_timeout=15, health_check_interval=30
                )
            return self._redis

    def _subscribe(self, generation_id: Any, *, quiet: bool = False) -> Any:
        client = self._client()
        if client is None:
            return None
        pubsub = None
        try:
            pubsub = client.pubsub()
            pubsub.subscribe(channel_for(generation_id))
            return pubsub
        except Exception:  # noqa: BLE001
            self._close(pubsub)
            if not quiet:
                log.warning("could not subscribe to the end of generation %s; polling the database", generation_id)
            return None

    def _resubscribe(self, generation_id: Any, within: float) -> Any:
        """Subscribe again, trying every RESUBSCRIBE_INTERVAL seconds for up to ``within``
        seconds (a restarted Redis is back within seconds; a wait lasts minutes): the
        subscription, or None once ``within`` has passed (always None when the broker isn't
        Redis)."""
        until = time.monotonic() + within
        if self._client() is None:
            time.sleep(within)
            return None
        while True:
            pubsub = self._subscribe(generation_id, quiet=True)
            if pubsub is not None:
                log.info("the finish channel for generation %s is back", generation_id)
                return pubsub
            left = until - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(left, RESUBSCRIBE_INTERVAL))

    @staticmethod
    def _close(pubsub: Any) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001
                pass


# --- the worker side ------------------------------------------------------------------------

_worker_executor: CeleryExecutor | None = None


def _executor() -> CeleryExecutor:
    from .executors import get_executor

    global _worker_executor
    current = get_executor()
    if isinstance(current, CeleryExecutor):
        return current
    if _worker_executor is None:
        _worker_executor = CeleryExecutor()
    return _worker_executor


def worker_run(*, generation_id: str) -> str | None:
    """Run one job in this worker process; returns its final status, or None if not ours."""
    from .liveness import worker_identity

    me = worker_identity("celery")
    _job_started(generation_id)
    try:
        status = _worker_run(generation_id, me)
    finally:
        _job_ended()
    return status


def _worker_run(generation_id: str, me: str) -> str | None:
    from .jobs import generation_execute, generation_recover
    from .liveness import OrphanTest

    notify = _executor().notify_finished
    # The saving runs on the finisher's threads: this task returns, and the next job starts,
    # while the last one's images are encoded and written. Each job's end is published there.
    status = generation_execute(generation_id=generation_id, worker=me, notify=notify, background=True)
    if status is None:
        # Not queued. A message delivered again after its worker died finds the job still
        # ``running``: if that worker is really gone, the job is retried here or fails.
        outcome = generation_recover(
            max_attempts=settings.MAX_ATTEMPTS,
            is_orphaned=OrphanTest(me=me, stale_after=settings.JOB_STALE_AFTER),
            generation_ids=[generation_id],
        )
        if outcome["requeued"]:
            status = generation_execute(generation_id=generation_id, worker=me, notify=notify, background=True)
        elif outcome["failed"]:
            status = Status.FAILED
            notify(generation_id)
        elif outcome["cancelled"]:
            status = Status.CANCELLED
            notify(generation_id)
    return status


def recover_orphans(*, startup: bool = False) -> dict[str, list[Any]]:
    """One recovery pass: retry or fail jobs whose worker is gone, send the retries, and
    send again queued jobs whose message was lost."""
    from ..models import Generation
    from .jobs import generation_recover
    from .liveness import OrphanTest, worker_identity

    outcome = generation_recover(
        max_attempts=settings.MAX_ATTEMPTS,
        is_orphaned=OrphanTest(me=worker_identity("celery"), stale_after=settings.JOB_STALE_AFTER, startup=startup),
    )
    executor = _executor()
    for pk in outcome["requeued"]:
        try:
            executor.submit(pk)
        except SubmitError:
            # Back to an orphaned ``running`` row, so the next pass sends it again.
            Generation.objects.filter(pk=pk, status=Status.QUEUED).update(status=Status.RUNNING, heartbeat_at=None)
            log.error("could not resend generation %s; the next recovery pass tries again", pk)
    for pk in outcome["failed"] + outcome["cancelled"]:
        executor.notify_finished(pk)
    outcome["resent"] = resend_lost_messages(executor)
    if any(outcome.values()):
        log.warning("recovered jobs whose worker was lost: %s", outcome)
    return outcome


def resend_lost_messages(executor: CeleryExecutor) -> list[Any]:
    """Send again jobs queued for longer than JOB_STALE_AFTER whose Redis queue is empty.

    Their message is gone: Redis restarted without persistence, or the web process died
    between commit and send. A worker holding a message has it in flight, not in the list,
    for milliseconds before claiming; a duplicate sent then finds the row claimed and does
    nothing.
    """
    from datetime import timedelta

    from django.utils import timezone

    from ..models import Generation

    client = executor._client()
    if client is None:
        return []
    cutoff = timezone.now() - timedelta(seconds=settings.JOB_STALE_AFTER)
    waiting = Generation.objects.filter(status=Status.QUEUED, created_at__lt=cutoff).values_list("pk", "model_id")
    by_queue: dict[str, list[Any]] = {}
    for pk, model_id in waiting:
        by_queue.setdefault(queue_for_model(model_id), []).append(pk)
    resent: list[Any] = []
    for queue, pks in by_queue.items():
        try:
            if client.llen(queue):
                continue
            for pk in pks:
                executor.submit(pk)
                resent.append(pk)
        except Exception:  # noqa: BLE001 - the broker is down: the next pass tries again
            log.warning("could not check or refill queue %s", queue, exc_info=True)
    return resent


_recovery_thread: threading.Thread | None = None


def start_recovery() -> None:
    """At worker start: a recovery pass now, then one every JOB_RECOVERY_INTERVAL seconds."""
    global _recovery_thread
    try:
        recover_orphans(startup=True)
    except Exception:  # noqa: BLE001 - a worker with its database down still starts
        log.exception("start-up recovery pass failed")
    finally:
        close_old_connections()
    if _recovery_thread is None or not _recovery_thread.is_alive():
        _recovery_thread = threading.Thread(target=_recovery_loop, name="job-recovery", daemon=True)
        _recovery_thread.start()
    from .webhooks import start_dispatcher

    start_dispatcher()


def _recovery_loop() -> None:
    while True:
        time.sleep(settings.JOB_RECOVERY_INTERVAL)
        try:
            recover_orphans()
        except Exception:  # noqa: BLE001
            log.exception("recovery pass failed")
        finally:
            connection.close()
        from .retention import prune_if_due

        prune_if_due()  # RESULTS_TTL_DAYS, every PRUNE_INTERVAL; never raises


def preload_models() -> None:
    if not settings.PRELOAD_MODELS:
        return

    def load() -> None:
        from backend.manager import get_manager

        for model_id in settings.PRELOAD_MODELS:
            try:
                get_manager().get(model_id)
                log.info("PRELOAD_MODELS: %s loaded", model_id)
                poke_worker_status()
            except Exception:  # noqa: BLE001
                log.exception("PRELOAD_MODELS: could not load %s", model_id)

    threading.Thread(target=load, name="preload-models", daemon=True).start()


# --- worker status ---------------------------------------------------------------------------


class WorkerStatusUnavailable(Exception):
    """The broker's Redis could not be read, so no worker can be seen."""


def worker_status_ttl() -> float:
    """Seconds a worker's snapshot outlives its last renewal: three missed beats."""
    return 3 * settings.JOB_HEARTBEAT_INTERVAL


def worker_key(name: str) -> str:
    return f"{WORKER_KEY_PREFIX}{name}"


class WorkerStatus:
    """This worker process's snapshot in Redis: written at start, after each job and every
    JOB_HEARTBEAT_INTERVAL seconds, gone ``worker_status_ttl()`` seconds after the last write
    (a killed worker), or at once on a clean shutdown."""

    def __init__(self, executor: CeleryExecutor, *, node: str | None, queues: list[str]) -> None:
        from .liveness import worker_identity

        self.executor = executor
        self.name = worker_identity("celery")
        self.node = node
        self.queues = sorted(queues)
        self.started_at = _now()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def key(self) -> str:
        return worker_key(self.name)

    def snapshot(self) -> dict[str, Any]:
        from backend.manager import get_manager
        from backend.router import current_mode
        from backend.system import system_info

        manager = get_manager()
        mode = current_mode()
        snap: dict[str, Any] = {
            "name": self.name,
            "node": self.node,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "mode": mode,
            "loaded_models": manager.loaded_ids(),
            "device": None,
            "system_info": system_info(),
            "current_job": _current_job,
            "started_at": self.started_at,
            "updated_at": _now(),
        }
        if mode == "local":
            try:
                snap["device"] = manager.device_plan().as_dict()
            except Exception as exc:  # noqa: BLE001 - a worker whose device is broken still reports it
                snap["device_error"] = str(exc)
        return snap

    def publish(self) -> None:
        client = self.executor._client()
        if client is None:
            return
        data = json.dumps(self.snapshot(), default=str)
        with self._lock:
            # A write racing a shutdown must not bring the snapshot back after remove().
            if not self._closed:
                client.set(self.key, data, px=max(1, round(worker_status_ttl() * 1000)))

    def remove(self) -> None:
        with self._lock:
            self._closed = True
            client = self.executor._client()
            if client is None:
                return
            try:
                client.delete(self.key)
            except Exception:  # noqa: BLE001 - it expires on its own
                log.warning("could not remove the status of worker %s; it expires by itself", self.name)


def _now() -> str:
    return datetime.now(UTC).isoformat()


_status: WorkerStatus | None = None
_beacon: Any = None
_current_job: str | None = None


def start_worker_status(*, node: str | None = None, queues: list[str] | None = None) -> None:
    """In the process that runs jobs (the solo worker, or each prefork child), at its start."""
    global _status, _beacon
    from .liveness import Beacon

    if _beacon is not None:
        return
    executor = _executor()
    if executor._client() is None:
        log.info("the broker is not Redis: this worker publishes no status")
        return
    _status = WorkerStatus(executor, node=node, queues=list(queues or []))
    _beacon = Beacon(_status.publish, settings.JOB_HEARTBEAT_INTERVAL, name="worker-status").start()


def stop_worker_status() -> None:
    """On a clean shutdown: the snapshot goes at once, not when it expires."""
    global _status, _beacon
    beacon, status = _beacon, _status
    _beacon = _status = None
    if beacon is not None:
        beacon.stop()
    if status is not None:
        status.remove()


def poke_worker_status() -> None:
    if _beacon is not None:
        _beacon.poke()


def _job_started(generation_id: str) -> None:
    global _current_job
    _current_job = str(generation_id)
    poke_worker_status()


def _job_ended() -> None:
    global _current_job
    _current_job = None
    poke_worker_status()


def live_workers() -> list[dict[str, Any]] | None:
    """The snapshots of the live workers, by name; None when the broker isn't Redis (no status
    to read). Raises WorkerStatusUnavailable when Redis can't be read."""
    client = _executor()._client()
    if client is None:
        return None
    try:
        keys = sorted(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*", count=500))
        values = client.mget(keys) if keys else []
    except Exception as exc:  # noqa: BLE001 - redis-py raises several kinds; all mean "can't read"
        raise WorkerStatusUnavailable(type(exc).__name__) from exc
    workers = []
    for raw in values:
        if raw is None:
            continue  # expired between the scan and the read
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            workers.append(item)
    return sorted(workers, key=lambda w: w["name"])
