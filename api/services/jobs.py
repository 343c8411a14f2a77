"""Generation jobs: create a row, hand it to an executor, run it, cancel it, delete it.

The row is the source of truth. Every state change is a conditional UPDATE, so a job is
claimed once, a cancelled job never runs, and a crash can't leave it ``running``.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from PIL import Image
from rest_framework.exceptions import NotFound

from backend.params import GenerationParams

from .. import storage
from ..exceptions import ApiError, Conflict, ServiceUnavailable
from ..images import png_bytes
from ..models import FINISHED, ApiKey, GeneratedImage, Generation, Status

log = logging.getLogger("api.jobs")

# HTTP status a synchronous request answers with when its generation failed this way.
ERROR_HTTP_STATUS = {
    "invalid_params": 400,
    "unknown_model": 400,
    "model_unavailable": 503,
    "model_access_denied": 503,
    "model_not_found": 503,
    "device_unavailable": 503,
    "out_of_memory": 503,
    "worker_lost": 500,
    "internal_error": 500,
    "generation_failed": 500,
    "remote_error": 502,
    "remote_not_configured": 503,
    "remote_auth_failed": 502,
    "remote_model_unavailable": 503,
    "remote_rate_limited": 429,
    "remote_timeout": 504,
    "remote_bad_response": 502,
    "remote_rejected": 400,
    "remote_unreachable": 503,
    "storage_full": 507,
    "storage_error": 500,
}


class SubmitError(Exception):
    """The executor could not accept the job (e.g. the broker is down)."""


def media_root() -> Path:
    return Path(settings.MEDIA_ROOT)


def generation_dir(generation_id: Any) -> str:
    return f"generations/{generation_id}"


def _remove_inputs(*names: str) -> None:
    for name in names:
        if name:
            storage.delete(name)


def _remove_files(generation: Generation) -> None:
    storage.delete_prefix(generation_dir(generation.id))
    _remove_inputs(generation.input_image, generation.mask_image)


def generation_create(
    *,
    params: GenerationParams,
    init_image: Image.Image | None = None,
    mask_image: Image.Image | None = None,
    response_format: str = "url",
    owner: ApiKey | None = None,
    idempotency_key: str | None = None,
    fingerprint: str = "",
    webhook: dict[str, Any] | None = None,
) -> tuple[Generation, bool]:
    """Store the job and hand it to the executor once committed; nothing half-written on failure.

    Returns ``(generation, created)``: a retried request with the same ``Idempotency-Key``
    gets the first generation back and ``created`` is False.
    """
    from .backpressure import queue_check, queue_lock
    from .executors import get_executor
    from .retention import storage_quota_check

    if idempotency_key:
        existing = _idempotent_match(owner=owner, idempotency_key=idempotency_key, fingerprint=fingerprint)
        if existing is not None:
            return existing, False
    storage_quota_check(owner=owner)
    if not idempotency_key:
        # Unlocked, before any file is written: a full queue costs a refusal nothing. The check
        # that counts is the one under the lock below (which lets a concurrent twin through).
        queue_check()
    generation_id = uuid.uuid4()
    input_name = mask_name = ""
    input_bytes = 0
    # Re-encoded under server-made names: nothing of the upload's name or format survives.
    if init_image is not None:
        input_name = f"inputs/{generation_id}.png"
        data = png_bytes(init_image.convert("RGB"))
        storage.save(input_name, data)
        input_bytes += len(data)
    if mask_image is not None:
        mask_name = f"inputs/{generation_id}-mask.png"
        try:
            data = png_bytes(mask_image.convert("L"))
            storage.save(mask_name, data)
            input_bytes += len(data)
        except BaseException:
            _remove_inputs(input_name)
            raise
    executor = get_executor()
    generation: Generation | None = None
    try:
        with transaction.atomic():
            queue_lock()
            if owner is not None:
                _check_active_cap(owner, idempotency_key=idempotency_key)
            if not (idempotency_key and _has_twin(owner=owner, idempotency_key=idempotency_key)):
                queue_check()
            generation = Generation.objects.create(
                id=generation_id,
                kind=params.kind,
                model_id=params.model_id,
                params=params.to_dict(),
                seed=params.seed,
                input_image=input_name,
                mask_image=mask_name,
                input_bytes=input_bytes,
                response_format=response_format,
                owner=owner,
                idempotency_key=idempotency_key or None,
                request_fingerprint=fingerprint,
                **(webhook or {}),
            )
            transaction.on_commit(lambda: executor.submit(generation_id))
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its job.
        _remove_inputs(input_name, mask_name)
        existing = _idempotent_match(owner=owner, idempotency_key=idempotency_key or "", fingerprint=fingerprint)
        if existing is None:
            raise
        return existing, False
    except SubmitError as exc:
        log.error("could not enqueue generation %s: %s", generation_id, exc)
        Generation.objects.filter(pk=generation_id).delete()
        _remove_inputs(input_name, mask_name)
        raise ServiceUnavailable(
            "The job queue is unavailable, so the generation was not created; try again shortly.",
            code="queue_unavailable",
            retry_after=5,
        ) from None
    except BaseException:
        _remove_inputs(input_name, mask_name)
        raise
    return generation, True


def _idempotent_match(*, owner: ApiKey | None, idempotency_key: str, fingerprint: str) -> Generation | None:
    existing = Generation.objects.filter(owner=owner, idempotency_key=idempotency_key).first()
    if existing is not None and fingerprint and existing.request_fingerprint != fingerprint:
        raise ApiError(
            "this Idempotency-Key was already used for a request with different parameters",
            code="idempotency_key_reused",
            status_code=422,
        )
    return existing


def _has_twin(*, owner: ApiKey | None, idempotency_key: str) -> bool:
    return Generation.objects.filter(owner=owner, idempotency_key=idempotency_key).exists()


def _check_active_cap(owner: ApiKey, *, idempotency_key: str | None = None) -> None:
    """Per-key cap on queued + running jobs, counted in the database under a row lock."""
    cap = settings.MAX_ACTIVE_JOBS_PER_KEY
    # Locking the key's row serialises concurrent creates for one key across processes.
    ApiKey.objects.select_for_update().filter(pk=owner.pk).first()
    if idempotency_key and _has_twin(owner=owner, idempotency_key=idempotency_key):
        # A concurrent twin (same Idempotency-Key) got in first: the insert then fails on the
        # unique key and this request gets the twin's job, not a 429 for the slot that job took.
        return
    active = Generation.objects.filter(owner=owner, status__in=[Status.QUEUED, Status.RUNNING]).count()
    if active >= cap:
        raise ApiError(
            f"this API key already has {active} queued or running generations; the limit is {cap}",
            code="too_many_active_jobs",
            status_code=429,
            headers={"Retry-After": "5"},
        )


def generation_wait(*, generation: Generation, timeout: float) -> Generation:
    """Wait up to ``timeout`` seconds for the job to finish; returns the fresh row either way."""
    from .executors import get_executor

    get_executor().wait(generation.id, timeout)
    try:
        return Generation.objects.prefetch_related("images").get(pk=generation.pk)
    except Generation.DoesNotExist:
        raise NotFound(f"generation {generation.id} was deleted while this request waited for it") from None


def generation_cancel(*, generation: Generation) -> Generation:
    from .executors import get_executor

    if generation.status in FINISHED:
        raise Conflict(
            f"generation {generation.id} already finished with status {generation.status}; it can't be cancelled",
            code="already_finished",
        )
    # A job moves between queued and running under this (a claim; a recovery that sends a lost
    # job back to the queue), so each try looks again until one of the two updates takes.
    for _ in range(3):
        # A queued job is cancelled on the spot: the claim in generation_execute then fails.
        with transaction.atomic():
            cancelled_queued = Generation.objects.filter(pk=generation.pk, status=Status.QUEUED).update(
                status=Status.CANCELLED,
                cancel_requested=True,
                finished_at=timezone.now(),
                input_bytes=0,  # its inputs are removed below: no longer counted against a quota
                error={"code": "cancelled", "message": "cancelled before it started"},
            )
            if cancelled_queued:
                from .webhooks import schedule

                schedule(generation.pk, Status.CANCELLED)
        if cancelled_queued:
            _remove_files(generation)
            announce_change(generation.id)
            get_executor().notify_finished(generation.id)
            break
        # Running: the worker sees the flag at its next step and stops before decoding.
        if Generation.objects.filter(pk=generation.pk, status=Status.RUNNING).update(cancel_requested=True):
            get_executor().request_cancel(generation.id)
            break
        if not Generation.objects.filter(pk=generation.pk, status__in=[Status.QUEUED, Status.RUNNING]).exists():
            break  # finished (or deleted) meanwhile: nothing left to cancel
    try:
        generation.refresh_from_db()
        if generation.status == Status.RUNNING:
            get_executor().wait(generation.id, 5.0)
            generation.refresh_from_db()
    except Generation.DoesNotExist:
        raise NotFound(f"generation {generation.id} was deleted") from None
    return generation


def generation_delete(*, generation: Generation) -> None:
    from .executors import get_executor

    if generation.status not in FINISHED:
        Generation.objects.filter(pk=generation.pk).update(cancel_requested=True)
        get_executor().request_cancel(generation.id)
    # Row first: a worker finishing right now then matches no row and removes what it wrote.
    generation_id, inputs = generation.id, (generation.input_image, generation.mask_image)
    generation.delete()  # (this clears generation.id)
    storage.delete_prefix(generation_dir(generation_id))
    _remove_inputs(*inputs)


def image_bytes(image: GeneratedImage) -> bytes:
    return storage.read(image.file)


def image_b64(image: GeneratedImage) -> str:
    return base64.b64encode(image_bytes(image)).decode("ascii")


# --- the worker side ------------------------------------------------------------------------


class _ProgressWriter:
    """Writes progress to the row at most every PROGRESS_MIN_INTERVAL seconds, and the last step."""

    def __init__(self, generation_id: Any, lease: dict[str, Any] | None = None) -> None:
        self.generation_id = generation_id
        self.lease = lease or {}
        self.interval = settings.PROGRESS_MIN_INTERVAL
        self.last = 0.0

    def __call__(self, step: int, total: int, at: float | None = None) -> bool:
        """Write (unless throttled); ``at`` is when the step ended (epoch seconds). True if written."""
        now = time.monotonic()
        if step < total and now - self.last < self.interval:
            return False
        self.last = now
        Generation.objects.filter(pk=self.generation_id, status=Status.RUNNING, **self.lease).update(
            progress=progress_value(step, total, at), heartbeat_at=timezone.now()
        )
        return True


def progress_value(step: int, total: int, at: float | None = None) -> dict[str, Any]:
    total = max(total, 1)
    value: dict[str, Any] = {"step": step, "total_steps": total, "fraction": round(min(step / total, 1.0), 4)}
    if at is not None:
        value["at"] = round(at, 3)
    return value


def preview_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def generation_claim(*, generation_id: Any, worker: str) -> bool:
    now = timezone.now()
    claimed = bool(
        Generation.objects.filter(pk=generation_id, status=Status.QUEUED, cancel_requested=False).update(
            status=Status.RUNNING,
            started_at=now,
            heartbeat_at=now,
            attempts=F("attempts") + 1,
            worker=worker[:128],
            progress=None,
            preview="",
        )
    )
    if claimed:
        announce_change(generation_id)
    return claimed


def _finish(generation_id: Any, status: str, lease: dict[str, Any] | None = None, **fields: Any) -> int:
    """Only the attempt that holds the row (``lease``: its worker and attempt number) finishes it."""
    from .webhooks import schedule

    with transaction.atomic():
        done = Generation.objects.filter(pk=generation_id, status=Status.RUNNING, **(lease or {})).update(
            status=status, finished_at=timezone.now(), preview="", **fields
        )
        if done:
            # The webhook's outbox row is written with the end itself: it can't be lost between.
            schedule(generation_id, status)
            announce_change(generation_id)
    return done


def announce_change(*generation_ids: Any) -> None:
    """Tell the event streams that these rows changed, once the change is committed."""
    from .events import changed

    transaction.on_commit(lambda: changed(*generation_ids))


def generation_execute(
    *,
    generation_id: Any,
    worker: str,
    cancel_flag: Callable[[str], bool] | None = None,
    notify: Callable[[Any], None] | None = None,
    background: bool = False,
) -> str | None:
    """Claim and run one job (with queued companions that can share its pipeline call).
    Returns its final status, or None if it wasn't ours to run; see ``worker.execute``."""
    from .worker import execute

    return execute(
        generation_id=generation_id, worker=worker, cancel_flag=cancel_flag, notify=notify, background=background
    )


def generation_recover(
    *, max_attempts: int, is_orphaned: Callable[[Generation], bool], generation_ids: list[Any] | None = None
) -> dict[str, list[Any]]:
    """Jobs left ``running`` by a dead worker: requeue under the attempt limit, else fail ``worker_lost``.

    ``is_orphaned`` says, row by row, whether the worker holding it is gone. Every change is
    conditional on the row still holding the same worker and attempt, so two processes that
    recover at once, or a worker that was only slow, can't both act on one job. Requeued ids
    come back for the caller to hand to its executor.
    """
    outcome: dict[str, list[Any]] = {"requeued": [], "failed": [], "cancelled": []}
    rows = Generation.objects.filter(status=Status.RUNNING)
    if generation_ids is not None:
        rows = rows.filter(pk__in=generation_ids)
    try:
        for row in rows.only("id", "worker", "attempts", "heartbeat_at", "started_at", "cancel_requested"):
            if not is_orphaned(row):
                continue
            key = _recover_one(row, max_attempts)
            if key is None:
                continue
            # Counted at once: the change is committed, and the caller must act on it (send a
            # requeued job, wake a failed one's waiters) even if what follows fails.
            outcome[key].append(row.pk)
            announce_change(row.pk)
            log.warning("generation %s: worker %s lost on attempt %s -> %s", row.pk, row.worker, row.attempts, key)
            try:
                # Whatever part of a batch the lost attempt wrote goes; a retry writes its own.
                storage.delete_prefix(generation_dir(row.pk))
            except Exception:  # noqa: BLE001 - a retry overwrites its own files; the rest is left
                log.warning("generation %s: the lost attempt's files could not be removed", row.pk, exc_info=True)
    except Exception:
        if not any(outcome.values()):
            raise
        # The rows already changed are committed: the caller still acts on them; the rest
        # waits for the next pass.
        log.warning("a recovery pass stopped part way, after %s", outcome, exc_info=True)
    return outcome


def _recover_one(row: Generation, max_attempts: int) -> str | None:
    """Cancel, requeue or fail one orphaned row, if it is still held by the same worker and
    attempt; which of the three (the outcome's key), or None if the row had moved on."""
    held = Generation.objects.filter(pk=row.pk, status=Status.RUNNING, worker=row.worker, attempts=row.attempts)
    now = timezone.now()
    with transaction.atomic():
        if row.cancel_requested:
            key = "cancelled"
            changed = held.update(
                status=Status.CANCELLED,
                finished_at=now,
                preview="",
                error={"code": "cancelled", "message": "cancelled while its worker was lost"},
            )
        elif row.attempts < max_attempts:
            key = "requeued"
            # cancel_requested in the filter: a cancel that lands meanwhile is handled next pass.
            changed = held.filter(cancel_requested=False).update(
                status=Status.QUEUED, started_at=None, heartbeat_at=None, progress=None, preview=""
            )
        else:
            key = "failed"
            message = f"the worker running this job stopped without finishing it, {row.attempts} time(s); it is not retried again"
            changed = held.update(
                status=Status.FAILED,
                finished_at=now,
                preview="",
                error={"code": "worker_lost", "message": message, "http_status": 500},
            )
        if not changed:
            return None
        if key != "requeued":
            from .webhooks import schedule

            schedule(row.pk, Status.FAILED if key == "failed" else Status.CANCELLED)
    return key
