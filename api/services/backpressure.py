"""Backpressure: bounds on the queue and on the requests that wait for their images.

Overload is answered, not absorbed. A create past ``MAX_QUEUED_JOBS`` queued jobs is refused
with ``queue_full`` before anything is written. A synchronous request past ``MAX_SYNC_WAITERS``
per process does not get to hold a server thread: the native API hands back the job as if it
were async, and the foreign protocols (which have no 202) are refused with
``too_many_sync_requests`` before the job is created. Both refusals are 503 with a
``Retry-After`` estimated from the recent pace of the workers, so every protocol can tell its
clients when to come back.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from ..exceptions import ServiceUnavailable
from ..models import Generation, Status

# Retry-After bounds: at least a second; at most five minutes, however deep the queue.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 300
# When no job finished lately (a model still loading, a worker down) there is no pace to go by.
RETRY_AFTER_UNKNOWN_S = 30
# The pace is read from this many of the latest finished jobs, none older than the window, and
# kept this long: under overload every refusal would otherwise run the same query.
PACE_JOBS = 20
PACE_WINDOW = timedelta(minutes=15)
PACE_CACHE_S = 2.0
# pg_advisory_xact_lock key of the queue cap: any constant no other code uses.
QUEUE_LOCK_KEY = 0x5D_0E_0E_01


class QueueFull(ServiceUnavailable):
    def __init__(self, *, depth: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"the queue already holds {depth} generations waiting to start and the limit is {limit} "
            f"(MAX_QUEUED_JOBS); nothing was created, try again in about {retry_after}s",
            code="queue_full",
            retry_after=retry_after,
        )


class TooManySyncRequests(ServiceUnavailable):
    def __init__(self, *, held: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"this server already holds {held} requests open while their images are made and the limit is "
            f"{limit} (MAX_SYNC_WAITERS); nothing was created, try again in about {retry_after}s",
            code="too_many_sync_requests",
            retry_after=retry_after,
        )


# --- Retry-After ---------------------------------------------------------------------------

_pace_cache: tuple[float, float | None] = (-math.inf, None)


def seconds_per_job() -> float | None:
    """How many seconds the workers lately took per job, or None with no recent job.

    Two readings, each too high in its own case, and the lower one is kept: the mean time a
    job ran (too high when jobs share a batch or several workers run side by side), and the
    time from the first start to the last finish over the number of jobs (too high when the
    workers sat idle between them).
    """
    since = timezone.now() - PACE_WINDOW
    rows = list(
        Generation.objects.filter(
            status__in=[Status.SUCCEEDED, Status.FAILED], finished_at__gte=since, started_at__isnull=False
        )
        .order_by("-finished_at")
        .values_list("started_at", "finished_at")[:PACE_JOBS]
    )
    if not rows:
        return None
    ran = sum(max((finished - started).total_seconds(), 0.0) for started, finished in rows) / len(rows)
    span = (max(finished for _, finished in rows) - min(started for started, _ in rows)).total_seconds()
    return min(ran, max(span, 0.0) / len(rows))


def _pace() -> float | None:
    global _pace_cache
    at, pace = _pace_cache
    now = time.monotonic()
    if now - at > PACE_CACHE_S:
        pace = seconds_per_job()
        _pace_cache = (now, pace)
    return pace


def retry_after_s(*, jobs_ahead: int) -> int:
    """Seconds until ``jobs_ahead`` jobs are done at the recent pace, within the bounds."""
    pace = _pace()
    if pace is None:
        return RETRY_AFTER_UNKNOWN_S
    return int(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(jobs_ahead * pace))))


# --- the queue -----------------------------------------------------------------------------


def queue_depth() -> int:
    return Generation.objects.filter(status=Status.QUEUED).count()


def queue_lock() -> None:
    """Make concurrent creates take turns between counting the queue and inserting.

    Called first inside the transaction that inserts. On PostgreSQL a transaction-scoped
    advisory lock does it (released at commit or rollback, in every process). SQLite needs
    nothing: its IMMEDIATE transactions (config/settings.py) already hold the database's write
    lock from the start. On any other database the count and the insert may interleave, and
    the queue can pass the limit by at most the number of creates running at that moment.
    """
    if settings.MAX_QUEUED_JOBS and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [QUEUE_LOCK_KEY])


def queue_check() -> None:
    """Raise QueueFull when MAX_QUEUED_JOBS jobs are already queued (0: no limit)."""
    limit = settings.MAX_QUEUED_JOBS
    if not limit:
        return
    depth = queue_depth()
    if depth >= limit:
        raise QueueFull(depth=depth, limit=limit, retry_after=retry_after_s(jobs_ahead=depth))


# --- synchronous waiters (per process) -----------------------------------------------------


class WaiterSlot:
    """One of the MAX_SYNC_WAITERS places; ``release`` gives it back (twice is harmless)."""

    def __init__(self, pool: _Waiters) -> None:
        self._pool = pool
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._pool.give_back()


class _Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0

    def take(self) -> WaiterSlot | None:
        with self._lock:
            if self.held >= settings.MAX_SYNC_WAITERS:
                return None
            self.held += 1
        return WaiterSlot(self)

    def give_back(self) -> None:
        with self._lock:
            self.held -= 1


_waiters = _Waiters()


def sync_slot_try() -> WaiterSlot | None:
    """A place to wait for a job in, or None when MAX_SYNC_WAITERS requests already wait."""
    return _waiters.take()


def sync_slot_acquire() -> WaiterSlot:
    """A place to wait for a job in; TooManySyncRequests (503) when there is none."""
    slot = _waiters.take()
    if slot is None:
        # The waiting requests free their places as the jobs ahead of them finish.
        active = Generation.objects.filter(status__in=[Status.QUEUED, Status.RUNNING]).count()
        raise TooManySyncRequests(
            held=_waiters.held, limit=settings.MAX_SYNC_WAITERS, retry_after=retry_after_s(jobs_ahead=active)
        )
    return slot


def sync_waiters_held() -> int:
    """How many requests of this process wait for their jobs now."""
    return _waiters.held
