"""Signed webhooks: a job's end POSTed to the URL its request named, at least once.

- **Signed** as Standard Webhooks specifies: headers ``webhook-id`` (the same on every retry of
  one message), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
  (``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``), keyed with the API key's secret
  (``whsec_`` + base64; ``create_api_key`` prints it once, ``rotate_webhook_secret`` makes a new
  one), or ``WEBHOOK_SECRET`` for requests without a key.
- **At least once.** The delivery row is written in the same transaction as the job's end
  (``schedule``). Dispatcher threads (in each process that runs jobs) claim due deliveries with a
  lease, POST them, and on anything but 2xx retry with backoff (``WEBHOOK_RETRY_DELAYS``) up to
  ``WEBHOOK_MAX_ATTEMPTS``; a dispatcher that dies mid-send loses its lease and the delivery is
  sent again. Every attempt is recorded and shown on the generation.
- **No SSRF.** A target must be http(s) on a public address: private, loopback, link-local,
  reserved and multicast addresses are refused (at the request, and again at each send, where the
  connection goes to the very address that was checked) unless ``WEBHOOK_ALLOW_PRIVATE=true``.
  Redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from ..models import ApiKey, Generation, Status, WebhookDelivery

log = logging.getLogger("api.webhooks")

EVENTS = ("completed", "failed", "cancelled")
EVENT_OF_STATUS = {Status.SUCCEEDED: "completed", Status.FAILED: "failed", Status.CANCELLED: "cancelled"}
SECRET_PREFIX = "whsec_"
USER_AGENT = "sdapi-webhooks/1"


class WebhookTargetError(ValueError):
    """The URL may not be called: a sentence for the person who sent it."""


# --- secrets and signatures ------------------------------------------------------------------


def new_secret() -> str:
    from ..models import new_webhook_secret

    return new_webhook_secret()


def secret_bytes(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


# --- targets ----------------------------------------------------------------------------------


def _addresses(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetError(f"the host {host!r} can't be resolved ({exc})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def check_target(url: str) -> tuple[str, str, int, str, list[str]]:
    """(scheme, host, port, path+query, allowed addresses) of a URL that may be called."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookTargetError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise WebhookTargetError("must not carry a user name or password")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(parts.hostname, port)
    if not settings.WEBHOOK_ALLOW_PRIVATE:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not ip.is_global or ip.is_multicast:
                raise WebhookTargetError(
                    f"{parts.hostname} resolves to {address}, a private, loopback, link-local or reserved address; "
                    "such targets are refused unless the server sets WEBHOOK_ALLOW_PRIVATE=true"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path, addresses


def validate_request(url: str, events: list[str] | None, owner: ApiKey | None) -> list[str]:
    """Raise WebhookTargetError (for ``webhook_url``) or ValueError (for ``webhook_events``)."""
    if len(url) > 2048:
        raise WebhookTargetError(f"must be at most 2048 characters, got {len(url)}")
    if secret_for(owner) == "":
        raise WebhookTargetError(
            "needs an API key (its webhook secret signs the deliveries), or WEBHOOK_SECRET on the server "
            "for requests without one"
        )
    check_target(url)
    chosen = list(EVENTS) if events is None else events
    unknown = [e for e in chosen if e not in EVENTS]
    if unknown or not chosen:
        raise ValueError(f"must be a non-empty list of {', '.join(EVENTS)}; got {events!r}")
    return list(dict.fromkeys(chosen))


def webhook_request(*, url: str, events: list[str] | None, owner: ApiKey | None, base_url: str) -> dict[str, Any]:
    """The webhook part of a generation request, checked; a 400 naming the field if not."""
    from rest_framework.exceptions import ValidationError

    try:
        chosen = validate_request(url, events, owner)
    except WebhookTargetError as exc:
        raise ValidationError({"webhook_url": [f"webhook_url {exc}"]}) from None
    except ValueError as exc:
        raise ValidationError({"webhook_events": [f"webhook_events {exc}"]}) from None
    return {"webhook_url": url, "webhook_events": chosen, "webhook_base_url": base_url[:512]}


def secret_for(owner: ApiKey | None) -> str:
    if owner is not None:
        return owner.webhook_secret or ""
    return settings.WEBHOOK_SECRET


# --- scheduling -------------------------------------------------------------------------------


def schedule(generation_id: Any, status: str) -> None:
    """Inside the transaction that ends the job: queue the delivery its request asked for."""
    event = EVENT_OF_STATUS.get(status)
    if event is None:
        return
    row = Generation.objects.filter(pk=generation_id).values("webhook_url", "webhook_events").first()
    if not row or not row["webhook_url"] or event not in (row["webhook_events"] or EVENTS):
        return
    WebhookDelivery.objects.get_or_create(
        generation_id=generation_id,
        event=event,
        defaults={"url": row["webhook_url"], "msg_id": f"msg_{str(generation_id).replace('-', '')}_{event}"},
    )
    transaction.on_commit(wake)


# --- sending ----------------------------------------------------------------------------------


def payload(delivery: WebhookDelivery) -> bytes:
    from ..selectors import generation_list
    from ..serializers import GenerationSerializer

    generation = generation_list().filter(pk=delivery.generation_id).first()
    data: dict[str, Any]
    if generation is None:
        data = {"id": str(delivery.generation_id)}
    else:
        data = dict(GenerationSerializer(generation, context={"base_url": generation.webhook_base_url}).data)
    body = {"type": f"generation.{delivery.event}", "timestamp": timezone.now().isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), default=str).encode()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address already checked, with the certificate checked for the host name."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def send(url: str, msg_id: str, secret: str, body: bytes) -> tuple[int | None, str]:
    """POST once; (status code or None, error text or "")."""
    try:
        scheme, host, port, path, addresses = check_target(url)
    except WebhookTargetError as exc:
        return None, f"refused: {exc}"
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(addresses[0], host, port, settings.WEBHOOK_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65536)
        return response.status, ""
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300]
    finally:
        conn.close()


def deliver_due(limit: int = 20) -> int:
    """Claim and send the deliveries that are due; returns how many were attempted."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.WEBHOOK_TIMEOUT * 3 + 30)
    due = (
        WebhookDelivery.objects.filter(state=WebhookDelivery.PENDING, next_attempt_at__lte=now)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .order_by("next_attempt_at")
        .values_list("pk", "lease_until")[:limit]
    )
    sent = 0
    for pk, held in due:
        # Conditional on the lease we saw: two dispatchers never send one attempt twice at once.
        if not WebhookDelivery.objects.filter(pk=pk, state=WebhookDelivery.PENDING, lease_until=held).update(
            lease_until=lease
        ):
            continue
        delivery = WebhookDelivery.objects.select_related("generation__owner").get(pk=pk)
        _attempt(delivery)
        sent += 1
    return sent


def _attempt(delivery: WebhookDelivery) -> None:
    owner = delivery.generation.owner if delivery.generation_id and delivery.generation else None
    secret = secret_for(owner)
    started = timezone.now()
    if not secret:
        code, error = None, "no webhook secret: the API key was deleted, or WEBHOOK_SECRET is unset"
    else:
        code, error = send(delivery.url, delivery.msg_id, secret, payload(delivery))
    attempts = delivery.attempts + 1
    ok = code is not None and 200 <= code < 300
    if not ok and not error:
        error = f"HTTP {code}"
    record = {"attempt": attempts, "at": started.isoformat(), "status_code": code, "error": error or None}
    log_entries = (delivery.log or [])[-9:] + [record]
    fields: dict[str, Any] = {"attempts": attempts, "last_status_code": code, "last_error": error, "log": log_entries}
    if ok:
        fields.update(state=WebhookDelivery.DELIVERED, delivered_at=timezone.now(), lease_until=None)
    elif code == 410 or attempts >= settings.WEBHOOK_MAX_ATTEMPTS or error.startswith("refused:"):
        fields.update(state=WebhookDelivery.FAILED, lease_until=None)
    else:
        delays = settings.WEBHOOK_RETRY_DELAYS
        delay = delays[min(attempts - 1, len(delays) - 1)]
        fields.update(next_attempt_at=timezone.now() + timedelta(seconds=delay), lease_until=None)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)
    if not ok:
        log.warning("webhook %s to %s: attempt %d failed (%s)", delivery.msg_id, delivery.url, attempts, error)


# --- the dispatcher -----------------------------------------------------------------------------

_wake = threading.Event()
_thread: threading.Thread | None = None
_thread_stop = threading.Event()
_thread_lock = threading.Lock()


def wake() -> None:
    _wake.set()


def start_dispatcher() -> None:
    """In each process that runs jobs: a side thread that sends due deliveries."""
    global _thread, _thread_stop
    with _thread_lock:
        if _thread is not None and _thread.is_alive():
            return
        _thread_stop = threading.Event()
        _thread = threading.Thread(target=_loop, args=(_thread_stop,), name="webhooks", daemon=True)
        _thread.start()


def stop_dispatcher(timeout: float = 30.0) -> None:
    """End the dispatcher thread after the delivery under way; due ones wait for the next start."""
    global _thread
    with _thread_lock:
        thread, stop, _thread = _thread, _thread_stop, None
    if thread is not None:
        stop.set()
        _wake.set()
        thread.join(timeout)


def _loop(stop: threading.Event) -> None:
    backoff = 0.0
    while True:
        _wake.wait(settings.WEBHOOK_POLL_INTERVAL + backoff)
        _wake.clear()
        if stop.is_set():
            connection.close()
            return
        try:
            while deliver_due():
                pass
            backoff = 0.0
        except Exception as exc:  # noqa: BLE001 - the loop must outlive a database outage
            backoff = min(backoff * 2 or 1.0, 30.0)
            log.warning("webhook dispatch failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc, backoff)
        finally:
            connection.close()
            close_old_connections()
