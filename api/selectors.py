"""Reads: the model catalogue and the job table, never writes."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from backend.catalog import ModelSpec
from backend.manager import ModelManager

from .models import ACTIVE, ApiKey, Generation, Status


def lora_catalog() -> dict[str, Any]:
    """The LoRAs in LORA_DIR by name, scanned now: new files appear without a restart."""
    from backend.loras import scan_loras

    config = ModelManager.instance().config
    return scan_loras(config.base_dir / config.lora_dir)


def embedding_catalog() -> dict[str, Any]:
    """The textual-inversion embeddings in EMBEDDINGS_DIR by name (their prompt tokens)."""
    from backend.embeddings import scan_embeddings

    config = ModelManager.instance().config
    return scan_embeddings(config.base_dir / config.embeddings_dir)


def model_catalog() -> dict[str, ModelSpec]:
    # Reading it imports no torch; a checkpoint dropped into CHECKPOINT_DIR shows up at once.
    manager = ModelManager.instance()
    manager.refresh_catalog()
    return manager.catalog


def generation_list(*, viewer: ApiKey | None = None) -> QuerySet[Generation]:
    """What ``viewer`` may see: a key its own results, a staff key (or no key, with auth off) all."""
    rows = Generation.objects.prefetch_related("images", "webhook_deliveries").order_by("-created_at", "-id")
    if viewer is not None and not viewer.is_staff:
        rows = rows.filter(owner=viewer)
    return rows


def generation_get(*, generation_id: Any, viewer: ApiKey | None = None) -> Generation:
    return generation_list(viewer=viewer).get(pk=generation_id)


def queue_position(*, generation: Generation) -> int:
    """1 for the next job to run; counts queued jobs created before this one."""
    ahead = Generation.objects.filter(status=Status.QUEUED, created_at__lt=generation.created_at).count()
    return ahead + 1


def queue_counts() -> dict[str, int]:
    return {
        "queued": Generation.objects.filter(status=Status.QUEUED).count(),
        "running": Generation.objects.filter(status=Status.RUNNING).count(),
    }


def generation_active(*, owner: ApiKey | None) -> QuerySet[Generation]:
    """One caller's queued and running jobs, oldest first: a key's own, or (None) the
    anonymous callers' shared ones. Never another key's, even for a staff key."""
    rows = Generation.objects.filter(status__in=ACTIVE).order_by("created_at", "id")
    return rows.filter(owner=owner) if owner is not None else rows.filter(owner__isnull=True)


def generation_preview(*, generation_id: Any) -> str:
    """The latest preview of a running job as base64 PNG, or "" when there is none."""
    return Generation.objects.filter(pk=generation_id).values_list("preview", flat=True).first() or ""
