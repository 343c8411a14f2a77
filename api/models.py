"""The job row is the source of truth for a generation: status, progress, result, errors."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: "whsec_" + base64 of 24 random bytes."""
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


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
    INPAINT = "inpaint"


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
    # Inpaint: the mask (white = repaint), stored as an 8-bit PNG beside the input image.
    mask_image = models.CharField(max_length=255, blank=True, default="")
    # The latest cheap preview of a running job (base64 PNG); cleared when it finishes.
    preview = models.TextField(blank=True, default="")
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
    owner = models.ForeignKey("ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="generations")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")
    # Signed webhook of the job's end (api/services/webhooks.py): where, for which events, and the
    # base URL its request came through (so image URLs in the payload are absolute).
    webhook_url = models.CharField(max_length=2048, blank=True, default="")
    webhook_events = models.JSONField(default=list, blank=True)
    webhook_base_url = models.CharField(max_length=512, blank=True, default="")
    # Bytes of the stored input and mask files, counted against the owner's storage quota.
    input_bytes = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            models.Index(fields=["owner", "status"]),
            # Retention (api/services/retention.py) looks for finished rows by their end.
            models.Index(fields=["status", "finished_at"], name="api_generation_status_finished"),
        ]
        constraints = [
            # NULLs are distinct in SQL unique indexes, so anonymous requests get their own.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=models.Q(owner__isnull=False, idempotency_key__isnull=False),
                name="unique_idempotency_key_per_owner",
            ),
            models.UniqueConstraint(
                fields=["idempotency_key"],
                condition=models.Q(owner__isnull=True, idempotency_key__isnull=False),
                name="unique_idempotency_key_anonymous",
            ),
        ]

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
    bytes = models.PositiveBigIntegerField(default=0)  # stored: the PNG and its thumbnail

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["generation", "index"], name="unique_image_index")]

    def __str__(self) -> str:
        return self.file


class ApiKey(models.Model):
    """An API key. Only a SHA-256 of the key is stored; the key itself is shown once."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True, help_text="First characters, to recognise a key")
    key_hash = models.CharField(max_length=64, unique=True)
    is_staff = models.BooleanField(default=False, help_text="Sees and deletes every key's results")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Standard Webhooks secret ("whsec_" + base64) that signs this key's webhook deliveries.
    webhook_secret = models.CharField(max_length=128, blank=True, default=new_webhook_secret)
    storage_quota_bytes = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Bytes of images and inputs this key may keep stored; empty: STORAGE_QUOTA_BYTES, 0: unlimited",
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class ClientState(models.Model):
    """Per-caller state that a foreign protocol keeps between requests.

    A1111 clients set the checkpoint with ``POST /sdapi/v1/options`` and expect the next
    ``txt2img`` to use it. ``scope`` names the protocol and the caller (an API key, or the
    one shared anonymous scope), so one caller's choice never changes another's.
    """

    scope = models.CharField(max_length=64, unique=True)
    data = models.JSONField(default=dict)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.scope


class WebhookDelivery(models.Model):
    """One webhook message (a job's end), sent at least once: the outbox row of its delivery."""

    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

    generation = models.ForeignKey(Generation, related_name="webhook_deliveries", on_delete=models.CASCADE)
    event = models.CharField(max_length=16)
    url = models.CharField(max_length=2048)
    msg_id = models.CharField(max_length=80, unique=True)  # webhook-id: the same on every retry
    state = models.CharField(max_length=16, default=PENDING, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True, default="")
    log = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_webhook_delivery"
        constraints = [models.UniqueConstraint(fields=["generation", "event"], name="one_delivery_per_event")]

    def __str__(self) -> str:
        return f"{self.event} of {self.generation_id} -> {self.state}"
