"""Reads: the model catalogue and the job table, never writes."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from backend.catalog import ModelSpec
from backend.manager import ModelManager

from .models import ApiKey, Generation, Status


def model_catalog() -> dict[str, ModelSpec]:
    # The manager's catalogue is loaded once per process; reading it imports no torch.
    return ModelManager.instance().catalog


def generation_list(*, viewer: ApiKey | None = None) -> QuerySet[Generation]:
    """What ``viewer`` may see: a key its own results, a staff key (or no key, with auth off) all."""
    rows = Generation.objects.prefetch_related("images").order_by("-created_at", "-id")
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
