"""Server-sent events for one job: queued, started, progress (with previews), then its end.

The row stays the truth. Each web process has one ``EventHub``: a side thread that reads every
row its open streams follow in one query per tick, and is woken at once when a row changes,
in-process by the embedded worker, or over Redis pub/sub by Celery workers. So 200 open streams
cost one query per tick and one Redis connection, not 200 of each; each stream holds one
server thread, parked on a condition, and at most ``SSE_MAX_STREAMS`` are open per process (the
rest get 503 with Retry-After), so streams never take the threads that other requests need.

Event ids follow the job's own order, so ``Last-Event-ID`` resumes where a client left off:
``attempt * 10**6`` plus 0-999 while queued (higher as the job moves up), 1000 when started,
1000 + step while running; the end is ``10**12``. A job retried after its worker died starts a
new attempt, so its ids still grow.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

from ..models import FINISHED, Generation, Status

log = logging.getLogger("api.events")

CHANNEL_PREFIX = "sdapi:events:"
FINISHED_CHANNEL_PREFIX = "sdapi:generation-finished:"
TERMINAL_ID = 10**12
ATTEMPT = 10**6
FIELDS = ("id", "status", "progress", "preview", "attempts", "started_at", "created_at", "error")


class TooManyStreams(Exception):
    """This process already holds SSE_MAX_STREAMS streams."""


@dataclass
class Snapshot:
    row: dict[str, Any] | None  # None: the row is gone
    queue_position: int | None = None
    # The events rendered from this snapshot, shared by every stream that follows the job:
    # (last id seen, preview already sent?, how the resource is rendered) -> events.
    rendered: dict[tuple[Any, ...], list[tuple[str, int, str, str]]] = field(
        default_factory=dict, compare=False, repr=False
    )
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def render(self, last: int, sent_preview: str, completed: Any) -> list[tuple[str, int, str, str]]:
        """(event, id, wire text, preview sent) for a stream that has seen up to ``last``."""
        preview = (self.row or {}).get("preview") or ""
        key = (last, bool(preview) and preview == sent_preview, getattr(completed, "key", id(completed)))
        with self.lock:
            found = self.rendered.get(key)
            if found is None:
                found = self.rendered[key] = [
                    (
                        event,
                        event_id,
                        format_event(event, event_id, data),
                        data.get("preview", "") if event == "progress" else "",
                    )
                    for event, event_id, data in _events(self, last, sent_preview, completed)
                ]
            return found


class _Watch:
    def __init__(self, key: str) -> None:
        self.key = key
        self.cond = threading.Condition()
        self.version = 0
        self.snapshot: Snapshot | None = None
        self.closed = False

    def put(self, snapshot: Snapshot) -> None:
        with self.cond:
            if snapshot == self.snapshot:
                return  # nothing changed: the stream keeps waiting (and pings)
            self.snapshot = snapshot
            self.version += 1
            self.cond.notify_all()

    def wait(self, seen: int, timeout: float) -> tuple[int, Snapshot | None]:
        with self.cond:
            self.cond.wait_for(lambda: self.version != seen, timeout)
            return self.version, self.snapshot


def read_snapshots(keys: list[str]) -> dict[str, Snapshot]:
    """The rows of ``keys`` in one query, with queue positions for the queued ones."""
    rows = {str(r["id"]): r for r in Generation.objects.filter(pk__in=keys).values(*FIELDS)}
    positions: dict[str, int] = {}
    queued = [r for r in rows.values() if r["status"] == Status.QUEUED]
    if queued:
        oldest = min(r["created_at"] for r in queued)
        ahead = Generation.objects.filter(status=Status.QUEUED, created_at__lt=oldest).count()
        order = Generation.objects.filter(status=Status.QUEUED, created_at__gte=oldest).order_by("created_at", "id")
        wanted = {str(r["id"]) for r in queued}
        for index, pk in enumerate(order.values_list("pk", flat=True)[:100_000]):
            if str(pk) in wanted:
                positions[str(pk)] = ahead + index + 1
    return {key: Snapshot(rows.get(key), positions.get(key)) for key in keys}


class EventHub:
    """One per process: follows the rows that open streams watch."""

    def __init__(self) -> None:
        self._watches: dict[str, set[_Watch]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._open = 0

    # -- streams -----------------------------------------------------------------------------
    def watch(self, generation_id: Any) -> _Watch:
        key = str(generation_id)
        watch = _Watch(key)
        with self._lock:
            if self._open >= settings.SSE_MAX_STREAMS:
                raise TooManyStreams
            self._open += 1
            self._watches.setdefault(key, set()).add(watch)
            self._start()
        return watch

    def unwatch(self, watch: _Watch) -> None:
        with self._lock:
            if watch.closed:
                return
            watch.closed = True
            self._open -= 1
            watchers = self._watches.get(watch.key)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[watch.key]

    def open_streams(self) -> int:
        return self._open

    def poke(self) -> None:
        """Something changed: read the rows now rather than at the next tick."""
        self._wake.set()

    # -- the side threads ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="sse-hub", daemon=True)
            self._thread.start()
        if self._listener is None and _redis_url():
            self._listener = threading.Thread(target=self._listen, name="sse-redis", daemon=True)
            self._listener.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(settings.SSE_POLL_INTERVAL)
            self._wake.clear()
            with self._lock:
                keys = list(self._watches)
            if not keys:
                connection.close()  # idle: hold no database session
                continue
            try:
                close_old_connections()
                snapshots = read_snapshots(keys)
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.warning("SSE hub: could not read the watched rows", exc_info=True)
                close_old_connections()
                time.sleep(0.5)
                continue
            with self._lock:
                watches = [(w, snapshots[key]) for key in keys for w in self._watches.get(key, ())]
            for watch, snapshot in watches:
                watch.put(snapshot)

    def _listen(self) -> None:
        """Wake on every change a Celery worker publishes; reconnect after Redis comes back."""
        import redis

        delay = 0.5
        while True:
            try:
                client = redis.Redis.from_url(_redis_url(), socket_connect_timeout=3, health_check_interval=30)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(f"{CHANNEL_PREFIX}*", f"{FINISHED_CHANNEL_PREFIX}*")
                delay = 0.5
                for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._wake.set()
            except Exception:  # noqa: BLE001 - the poll goes on meanwhile; try again
                log.warning("SSE hub: Redis pub/sub lost; retrying in %.1fs", delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def _redis_url() -> str:
    url = str(getattr(settings, "CELERY_BROKER_URL", "") or "")
    if settings.QUEUE != "celery" or not url.startswith(("redis://", "rediss://")):
        return ""
    return url


_hub: EventHub | None = None
_hub_lock = threading.Lock()
_publisher: Any = None


def get_hub() -> EventHub:
    global _hub
    if _hub is None:
        with _hub_lock:
            if _hub is None:
                _hub = EventHub()
    return _hub


def changed(*generation_ids: Any) -> None:
    """Called where a job's row changes: wakes this process's hub, and in Celery mode every web
    process's hub over Redis. Best effort: a lost signal only delays an event to the next tick."""
    if _hub is not None:
        _hub.poke()
    url = _redis_url()
    if not url:
        return
    global _publisher
    try:
        if _publisher is None:
            import redis

            _publisher = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        for generation_id in generation_ids:
            _publisher.publish(f"{CHANNEL_PREFIX}{generation_id}", "1")
    except Exception:  # noqa: BLE001
        log.debug("could not publish a job change", exc_info=True)


# --- the stream --------------------------------------------------------------------------------


def event_id_of(snapshot: Snapshot) -> int:
    row = snapshot.row
    if row is None or row["status"] in FINISHED:
        return TERMINAL_ID
    attempts = int(row["attempts"] or 0)
    if row["status"] == Status.QUEUED:
        position = snapshot.queue_position or 1
        return (attempts + 1) * ATTEMPT + max(0, 999 - min(position, 999))
    step = int((row["progress"] or {}).get("step") or 0)
    return attempts * ATTEMPT + 1000 + min(step, ATTEMPT - 1001)


def format_event(event: str, event_id: int, data: dict[str, Any]) -> str:
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"id: {event_id}\nevent: {event}\ndata: {body}\n\n"


def parse_last_event_id(value: str | None) -> int:
    try:
        return int(str(value).strip()) if value not in (None, "") else -1
    except ValueError:
        return -1


def stream(
    generation_id: Any,
    *,
    last_event_id: int,
    completed: Any,
    watch: _Watch,
    hub: EventHub,
) -> Iterator[str]:
    """The events of one job from ``last_event_id`` on; ``completed(row)`` gives the resource for
    the ``completed`` event. Ends after the terminal event, or at SSE_MAX_DURATION (the client
    reconnects with Last-Event-ID)."""
    last = last_event_id
    sent_preview = ""
    deadline = time.monotonic() + settings.SSE_MAX_DURATION
    try:
        yield f"retry: {int(settings.SSE_RETRY_MS)}\n\n"
        snapshot = read_snapshots([str(generation_id)])[str(generation_id)]
        seen = watch.version
        while True:
            if snapshot is not None:
                for _event, event_id, text, preview in snapshot.render(last, sent_preview, completed):
                    yield text
                    last = max(last, event_id)
                    sent_preview = preview or sent_preview
                    if event_id == TERMINAL_ID:
                        return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            version, fresh = watch.wait(seen, min(settings.SSE_PING_INTERVAL, remaining))
            if version == seen:
                yield ": ping\n\n"
                snapshot = None
                continue
            seen, snapshot = version, fresh
    finally:
        hub.unwatch(watch)
        close_old_connections()


def _events(
    snapshot: Snapshot, last: int, sent_preview: str, completed: Any
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    row = snapshot.row
    event_id = event_id_of(snapshot)
    if row is None:
        yield "failed", TERMINAL_ID, {"error": {"code": "not_found", "message": "the generation was deleted"}}
        return
    status = row["status"]
    if status in FINISHED:
        if status == Status.SUCCEEDED:
            yield "completed", TERMINAL_ID, completed(row["id"])
        else:
            yield (
                status if status == Status.CANCELLED else "failed",
                TERMINAL_ID,
                {
                    "id": str(row["id"]),
                    "status": status,
                    "error": row["error"],
                },
            )
        return
    if event_id <= last:
        return
    if status == Status.QUEUED:
        yield "queued", event_id, {"id": str(row["id"]), "queue_position": snapshot.queue_position}
        return
    attempt_base = int(row["attempts"] or 0) * ATTEMPT
    if last < attempt_base + 1000:
        yield (
            "started",
            attempt_base + 1000,
            {"id": str(row["id"]), "attempt": row["attempts"], "started_at": row["started_at"]},
        )
    progress = row["progress"] or {}
    step = int(progress.get("step") or 0)
    if step <= 0 or event_id <= last:
        return
    total = max(int(progress.get("total_steps") or 1), 1)
    data: dict[str, Any] = {
        "id": str(row["id"]),
        "step": step,
        "total_steps": total,
        "fraction": round(min(step / total, 1.0), 4),
        "eta_s": _eta(row, step, total),
    }
    if "at" in progress:
        data["at"] = progress["at"]
    if row["preview"] and row["preview"] != sent_preview:
        data["preview"] = row["preview"]
    yield "progress", event_id, data


def _eta(row: dict[str, Any], step: int, total: int) -> float | None:
    from django.utils import timezone

    started = row.get("started_at")
    if started is None or step <= 0:
        return None
    elapsed = (timezone.now() - started).total_seconds()
    return round(max(elapsed / step * (total - step), 0.0), 2)


class EventStream:
    """The response body: iterates :func:`stream`, and gives the stream's slot back when the
    server closes the response, even one that was never iterated."""

    def __init__(self, generation_id: Any, *, last_event_id: int, completed: Any, watch: _Watch, hub: EventHub) -> None:
        self._watch, self._hub = watch, hub
        self._events = stream(generation_id, last_event_id=last_event_id, completed=completed, watch=watch, hub=hub)

    def __iter__(self) -> Iterator[str]:
        return self._events

    def close(self) -> None:
        self._events.close()
        self._hub.unwatch(self._watch)
