"""Who runs a job: an in-process worker thread (the embedded default) or Celery workers.

Pipelines are not thread-safe, so each device runs one job at a time: the thread
executor has exactly one worker thread, and a request thread never calls a pipeline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Any, Protocol

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from ..models import FINISHED, Generation, Status

log = logging.getLogger("api.executor")


class Executor(Protocol):
    name: str

    def submit(self, generation_id: Any) -> None: ...
    def wait(self, generation_id: Any, timeout: float) -> bool: ...
    def request_cancel(self, generation_id: Any) -> None: ...
    def notify_finished(self, generation_id: Any) -> None: ...


def _is_finished(generation_id: Any) -> bool:
    status = Generation.objects.filter(pk=generation_id).values_list("status", flat=True).first()
    return status is None or status in FINISHED


class ThreadExecutor:
    """One worker thread per process, fed by an in-memory FIFO; the rows stay the truth."""

    name = "thread"
    # Every executor of this process, for a shutdown that stops their loops.
    instances: weakref.WeakSet[ThreadExecutor] = weakref.WeakSet()

    def __init__(self) -> None:
        ThreadExecutor.instances.add(self)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._events: dict[str, threading.Event] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._recovery: threading.Thread | None = None
        self._recovery_stop = threading.Event()

    @property
    def worker_name(self) -> str:
        from .liveness import worker_identity

        return worker_identity("thread")

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
            self._thread.start()
        log.info("in-process generation worker started (%s)", self.worker_name)

    def startup(self) -> None:
        """At server start: recover jobs a dead process left behind, requeue queued ones, preload.

        A job is taken from its worker only when that worker is gone: its pid no longer exists
        (same machine), its heartbeat is older than JOB_STALE_AFTER, or it carries this very
        process's name (a restarted container reuses pids). So a second web process starting
        beside a live one leaves the live one's job alone.
        """
        from .jobs import generation_recover
        from .liveness import OrphanTest

        # Before this process's own worker thread runs anything, a row with its name is stale.
        fresh = self._thread is None or not self._thread.is_alive()
        try:
            outcome = generation_recover(
                max_attempts=settings.MAX_ATTEMPTS,
                is_orphaned=OrphanTest(me=self.worker_name, stale_after=settings.JOB_STALE_AFTER, startup=fresh),
            )
            if any(outcome.values()):
                log.warning("recovered jobs left running by a dead process: %s", outcome)
            pending = list(
                Generation.objects.filter(status=Status.QUEUED).order_by("created_at").values_list("pk", flat=True)
            )
        finally:
            close_old_connections()
        self.start()
        for model_id in settings.PRELOAD_MODELS:
            self._queue.put(("preload", model_id))
        for pk in pending:
            self.submit(pk)
        self._start_recovery_loop()
        from .webhooks import start_dispatcher

        start_dispatcher()

    def _start_recovery_loop(self) -> None:
        """Keep looking for orphans after start-up: a process that died while this one was
        already serving (or came back within JOB_STALE_AFTER) leaves rows only a later pass finds."""
        with self._lock:
            if self._recovery is not None:
                return
            self._recovery_stop = threading.Event()
            self._recovery = threading.Thread(
                target=self._recovery_loop, args=(self._recovery_stop,), name="job-recovery", daemon=True
            )
            self._recovery.start()

    def stop_recovery(self, timeout: float = 30.0) -> None:
        """End the periodic recovery loop (a graceful shutdown; a test done with its process's
        executor). The pass under way, if any, finishes first."""
        with self._lock:
            loop, stop, self._recovery = self._recovery, self._recovery_stop, None
        if loop is not None:
            stop.set()
            loop.join(timeout)

    def _recovery_loop(self, stop: threading.Event) -> None:
        while not stop.wait(settings.JOB_RECOVERY_INTERVAL):
            try:
                self.recover_once()
            except Exception:  # noqa: BLE001 - the loop must outlive a database hiccup
                log.exception("periodic job recovery failed")
            finally:
                close_old_connections()
            from .retention import prune_if_due

            prune_if_due()  # RESULTS_TTL_DAYS, every PRUNE_INTERVAL; never raises
        connection.close()

    def recover_once(self) -> dict[str, list[Any]]:
        from .jobs import generation_recover
        from .liveness import OrphanTest

        outcome = generation_recover(
            max_attempts=settings.MAX_ATTEMPTS,
            is_orphaned=OrphanTest(me=self.worker_name, stale_after=settings.JOB_STALE_AFTER, startup=False),
        )
        if any(outcome.values()):
            log.warning("recovered jobs whose worker died: %s", outcome)
        for pk in outcome.get("requeued", []):
            self.submit(pk)
        for pk in outcome.get("failed", []) + outcome.get("cancelled", []):
            self.notify_finished(pk)  # a request waiting on it answers now, not at its timeout
        return outcome

    # -- Executor API ----------------------------------------------------------------------
    def submit(self, generation_id: Any) -> None:
        key = str(generation_id)
        with self._lock:
            self._events.setdefault(key, threading.Event())
        self.start()
        self._queue.put(("run", key))

    def wait(self, generation_id: Any, timeout: float) -> bool:
        key = str(generation_id)
        with self._lock:
            event = self._events.get(key)
        if event is None:
            return _is_finished(key)
        return event.wait(timeout)

    def request_cancel(self, generation_id: Any) -> None:
        with self._lock:
            self._cancelled.add(str(generation_id))

    def notify_finished(self, generation_id: Any) -> None:
        with self._lock:
            self._cancelled.discard(str(generation_id))
            event = self._events.pop(str(generation_id), None)
        if event is not None:
            event.set()

    def pending(self) -> int:
        return self._queue.qsize()

    def _is_cancel_requested(self, generation_id: str) -> bool:
        return generation_id in self._cancelled

    # -- the worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        from .jobs import generation_execute
        from .worker import recycle_connection

        while True:
            action, arg = self._queue.get()
            try:
                close_old_connections()
                if action == "preload":
                    self._preload(arg)
                else:
                    status = generation_execute(
                        generation_id=arg,
                        worker=self.worker_name,
                        cancel_flag=self._is_cancel_requested,
                        notify=self.notify_finished,
                        background=True,
                    )
                    if status is None and _is_finished(arg):
                        # Not ours: run as another job's companion, or cancelled while queued.
                        self.notify_finished(arg)
            except (OperationalError, InterfaceError) as exc:
                if action != "run":
                    log.exception("worker thread error on %s %s", action, arg)
                else:
                    # The database stayed out of reach through the claim's own tries: the row
                    # is still queued, and only this queue would ever hand it to the thread
                    # again. It waits in line for the database, instead of being forgotten.
                    # (If the claim went through and only the read after it failed, the row is
                    # running with no heartbeat: the next try finds it claimed, and recovery
                    # sends it back to the queue.)
                    log.warning("generation %s waits for the database: %s", arg, exc)
                    self._queue.put((action, arg))
                    time.sleep(1.0)
            except Exception:  # noqa: BLE001 - the worker thread must survive anything
                log.exception("worker thread error on %s %s", action, arg)
            finally:
                if self._queue.empty():
                    # Idle: hold no database session (PostgreSQL counts them; a test database
                    # can't be dropped while one is open).
                    connection.close()
                else:
                    recycle_connection()  # the next job is waiting: no new connection for it

    @staticmethod
    def _preload(model_id: str) -> None:
        from backend.manager import get_manager

        try:
            get_manager().get(model_id)
        except Exception:  # noqa: BLE001
            log.exception("PRELOAD_MODELS: could not load %s", model_id)


_executor: Executor | None = None
_executor_lock = threading.Lock()


def get_executor() -> Executor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                if settings.QUEUE == "celery":
                    from .celery_executor import CeleryExecutor

                    _executor = CeleryExecutor()
                else:
                    _executor = ThreadExecutor()
    return _executor


def set_executor(executor: Executor | None) -> Executor | None:
    """Replace this process's executor (None: chosen again from settings); returns the old one."""
    global _executor
    with _executor_lock:
        previous, _executor = _executor, executor
    return previous


def startup() -> None:
    """Called once by the web process (wsgi/asgi) to start the embedded worker."""
    executor = get_executor()
    if isinstance(executor, ThreadExecutor):
        executor.startup()
