"""QUEUE=celery: jobs go to Celery workers over the broker; the web process never loads a model.

Web side (``CeleryExecutor``): a job is sent after its row is committed, to the queue of its
model. A synchronous request waits on a Redis pub/sub channel of its own that the worker
publishes to when the job ends, and reads the row only every SYNC_POLL_INTERVAL seconds as
a fallback (a lost message, or a broker that isn't Redis).

Worker side (``worker_run``, ``start_recovery``): run a job through the same service as the
embedded worker, publish its end, and find jobs whose worker died.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

from ..models import Status
from .executors import _is_finished
from .jobs import SubmitError

log = logging.getLogger("api.executor")

CHANNEL_PREFIX = "sdapi:generation-finished:"


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
                # Checked after subscribing, so a finish published in between isn't missed.
                if _is_finished(generation_id):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(remaining, settings.SYNC_POLL_INTERVAL)
                if pubsub is None:
                    time.sleep(pause)
                    continue
                try:
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=pause)
                except Exception:  # noqa: BLE001 - Redis went away: fall back to the slow poll
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

    def _subscribe(self, generation_id: Any) -> Any:
        client = self._client()
        if client is None:
            return None
        try:
            pubsub = client.pubsub()
            pubsub.subscribe(channel_for(generation_id))
            return pubsub
        except Exception:  # noqa: BLE001
            log.warning("could not subscribe to the end of generation %s; polling the database", generation_id)
            return None

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
    from .jobs import generation_execute, generation_recover
    from .liveness import OrphanTest, worker_identity

    me = worker_identity("celery")
    status = generation_execute(generation_id=generation_id, worker=me)
    if status is None:
        # Not queued. A message delivered again after its worker died finds the job still
        # ``running``: if that worker is really gone, the job is retried here or fails.
        outcome = generation_recover(
            max_attempts=settings.MAX_ATTEMPTS,
            is_orphaned=OrphanTest(me=me, stale_after=settings.JOB_STALE_AFTER),
            generation_ids=[generation_id],
        )
        if outcome["requeued"]:
            status = generation_execute(generation_id=generation_id, worker=me)
        elif outcome["failed"]:
            status = Status.FAILED
        elif outcome["cancelled"]:
            status = Status.CANCELLED
    if status is not None:
        _executor().notify_finished(generation_id)
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


def _recovery_loop() -> None:
    while True:
        time.sleep(settings.JOB_RECOVERY_INTERVAL)
        try:
            recover_orphans()
        except Exception:  # noqa: BLE001
            log.exception("recovery pass failed")
        finally:
            connection.close()


def preload_models() -> None:
    if not settings.PRELOAD_MODELS:
        return

    def load() -> None:
        from backend.manager import get_manager

        for model_id in settings.PRELOAD_MODELS:
            try:
                get_manager().get(model_id)
                log.info("PRELOAD_MODELS: %s loaded", model_id)
            except Exception:  # noqa: BLE001
                log.exception("PRELOAD_MODELS: could not load %s", model_id)

    threading.Thread(target=load, name="preload-models", daemon=True).start()
