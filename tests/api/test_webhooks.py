"""Signed webhooks, received by a real HTTP server on loopback and verified with the
`standardwebhooks` package: delivery, retries with one message id, event choice, SSRF refusal,
secrets per key and their rotation, and a delivery whose sender died."""

from __future__ import annotations

import io
import json
import threading
import time
from contextlib import redirect_stderr
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.models import ApiKey, Generation, WebhookDelivery
from api.services import webhooks


class Receiver:
    """A webhook endpoint: records each POST; answers with the codes given, then 200."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers.items()), "body": body})
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sd?x=1"

    def wait(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.received) >= count, f"got {len(self.received)} deliveries, wanted {count}"
        return self.received

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():  # noqa: ANN201
    made: list[Receiver] = []

    def make(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def new_key(name: str) -> tuple[str, str]:
    """(key, webhook secret): create_api_key prints the key, and the secret once on stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err):
        call_command("create_api_key", name, stdout=out, stderr=err)
    key = out.getvalue().strip().splitlines()[-1]
    secret = ApiKey.objects.get(name=name).webhook_secret
    assert secret.startswith("whsec_") and secret in err.getvalue()
    return key, secret


def client(key: str | None) -> APIClient:
    c = APIClient()
    if key:
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return c


def job(c: APIClient, **extra: Any) -> dict[str, Any]:
    body = {"prompt": "a bell", "seed": 9, "steps": 2, "width": 64, "height": 64, **extra}
    r = c.post("/api/txt2img/", body, format="json")
    assert r.status_code in (200, 202), r.content
    return r.json()


@pytest.fixture
def hooks(settings, live_db, tiny_model_dirs):  # noqa: ANN001, ANN201
    settings.WEBHOOK_ALLOW_PRIVATE = True  # the receiver is on loopback
    settings.WEBHOOK_RETRY_DELAYS = [0.2]
    settings.WEBHOOK_POLL_INTERVAL = 0.05
    webhooks.start_dispatcher()
    return settings


def test_a_finished_job_is_posted_signed_with_the_keys_secret(hooks, receiver):
    r = receiver()
    key, secret = new_key("hooked")
    done = job(client(key), webhook_url=r.url)
    assert done["status"] == "succeeded"
    (got,) = r.wait(1)
    headers = {k.lower(): v for k, v in got["headers"].items()}
    # The real Standard Webhooks verifier accepts it, and rejects it under another secret.
    payload = Webhook(secret).verify(got["body"], headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(got["body"], headers)
    assert payload["type"] == "generation.completed"
    assert payload["data"]["id"] == done["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["images"][0]["url"].startswith("http://testserver/media/")
    assert headers["webhook-id"] == f"msg_{done['id'].replace('-', '')}_completed"
    # The generation shows the delivery.
    deadline = time.monotonic() + 10
    while True:
        shown = client(key).get(f"/api/results/{done['id']}/").json()["webhook"]
        if shown["deliveries"] and shown["deliveries"][0]["state"] == "delivered" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert shown["url"] == r.url and shown["events"] == ["completed", "failed", "cancelled"]
    assert shown["deliveries"][0]["state"] == "delivered" and shown["deliveries"][0]["attempts"] == 1


def test_failures_are_retried_with_the_same_message_id_until_delivered(hooks, receiver):
    r = receiver(codes=[500, 503])
    key, secret = new_key("retry")
    done = job(client(key), webhook_url=r.url)
    got = r.wait(3)
    assert len({g["headers"]["webhook-id"] for g in got}) == 1
    for g in got:  # each attempt signed afresh, each valid
        Webhook(secret).verify(g["body"], {k.lower(): v for k, v in g["headers"].items()})
    deadline = time.monotonic() + 10
    while WebhookDelivery.objects.get(generation_id=done["id"]).state != "delivered":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    delivery = WebhookDelivery.objects.get(generation_id=done["id"])
    assert delivery.attempts == 3 and [e["status_code"] for e in delivery.log] == [500, 503, 200]


def test_gone_or_too_many_failures_end_the_delivery_failed(hooks, receiver):
    hooks.WEBHOOK_MAX_ATTEMPTS = 2
    r = receiver(codes=[500, 500, 500])
    key, _ = new_key("giveup")
    done = job(client(key), webhook_url=r.url)
    r.wait(2)
    deadline = time.monotonic() + 10
    while WebhookDelivery.objects.get(generation_id=done["id"]).state != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(r.received) == 2  # no third try


def test_only_the_chosen_events_are_sent_and_a_queued_cancel_is_one(hooks, receiver, settings):
    r = receiver()
    key, _ = new_key("choosy")
    c = client(key)
    done = job(c, webhook_url=r.url, webhook_events=["failed", "cancelled"])
    assert done["status"] == "succeeded"
    # Hold the worker, queue a job behind it, cancel that one while queued.
    slow = job(c, prompt="hold", steps=150, **{"async": True})
    queued = job(c, webhook_url=r.url, webhook_events=["cancelled"], **{"async": True})
    assert c.post(f"/api/results/{queued['id']}/cancel/").status_code == 200
    (got,) = r.wait(1)
    assert json.loads(got["body"])["type"] == "generation.cancelled"
    assert json.loads(got["body"])["data"]["id"] == queued["id"]
    c.post(f"/api/results/{slow['id']}/cancel/")
    time.sleep(0.3)
    assert len(r.received) == 1  # nothing for the succeeded one


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/x", "127.0.0.1"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]:8080/", "::1"),
        ("ftp://example.com/x", "http:// or https://"),
        ("http://user:pw@example.com/", "user name"),
        ("http://no-such-host.invalid/", "can't be resolved"),
    ],
)
def test_targets_that_are_not_public_are_refused_with_a_400_and_nothing_is_created(url, why, settings, tiny_model_dirs):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    key, _ = new_key("ssrf")
    r = client(key).post("/api/txt2img/", {"prompt": "x", "webhook_url": url}, format="json")
    assert r.status_code == 400, r.content
    message = r.json()["error"]["fields"]["webhook_url"][0]
    assert why in message
    assert Generation.objects.count() == 0


@pytest.mark.django_db
def test_without_a_key_a_server_secret_is_needed_and_events_are_checked(settings, tiny_model_dirs):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    anon = client(None)
    r = anon.post("/api/txt2img/", {"prompt": "x", "webhook_url": "http://127.0.0.1:9/"}, format="json")
    assert r.status_code == 400 and "WEBHOOK_SECRET" in r.json()["error"]["fields"]["webhook_url"][0]
    settings.WEBHOOK_SECRET = webhooks.new_secret()
    r = anon.post(
        "/api/txt2img/",
        {"prompt": "x", "webhook_url": "http://127.0.0.1:9/", "webhook_events": ["done"]},
        format="json",
    )
    assert r.status_code == 400 and "webhook_events" in r.json()["error"]["fields"]
    assert Generation.objects.count() == 0


@pytest.mark.django_db
def test_rotation_gives_a_new_secret_that_signs_from_then_on():
    _, old = new_key("rotating")
    out, err = io.StringIO(), io.StringIO()
    call_command("rotate_webhook_secret", "rotating", stdout=out, stderr=err)
    new = out.getvalue().strip()
    assert new.startswith("whsec_") and new != old
    assert ApiKey.objects.get(name="rotating").webhook_secret == new
    body, stamp = b'{"a":1}', int(time.time())
    signature = webhooks.sign(new, "msg_1", stamp, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp), "webhook-signature": signature}
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


@pytest.mark.usefixtures("live_db")
def test_a_delivery_whose_sender_died_mid_send_is_sent_again_after_its_lease(settings, receiver, tiny_model_dirs):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    r = receiver()
    key, secret = new_key("crashy")
    owner = ApiKey.objects.get(name="crashy")
    g = Generation.objects.create(
        kind="txt2img", model_id="tiny-sd", params={}, seed=1, status="succeeded", owner=owner, webhook_url=r.url
    )
    # Claimed by a dispatcher that died: its lease is still running, so nobody sends it...
    delivery = WebhookDelivery.objects.create(
        generation=g,
        event="completed",
        url=r.url,
        msg_id="msg_x_completed",
        lease_until=timezone.now() + timedelta(hours=1),
    )
    assert webhooks.deliver_due() == 0
    # ...until the lease runs out; then it goes (again) under the same id.
    WebhookDelivery.objects.filter(pk=delivery.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert webhooks.deliver_due() == 1
    (got,) = r.wait(1)
    assert got["headers"]["webhook-id"] == "msg_x_completed"
    Webhook(secret).verify(got["body"], {k.lower(): v for k, v in got["headers"].items()})
    assert WebhookDelivery.objects.get(pk=delivery.pk).state == "delivered"
