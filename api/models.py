"""The job row is the source of truth for a generation: status, progress, result, errors."""

from __future__ import annotations

import uuid

from django.db import models


class Status(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
ACTIVE = (Status.QUEUED, Status.RUNNING)


class Kind(models.TextChoices):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"


class Generation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    model_id = models.CharField(max_length=128)
    params = models.JSONField(default=dict)
    seed = models.BigIntegerField()
    backend = models.CharField(max_length=16, blank=True, default="")
    # Server-made name under MEDIA_ROOT; the worker reads the img2img source from here.
    input_image = models.CharField(max_length=255, blank=True, default="")
    error = models.JSONField(null=True, blank=True)
    warnings = models.JSONField(default=list, blank=True)
    progress = models.JSONField(null=True, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    worker = models.CharField(max_length=128, blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    response_format = models.CharField(max_length=16, default="url")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} [{self.status}]"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED


class GeneratedImage(models.Model):
    generation = models.ForeignKey(Generation, related_name="images", on_delete=models.CASCADE)
    index = models.PositiveSmallIntegerField()
    file = models.CharField(max_length=255)  # relative to MEDIA_ROOT
    seed = models.BigIntegerField()
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["generation", "index"], name="unique_image_index")]

    def __str__(self) -> str:
        return self.file
