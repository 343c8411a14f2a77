"""The worker side of a job: claim it with queued companions, run them as one pipeline call,
and save each result off the device's path.

The device thread (the embedded worker's thread, or a Celery task) does only what needs the
device: it claims, runs the pipeline and hands the images over. Progress, previews, heartbeats
and cancel flags go through each job's ``JobMonitor``, on a side thread of its own, so the step
callback touches only memory. PNG encoding, file writes and the final row updates run
on the ``Finisher``'s threads while the next job already runs. Between two jobs the device's
thread keeps its database connection (``recycle_connection``).

What holds regardless: a job is ``succeeded`` only once its files and image rows exist; until
then it stays ``running`` with a fresh heartbeat, so a crash at any moment leaves a row that
recovery retries or fails, never one stuck ``running``; every write is conditional on the row
still holding this attempt (its worker and attempt number).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.backends.signals import connection_created
from django.db.models import F, Q
from django.dispatch import receiver
from django.utils import timezone
from PIL import Image

from backend.errors import EngineError, GenerationCancelled
from backend.params import BatchMember, GenerationOutput, GenerationParams, batch_key
from backend.router import get_backend

from .. import metrics, storage
from ..images import parameters_text, png_bytes, thumbnail_bytes, thumbnail_name
from ..models import FINISHED, GeneratedImage, Generation, Status
from . import jobs

log = logging.getLogger("api.worker")

Notify = Callable[[Any], None]
CancelFlag = Callable[[str], bool]
T = TypeVar("T")

# A database that restarts or fails over is gone for seconds: the writes that claim or end a
# job are tried again on a new connection after these pauses (7.75 s in all). A longer outage
# leaves the row ``running`` with a heartbeat that has stopped, for recovery to retry or fail.
DB_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The connection broke or could not be made: worth a new connection, unlike a bad statement.
DB_UNAVAILABLE = (OperationalError, InterfaceError)


def with_db_retry(write: Callable[[], T], what: str) -> T:
    """Run ``write`` again on a new connection while the database is unavailable.

    ``write`` is one whole transaction, conditional on the row's state (and lease), so a try
    whose commit went through just before its connection broke makes the next try a no-op.
    Inside an outer transaction nothing is retried: that transaction is lost either way.
    """
    for delay in DB_RETRY_DELAYS:
        try:
            return write()
        except DB_UNAVAILABLE:
            if connection.in_atomic_block:
                raise
            log.warning("%s: the database is unavailable; trying again in %gs", what, delay, exc_info=True)
            with contextlib.suppress(DatabaseError):
                connection.close()  # the broken one: the next try connects anew
            time.sleep(delay)
    return write()


# A thread that runs jobs back to back keeps its database connection between them for up to
# this long (Django's CONN_MAX_AGE=0 would close it after each job, and the next claim would
# open a new one: several ms on PostgreSQL, on the device's path)...
WORKER_CONN_MAX_AGE = 300.0
# ...but not across a pause longer than this: an idle connection may have been dropped without
# a word (a NAT or proxy idle timeout), and a health check on it would hang, not fail.
WORKER_CONN_MAX_IDLE = 5.0


@receiver(connection_created)
def _stamp_opened(sender: Any, connection: Any, **_: Any) -> None:
    connection.sdapi_opened_at = time.monotonic()


def recycle_connection() -> None:
    """At the end of a job on a thread that runs jobs: keep this thread's connection if sound.

    Django's own checks decide, with ``WORKER_CONN_MAX_AGE`` as the lifetime where
    ``CONN_MAX_AGE`` is 0: a connection left outside autocommit, or unusable after an error, is
    closed. A kept one is checked (``CONN_HEALTH_CHECKS``) before its next use, so a database
    that restarted meanwhile costs a new connection, not a failed job. Inside a transaction
    nothing is touched.
    """
    if connection.connection is None or connection.in_atomic_block:
        return
    if connection.settings_dict.get("CONN_MAX_AGE") == 0:
        opened = getattr(connection, "sdapi_opened_at", None) or time.monotonic()
        connection.close_at = opened + WORKER_CONN_MAX_AGE
    connection.health_check_enabled = True
    connection.close_if_unusable_or_obsolete()
    connection.sdapi_idle_since = time.monotonic()


def close_idle_connection() -> None:
    """At the start of a job: a connection kept from a job that ended more than
    ``WORKER_CONN_MAX_IDLE`` ago is closed, so the job starts on a new one."""
    if connection.connection is None or connection.in_atomic_block:
        return
    idle_since = getattr(connection, "sdapi_idle_since", None)
    if idle_since is None or time.monotonic() - idle_since > WORKER_CONN_MAX_IDLE:
        with contextlib.suppress(DatabaseError):
            connection.close()


# --- claiming ---------------------------------------------------------------------------------


@dataclass
class Claimed:
    id: Any
    lease: dict[str, Any]


def claim_companions(lead: Generation, worker: str, *, max_images: int, window_s: float) -> list[Claimed]:
    """Queued jobs that can share the lead's pipeline call, claimed for ``worker``.

    Up to ``max_images`` images in all (the lead's included), oldest first. With a window,
    waits that long for companions to arrive; without, takes what is already queued. Each
    round claims its picks in one conditional UPDATE (rows locked with SKIP LOCKED where the
    database has it), so two workers never claim one row, and a row cancelled or claimed
    meanwhile is simply not among the claimed.
    """
    claimed: list[Claimed] = []
    try:
        for taken in _companion_rounds(lead, worker, max_images=max_images, window_s=window_s):
            claimed.extend(taken)  # kept if a later round fails: these rows are already running
    except Exception as exc:  # noqa: BLE001 - the lead (and whoever was claimed) runs without more company
        log.warning("looking for companions of generation %s failed", lead.pk, exc_info=True)
        if isinstance(exc, DB_UNAVAILABLE) and not connection.in_atomic_block:
            with contextlib.suppress(DatabaseError):
                connection.close()  # broken: the job's next query connects anew
    return claimed


def _companion_rounds(lead: Generation, worker: str, *, max_images: int, window_s: float) -> Iterator[list[Claimed]]:
    """Round after round until the window closes or the batch is full: each round's claims."""
    key = batch_key(GenerationParams.from_dict(lead.params))
    room = max_images - int(lead.params.get("num_images") or 1)
    deadline = time.monotonic() + window_s
    seen: set[Any] = {lead.pk}
    while room > 0:
        candidates = (
            Generation.objects.filter(
                status=Status.QUEUED, cancel_requested=False, model_id=lead.model_id, kind=lead.kind
            )
            .exclude(pk__in=seen)
            .order_by("created_at")
            .values_list("pk", "params")[:256]
        )
        picked: list[Any] = []
        for pk, params in candidates:
            seen.add(pk)
            try:
                same = batch_key(GenerationParams.from_dict(params)) == key
            except (TypeError, ValueError):
                continue
            count = int(params.get("num_images") or 1)
            if same and count <= room:
                picked.append(pk)
                room -= count
        if picked:
            yield _claim_many(picked, worker)
        remaining = deadline - time.monotonic()
        if room <= 0 or remaining <= 0:
            break
        time.sleep(min(remaining, 0.005))


def _claim_many(ids: list[Any], worker: str) -> list[Claimed]:
    now = timezone.now()
    worker = worker[:128]
    with transaction.atomic():
        rows = Generation.objects.filter(pk__in=ids, status=Status.QUEUED, cancel_requested=False)
        if connection.features.has_select_for_update_skip_locked:
            ids = list(rows.select_for_update(skip_locked=True).values_list("pk", flat=True))
            rows = Generation.objects.filter(pk__in=ids, status=Status.QUEUED, cancel_requested=False)
        rows.update(
            status=Status.RUNNING,
            started_at=now,
            heartbeat_at=now,
            attempts=F("attempts") + 1,
            worker=worker,
            progress=None,
            preview="",
        )
        # started_at is this claim's own stamp: it tells the rows this UPDATE took.
        taken = Generation.objects.filter(pk__in=ids, status=Status.RUNNING, worker=worker, started_at=now)
        claimed = [Claimed(pk, {"worker": worker, "attempts": n}) for pk, n in taken.values_list("pk", "attempts")]
        if claimed:
            jobs.announce_change(*[c.id for c in claimed])
        return claimed


# --- the side thread of a running batch --------------------------------------------------------


class JobMonitor:
    """Writes for the device thread: each member's latest progress and preview, and its
    heartbeat; and reads each member's cancel flag from its row every half second. A member
    stays watched (heartbeat included) until ``release``: through the saving, too."""

    CANCEL_POLL_S = 0.5

    def __init__(self, members: list[Claimed], cancel_flag: CancelFlag | None = None) -> None:
        self._leases = {str(m.id): m.lease for m in members}
        self._ids = {str(m.id): m.id for m in members}
        self._flag = cancel_flag
        self._writers = {key: jobs._ProgressWriter(self._ids[key], lease) for key, lease in self._leases.items()}
        self._progress: dict[str, tuple[int, int, float]] = {}
        self._previews: dict[str, tuple[int, int, Any]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.heartbeat_interval = settings.JOB_HEARTBEAT_INTERVAL
        self.tick = max(0.02, min(settings.PROGRESS_MIN_INTERVAL or 0.05, self.CANCEL_POLL_S, self.heartbeat_interval))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-monitor", daemon=True)

    def start(self) -> JobMonitor:
        self._thread.start()
        return self

    def add(self, members: list[Claimed]) -> None:
        with self._lock:
            for m in members:
                key = str(m.id)
                self._ids[key] = m.id
                self._leases[key] = m.lease
                self._writers[key] = jobs._ProgressWriter(m.id, m.lease)

    def release(self, generation_id: Any) -> None:
        """Stop watching a member (it has ended); the thread ends with the last one."""
        key = str(generation_id)
        with self._lock:
            self._leases.pop(key, None)
            self._progress.pop(key, None)
            self._previews.pop(key, None)
            last = not self._leases
        if last:
            self._stop.set()
            self._wake.set()

    # -- called on the device thread: memory only ------------------------------------------
    def progress_fn(self, generation_id: Any) -> Callable[[int, int], None]:
        key = str(generation_id)

        def progress(step: int, total: int) -> None:
            with self._lock:
                self._progress[key] = (step, total, time.time())

        return progress

    def preview_fn(self, generation_id: Any) -> Callable[[int, int, Any], None]:
        key = str(generation_id)

        def preview(step: int, total: int, image: Any) -> None:
            with self._lock:
                self._previews[key] = (step, total, image)
            self._wake.set()

        return preview

    def cancel_fn(self, generation_id: Any) -> Callable[[], bool]:
        key = str(generation_id)

        def should_cancel() -> bool:
            if key in self._cancelled:
                return True
            if self._flag is not None and self._flag(key):
                self._cancelled.add(key)
                return True
            return False

        return should_cancel

    # -- the side thread -------------------------------------------------------------------
    def _run(self) -> None:
        last_beat = last_poll = time.monotonic()
        failing = False
        try:
            while not self._stop.is_set():
                self._wake.wait(self.tick)
                self._wake.clear()
                now = time.monotonic()
                try:
                    self._write_progress()
                    if now - last_poll >= self.CANCEL_POLL_S:
                        last_poll = now
                        self._poll_cancels()
                    if now - last_beat >= self.heartbeat_interval:
                        last_beat = now
                        self._beat()
                except Exception:  # noqa: BLE001 - a missed write is retried; a long outage reads as death
                    # Once per outage, not at every tick.
                    log.log(
                        logging.DEBUG if failing else logging.WARNING,
                        "job monitor: a database write failed",
                        exc_info=True,
                    )
                    failing = True
                    close_old_connections()
                else:
                    failing = False
        finally:
            with contextlib.suppress(DatabaseError):
                connection.close()

    def _write_progress(self) -> None:
        with self._lock:
            progress = {k: v for k, v in self._progress.items() if k in self._leases}
            previews = {k: v for k, v in self._previews.items() if k in self._leases}
            self._previews.clear()
        written = []
        for key, value in progress.items():
            step, total, at = value
            wrote = key not in previews and self._writers[key](step, total, at)
            if wrote:
                written.append(self._ids[key])
            if wrote or key in previews:
                with self._lock:
                    # Written: drop it, unless a newer step came in meanwhile.
                    if self._progress.get(key) is value:
                        del self._progress[key]
        for key, (step, total, image) in previews.items():
            lease = self._leases.get(key)
            if lease is None:
                continue
            data = jobs.preview_b64(image)
            at = progress.get(key, (0, 0, None))[2]
            Generation.objects.filter(pk=self._ids[key], status=Status.RUNNING, **lease).update(
                preview=data, progress=jobs.progress_value(step, total, at), heartbeat_at=timezone.now()
            )
            written.append(self._ids[key])
        if written:
            jobs.announce_change(*written)

    def _poll_cancels(self) -> None:
        with self._lock:
            leases = dict(self._leases)
        if not leases:
            return
        rows = {
            str(row["id"]): row
            for row in Generation.objects.filter(pk__in=[self._ids[k] for k in leases]).values(
                "id", "cancel_requested", "status", "worker", "attempts"
            )
        }
        for key, lease in leases.items():
            row = rows.get(key)
            # Also "cancelled" once the row no longer holds this attempt (deleted, or recovered
            # and handed to another worker while this one was presumed dead).
            if (
                row is None
                or row["cancel_requested"]
                or row["status"] != Status.RUNNING
                or any(row[k] != v for k, v in lease.items())
            ):
                self._cancelled.add(key)

    def _beat(self) -> None:
        with self._lock:
            leases = dict(self._leases)
        if not leases:
            return
        held = Q()
        for key, lease in leases.items():
            held |= Q(pk=self._ids[key], **lease)
        Generation.objects.filter(held, status=Status.RUNNING).update(heartbeat_at=timezone.now())


# --- saving, off the device's path --------------------------------------------------------------


class Finisher:
    """A few threads that save finished jobs while the device runs the next.

    At most ``max_pending`` jobs wait or save at once; beyond that ``submit`` blocks, so a slow
    disk holds the device back instead of piling images up in memory.
    """

    def __init__(self, threads: int, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="finisher")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending = 0
        self._idle = threading.Condition()

    def submit(self, fn: Callable[[], None]) -> None:
        self._slots.acquire()
        with self._idle:
            self._pending += 1

        def run() -> None:
            try:
                close_old_connections()
                fn()
            except Exception:  # noqa: BLE001 - fn handles its own failures; this is the last net
                log.exception("finisher task failed")
            finally:
                # One short session per save: an idle finisher holds no database connection.
                connection.close()
                self._slots.release()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

        try:
            self._pool.submit(run)
        except BaseException:
            self._slots.release()
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            raise

    def pending(self) -> int:
        return self._pending

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is waiting or saving; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


_finisher: Finisher | None = None
_finisher_lock = threading.Lock()


def get_finisher() -> Finisher:
    global _finisher
    if _finisher is None:
        with _finisher_lock:
            if _finisher is None:
                _finisher = Finisher(settings.FINISH_THREADS, settings.FINISH_MAX_PENDING)
    return _finisher


def drain_finisher(timeout: float | None = None) -> bool:
    """At shutdown: let the saves in progress complete (what doesn't is retried by recovery)."""
    return _finisher.drain(timeout) if _finisher is not None else True


# --- running ----------------------------------------------------------------------------------


@dataclass
class _Member:
    claimed: Claimed
    row: Generation
    params: GenerationParams
    init_image: Any = None
    mask_image: Any = None
    error: EngineError | None = None
    timings: dict[str, Any] = field(default_factory=dict)


def execute(
    *,
    generation_id: Any,
    worker: str,
    cancel_flag: CancelFlag | None = None,
    notify: Notify | None = None,
    background: bool = False,
) -> str | None:
    """Claim one job, and queued companions that can share its call; run them; save each.

    Returns the lead's status, or None if it wasn't ours to run. With ``background`` the saves
    go to the finisher, and a lead that is being saved returns ``running``; each member's end
    is announced through ``notify`` either way.
    """
    claimed = with_db_retry(
        lambda: jobs.generation_claim(generation_id=generation_id, worker=worker),
        f"claiming generation {generation_id}",
    )
    if not claimed:
        return None
    lead_row = with_db_retry(
        lambda: Generation.objects.filter(pk=generation_id).first(), f"reading claimed generation {generation_id}"
    )
    lead = Claimed(generation_id, {"worker": worker[:128], "attempts": lead_row.attempts if lead_row else 0})
    members = [lead]
    monitor = JobMonitor(members, cancel_flag)
    statuses: dict[str, str] = {}
    handed: set[str] = set()
    try:
        monitor.start()
        if lead_row is None:
            return None  # deleted right after the claim
        backend = get_backend()
        max_images = settings.BATCH_MAX_IMAGES if hasattr(backend, "generate_batch") else 1
        if max_images > int(lead_row.params.get("num_images") or 1):
            companions = claim_companions(
                lead_row, worker, max_images=max_images, window_s=settings.BATCH_WINDOW_MS / 1000
            )
            if companions:
                # The monitor watches them from now on (heartbeat, cancel, progress).
                monitor.add(companions)
                members.extend(companions)
        _run(members, lead_row, backend, monitor, statuses, handed, notify=notify, background=background)
    finally:
        # Whatever happened above (even a BaseException), no member stays running.
        for member in members:
            key = str(member.id)
            if key in handed:
                continue
            if key not in statuses:
                try:
                    _finish(
                        member.id,
                        Status.FAILED,
                        member.lease,
                        error={
                            "code": "internal_error",
                            "message": "the worker stopped unexpectedly",
                            "http_status": 500,
                        },
                    )
                    statuses[key] = Status.FAILED
                except Exception:  # noqa: BLE001 - the database itself may be what failed
                    log.exception("could not mark generation %s failed", member.id)
            monitor.release(member.id)
            _announce(notify, member.id)
    return statuses.get(str(generation_id), Status.RUNNING if str(generation_id) in handed else None)


def _finish(generation_id: Any, status: str, lease: dict[str, Any], **fields: Any) -> int:
    """``jobs._finish``, tried again while the database is unavailable."""
    return with_db_retry(
        lambda: jobs._finish(generation_id, status, lease, **fields), f"ending generation {generation_id}"
    )


def _announce(notify: Notify | None, generation_id: Any) -> None:
    if notify is None:
        return
    try:
        notify(generation_id)
    except Exception:  # noqa: BLE001 - waiters fall back to reading the row
        log.warning("could not announce the end of generation %s", generation_id, exc_info=True)


def _run(
    claimed: list[Claimed],
    lead_row: Generation,
    backend: Any,
    monitor: JobMonitor,
    statuses: dict[str, str],
    handed: set[str],
    *,
    notify: Notify | None,
    background: bool,
) -> None:
    rows = {str(lead_row.pk): lead_row}
    if len(claimed) > 1:
        companions = with_db_retry(
            lambda: list(Generation.objects.filter(pk__in=[c.id for c in claimed[1:]])), "reading claimed companions"
        )
        rows.update((str(r.pk), r) for r in companions)
    members: list[_Member] = []
    for c in claimed:
        row = rows.get(str(c.id))
        if row is None:
            continue  # deleted since the claim: nothing to run or write
        metrics.job_claimed(row)
        member = _Member(claimed=c, row=row, params=GenerationParams.from_dict(row.params))
        try:
            member.init_image = _read_input(row.input_image, "RGB")
            member.mask_image = _read_input(row.mask_image, "L")
        except OSError as exc:
            log.warning("generation %s: its input image can't be read: %s", c.id, exc)
            member.error = EngineError(f"the input image can't be read ({type(exc).__name__})")
        members.append(member)
    for member in [m for m in members if m.error is not None]:
        statuses[str(member.claimed.id)] = _fail(member, member.error)  # type: ignore[arg-type]
    runnable = [m for m in members if m.error is None]
    if not runnable:
        return
    batch = [
        BatchMember(
            params=m.params,
            init_image=m.init_image,
            mask_image=m.mask_image,
            on_progress=monitor.progress_fn(m.claimed.id),
            should_cancel=monitor.cancel_fn(m.claimed.id),
            on_preview=monitor.preview_fn(m.claimed.id),
        )
        for m in runnable
    ]
    metrics.pipeline_started()
    t0 = time.perf_counter()
    results: list[Any]
    try:
        if hasattr(backend, "generate_batch"):
            results = backend.generate_batch(batch)
        else:
            results = [_generate_one(backend, b) for b in batch]
    except EngineError as exc:
        results = [exc] * len(batch)
    except Exception as exc:  # noqa: BLE001 - any bug becomes failed jobs, not a dead worker
        log.exception("generation of %s crashed", [str(m.claimed.id) for m in runnable])
        results = [exc] * len(batch)
    finally:
        metrics.pipeline_ended()  # even when the call is interrupted: the busy gauge must not drift
    run_s = time.perf_counter() - t0
    for member, result in zip(runnable, results, strict=True):
        key = str(member.claimed.id)
        if isinstance(result, GenerationOutput):
            if background:
                try:
                    get_finisher().submit(lambda m=member, r=result: _save_and_announce(m, r, run_s, monitor, notify))
                except RuntimeError:  # the finisher is shut down (the interpreter is exiting)
                    log.warning("generation %s: saved on the device's thread", key, exc_info=True)
                    statuses[key] = _save(member, result, run_s)
                else:
                    handed.add(key)
            else:
                statuses[key] = _save(member, result, run_s)
        else:
            statuses[key] = _fail(member, result)


def _generate_one(backend: Any, member: BatchMember) -> Any:
    try:
        return backend.generate(
            member.params,
            init_image=member.init_image,
            mask_image=member.mask_image,
            on_progress=member.on_progress,
            should_cancel=member.should_cancel,
            on_preview=member.on_preview,
        )
    except EngineError as exc:
        return exc


def _read_input(name: str, mode: str) -> Image.Image | None:
    if not name:
        return None
    import io

    with Image.open(io.BytesIO(storage.read(name))) as img:
        return img.convert(mode)


def _fail(member: _Member, error: BaseException) -> str:
    generation_id, lease = member.claimed.id, member.claimed.lease
    metrics.job_failed(member.row, error)
    if isinstance(error, GenerationCancelled):
        _finish(generation_id, Status.CANCELLED, lease, error={"code": "cancelled", "message": str(error)})
        return Status.CANCELLED
    if isinstance(error, EngineError):
        log.warning("generation %s failed: %s (%s)", generation_id, error.message, error.code)
        status_code = jobs.ERROR_HTTP_STATUS.get(error.code, error.http_status if error.http_status >= 400 else 500)
        error_body = {"code": error.code, "message": error.message, "http_status": status_code}
    else:
        error_body = {
            "code": "internal_error",
            "message": f"generation failed unexpectedly ({type(error).__name__})",
            "http_status": 500,
        }
    _finish(generation_id, Status.FAILED, lease, error=error_body)
    return Status.FAILED


def _save_and_announce(
    member: _Member, output: GenerationOutput, run_s: float, monitor: JobMonitor, notify: Notify | None
) -> None:
    try:
        _save(member, output, run_s)
    finally:
        monitor.release(member.claimed.id)
        _announce(notify, member.claimed.id)


def _save(member: _Member, output: GenerationOutput, run_s: float) -> str:
    """Write the images, then the rows, in that order; a failure fails the job and leaves no files."""
    generation_id, lease, row = member.claimed.id, member.claimed.lease, member.row
    folder = jobs.generation_dir(generation_id)
    try:
        return _write(member, output, run_s)
    except DB_UNAVAILABLE:
        # The images are written, but the database stayed out of reach through every try: no
        # end can be written now, and it is no storage error. The row stays ``running`` and its
        # heartbeat stops with this attempt: once the database is back and the heartbeat is
        # stale, recovery retries the job, or fails it worker_lost.
        log.exception("generation %s: its end could not be written to the database", generation_id)
        return Status.RUNNING
    except Exception as exc:  # noqa: BLE001 - a save that fails is a failed job, never a stuck one
        log.exception("generation %s: its images could not be saved", generation_id)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            error = {
                "code": "storage_full",
                "message": "the images could not be saved: the server's disk is full; try again later",
                "http_status": 507,
            }
        else:
            error = {
                "code": "storage_error",
                "message": f"the images could not be saved ({type(exc).__name__})",
                "http_status": 500,
            }
        try:
            metrics.job_failed(row, exc)
            _finish(generation_id, Status.FAILED, lease, error=error)
        finally:
            if not Generation.objects.filter(pk=row.pk, status__in=[Status.RUNNING, Status.SUCCEEDED]).exists():
                storage.delete_prefix(folder)
        return Status.FAILED


def _write(member: _Member, output: GenerationOutput, run_s: float) -> str:
    generation_id, lease, row = member.claimed.id, member.claimed.lease, member.row
    queue_s = ((row.started_at or timezone.now()) - row.created_at).total_seconds()
    t1 = time.perf_counter()
    folder = jobs.generation_dir(generation_id)
    written: list[GeneratedImage] = []
    params = member.params.to_dict()
    for index, item in enumerate(output.images):
        name = f"{folder}/{index}-{item.seed}.png"
        data = png_bytes(item.image, text={"parameters": parameters_text(params, item.seed)})
        storage.save(name, data)
        # The history grid loads this, not the PNG; the resource links it (thumbnail_url).
        thumbnail = thumbnail_bytes(item.image)
        storage.save(thumbnail_name(name), thumbnail)
        written.append(
            GeneratedImage(
                generation_id=generation_id,
                index=index,
                file=name,
                seed=item.seed,
                width=item.image.width,
                height=item.image.height,
                bytes=len(data) + len(thumbnail),  # what the image keeps stored, for quotas
            )
        )
    timings = {
        "queue_s": round(queue_s, 4),
        **output.timings,
        "generate_s": round(run_s, 4),
        "save_s": round(time.perf_counter() - t1, 4),
    }
    steps = member.params.steps

    def write_end() -> int:
        with transaction.atomic():
            done = jobs._finish(
                generation_id,
                Status.SUCCEEDED,
                lease,
                backend=output.backend,
                timings=timings,
                warnings=output.warnings,
                params={**row.params, **output.provenance},
                progress={"step": steps, "total_steps": steps, "fraction": 1.0},
                error=None,
            )
            if done:
                for image in written:
                    image.pk = None  # a try rolled back after its insert leaves keys behind
                GeneratedImage.objects.bulk_create(written)
        return done

    done = with_db_retry(write_end, f"ending generation {generation_id}")
    if not done:
        # Deleted, cancelled or failed over while we ran: leave no files without a row. A
        # row that another attempt now runs or finished keeps the folder: its images have
        # the same names, and removing them would break that attempt's result.
        if not Generation.objects.filter(pk=generation_id, status__in=[Status.RUNNING, Status.SUCCEEDED]).exists():
            storage.delete_prefix(folder)
        return Status.CANCELLED
    metrics.job_succeeded(row, timings, images=len(written))
    return Status.SUCCEEDED


def finished(generation_id: Any) -> bool:
    status = Generation.objects.filter(pk=generation_id).values_list("status", flat=True).first()
    return status is None or status in FINISHED
