"""Retention and storage quotas: finished results go after RESULTS_TTL_DAYS, and an API key keeps
at most its quota of stored bytes (images + inputs).

Pruning deletes rows first, files after, in batches: a row another process is pruning (or a
user deleting) at the same moment is skipped or found gone, and removing a file twice is
harmless, so several processes may prune at once. A queued or running job is never pruned.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from .. import storage
from ..exceptions import ApiError
from ..models import FINISHED, ApiKey, GeneratedImage, Generation, WebhookDelivery
from .jobs import generation_dir

log = logging.getLogger("api.retention")

PRUNE_BATCH_SIZE = 200


def format_bytes(n: int) -> str:
    """1234567 -> "1.2 MB" (decimal units, as quotas are written)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 999.95 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# --- quotas ------------------------------------------------------------------------------------


def storage_quota(*, owner: ApiKey) -> int:
    """Bytes the key may keep stored; 0 means unlimited."""
    if owner.storage_quota_bytes is not None:
        return owner.storage_quota_bytes
    return settings.STORAGE_QUOTA_BYTES


def storage_used(*, owner: ApiKey) -> int:
    """Bytes of the key's stored images and inputs, as recorded when they were written."""
    images = GeneratedImage.objects.filter(generation__owner=owner).aggregate(total=Sum("bytes"))["total"]
    inputs = Generation.objects.filter(owner=owner).aggregate(total=Sum("input_bytes"))["total"]
    return (images or 0) + (inputs or 0)


def storage_quota_check(*, owner: ApiKey | None) -> None:
    """Refuse a new generation for a key that already stores its quota or more; anonymous
    requests have no quota. Checked before anything is written, so a refusal leaves nothing."""
    if owner is None:
        return
    limit = storage_quota(owner=owner)
    if not limit:
        return
    used = storage_used(owner=owner)
    if used >= limit:
        raise ApiError(
            f"this API key stores {format_bytes(used)} ({used} bytes) of the {format_bytes(limit)} ({limit} bytes) "
            "it may keep; delete results (DELETE /api/results/<id>/) or ask for a larger quota",
            code="storage_quota_exceeded",
            status_code=403,
        )


# --- pruning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneReport:
    cutoff: datetime
    dry_run: bool
    generations: int = 0
    images: int = 0
    bytes: int = 0

    def describe(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {self.generations} finished generation(s) with {self.images} image(s), "
            f"{format_bytes(self.bytes)} ({self.bytes} bytes), finished before {self.cutoff.isoformat()}"
        )


def prunable(*, cutoff: datetime) -> QuerySet[Generation]:
    """Finished before ``cutoff`` and no webhook delivery still pending; never queued or running."""
    ended_before = Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True, created_at__lt=cutoff)
    pending = WebhookDelivery.objects.filter(state=WebhookDelivery.PENDING).values("generation_id")
    return Generation.objects.filter(ended_before, status__in=FINISHED).exclude(pk__in=pending)


def prune(*, older_than_days: float, dry_run: bool = False, batch_size: int = PRUNE_BATCH_SIZE) -> PruneReport:
    """Delete finished generations older than ``older_than_days``, rows and files together."""
    if older_than_days <= 0:
        raise ValueError(f"older_than_days must be > 0, got {older_than_days}")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    if dry_run:
        rows = prunable(cutoff=cutoff)
        totals = rows.aggregate(n=Count("pk"), inputs=Sum("input_bytes"))
        images = GeneratedImage.objects.filter(generation__in=rows).aggregate(n=Count("pk"), size=Sum("bytes"))
        return PruneReport(
            cutoff=cutoff,
            dry_run=True,
            generations=totals["n"],
            images=images["n"],
            bytes=(totals["inputs"] or 0) + (images["size"] or 0),
        )
    generations = images = size = 0
    while True:
        totals, deleted = _prune_batch(cutoff, batch_size)
        if not deleted:
            break  # nothing left (or nothing selected could go: don't select it again for ever)
        generations += totals["generations"]
        images += totals["images"]
        size += totals["bytes"]
        # Files go once the rows are gone for good: a reader never finds a row without its files.
        for pk, input_name, mask_name in deleted:
            _remove_files(pk, input_name, mask_name)
    return PruneReport(cutoff=cutoff, dry_run=False, generations=generations, images=images, bytes=size)


def _prune_batch(cutoff: datetime, batch_size: int) -> tuple[dict[str, int], list[tuple[Any, str, str]]]:
    """Delete one batch of rows; returns its totals and (id, input, mask) of each row deleted."""
    with transaction.atomic():
        # Rows another pruner holds are skipped (PostgreSQL); SQLite serialises writers anyway.
        selected = list(
            prunable(cutoff=cutoff)
            .order_by("finished_at", "pk")
            .select_for_update(skip_locked=True)
            .values_list("pk", "input_image", "mask_image", "input_bytes")[:batch_size]
        )
        if not selected:
            return {"generations": 0, "images": 0, "bytes": 0}, []
        pks = [row[0] for row in selected]
        per_row = {
            item["generation_id"]: (item["n"], item["size"] or 0)
            for item in GeneratedImage.objects.filter(generation_id__in=pks)
            .values("generation_id")
            .annotate(n=Count("pk"), size=Sum("bytes"))
        }
        # Still finished when deleted (nothing moves a finished row back, but the row is the truth).
        Generation.objects.filter(pk__in=pks, status__in=FINISHED).delete()
        kept = set(Generation.objects.filter(pk__in=pks).values_list("pk", flat=True))
    deleted = [row for row in selected if row[0] not in kept]
    totals = {
        "generations": len(deleted),
        "images": sum(per_row.get(row[0], (0, 0))[0] for row in deleted),
        "bytes": sum(row[3] + per_row.get(row[0], (0, 0))[1] for row in deleted),
    }
    return totals, [(row[0], row[1], row[2]) for row in deleted]


def _remove_files(pk: Any, *inputs: str) -> None:
    try:
        storage.delete_prefix(generation_dir(pk))
        for name in inputs:
            storage.delete(name)
    except Exception:  # noqa: BLE001 - the row is gone; a file left behind is only space
        log.warning("pruned generation %s but could not remove all its files", pk, exc_info=True)


class PeriodicPrune:
    """Prunes with RESULTS_TTL_DAYS when PRUNE_INTERVAL has passed since this process last did.

    The recovery loops of the embedded worker and of each Celery worker call it every pass. It
    never raises: a failed pass is logged and tried again on the next one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None

    def __call__(self) -> PruneReport | None:
        days = settings.RESULTS_TTL_DAYS
        if not days:
            return None
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < settings.PRUNE_INTERVAL:
                return None
            self._last = now
        try:
            report = prune(older_than_days=days)
        except Exception:  # noqa: BLE001 - the loop must outlive a database hiccup
            log.exception("periodic pruning of old results failed")
            with self._lock:
                self._last = None
            return None
        if report.generations:
            log.info("RESULTS_TTL_DAYS=%g: %s", days, report.describe())
        return report


prune_if_due = PeriodicPrune()
