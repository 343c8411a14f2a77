"""Regression tests of fixes that had none: a request waiting on a job that gets deleted, the
Django admin's deletes, and DELETE of a job that is queued or running."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Q

from api.models import Generation, Status
from tests.conftest import png_of

pytestmark = pytest.mark.usefixtures("live_db")

LONG = 150  # steps: the job runs long enough to be caught running (deleting it stops it early)


def generation_folder(generation_id: Any) -> Path:
    return Path(settings.MEDIA_ROOT) / "generations" / str(generation_id)


def input_file(generation_id: Any) -> Path:
    return Path(settings.MEDIA_ROOT) / "inputs" / f"{generation_id}.png"


def wait_for_status(generation_id: Any, *statuses: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Generation.objects.filter(pk=generation_id).values_list("status", flat=True).first()
        if status in statuses:
            return status
        time.sleep(0.02)
    raise AssertionError(f"generation {generation_id} never reached {statuses}")


def wait_for_row(predicate: Any, timeout: float = 60) -> Generation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = Generation.objects.filter(predicate).first()
        if row is not None:
            return row
        time.sleep(0.02)
    raise AssertionError("no such row appeared")


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_request_waiting_on_a_job_that_is_deleted_gets_a_404(live_server, tiny_model_dirs):
    answer: dict[str, Any] = {}

    def wait_synchronously() -> None:
        answer["value"] = http("POST", f"{live_server.url}/api/txt2img/", {"prompt": "doomed", "steps": LONG})

    waiter = threading.Thread(target=wait_synchronously)
    waiter.start()
    row = wait_for_row(~Q(status=Status.QUEUED))  # claimed: the request now waits on it
    status, _ = http("DELETE", f"{live_server.url}/api/results/{row.pk}/")
    assert status == 204
    waiter.join(120)
    assert not waiter.is_alive()

    status, body = answer["value"]
    assert status == 404, body
    assert body["error"]["code"] == "not_found"
    assert f"generation {row.pk} was deleted while this request waited for it" == body["error"]["message"]
    assert not Generation.objects.filter(pk=row.pk).exists()
    # The worker stops the job and leaves nothing behind; the next job runs.
    status, after = http("POST", f"{live_server.url}/api/txt2img/", {"prompt": "next", "steps": 2})
    assert status == 200 and after["status"] == "succeeded"
    assert not generation_folder(row.pk).exists()


def test_delete_of_a_queued_and_of_a_running_job(api, tiny_model_dirs):
    running = api.post("/api/txt2img/", {"prompt": "long", "steps": LONG, "async": True}, format="json").json()
    wait_for_status(running["id"], Status.RUNNING)
    image = base64.b64encode(png_of()).decode()
    queued = api.post(
        "/api/img2img/", {"prompt": "behind it", "image": image, "steps": 2, "async": True}, format="json"
    ).json()
    assert Generation.objects.get(pk=queued["id"]).status == Status.QUEUED
    assert input_file(queued["id"]).exists()

    r = api.delete(f"/api/results/{queued['id']}/")
    assert r.status_code == 204
    assert not Generation.objects.filter(pk=queued["id"]).exists()
    assert not input_file(queued["id"]).exists()
    assert api.get(f"/api/results/{queued['id']}/").status_code == 404

    assert Generation.objects.get(pk=running["id"]).status == Status.RUNNING
    r = api.delete(f"/api/results/{running['id']}/")
    assert r.status_code == 204
    assert not Generation.objects.filter(pk=running["id"]).exists()
    assert api.get(f"/api/results/{running['id']}/").status_code == 404

    # The worker lets go of the deleted job and runs the next; neither deleted job left files.
    after = api.post("/api/txt2img/", {"prompt": "next", "steps": 2}, format="json").json()
    assert after["status"] == "succeeded"
    assert not generation_folder(running["id"]).exists()
    assert not generation_folder(queued["id"]).exists()
    assert Generation.objects.count() == 1


@pytest.fixture
def admin_client(client, django_user_model):  # noqa: ANN001, ANN201
    admin = django_user_model.objects.create_superuser("admin", "admin@example.com", "pw-12345-xyz")
    client.force_login(admin)
    return client


def finished_img2img(api) -> dict[str, Any]:  # noqa: ANN001
    body = {"prompt": "kept?", "image": base64.b64encode(png_of()).decode(), "steps": 2, "strength": 0.5}
    done = api.post("/api/img2img/", body, format="json").json()
    assert done["status"] == "succeeded", done
    assert any(generation_folder(done["id"]).iterdir()) and input_file(done["id"]).exists()
    return done


def test_the_admin_delete_selected_action_removes_the_files(api, admin_client, tiny_model_dirs):
    first, second = finished_img2img(api), finished_img2img(api)
    kept = api.post("/api/txt2img/", {"prompt": "not selected", "steps": 2}, format="json").json()
    r = admin_client.post(
        "/admin/api/generation/",
        {"action": "delete_selected", "_selected_action": [first["id"], second["id"]], "post": "yes"},
    )
    assert r.status_code == 302, r.content[:500]
    for gone in (first, second):
        assert not Generation.objects.filter(pk=gone["id"]).exists()
        assert not generation_folder(gone["id"]).exists()
        assert not input_file(gone["id"]).exists()
    assert Generation.objects.filter(pk=kept["id"]).exists()
    assert any(generation_folder(kept["id"]).iterdir())


def test_the_admin_delete_page_removes_the_files(api, admin_client, tiny_model_dirs):
    done = finished_img2img(api)
    page = admin_client.get(f"/admin/api/generation/{done['id']}/delete/")
    assert page.status_code == 200
    r = admin_client.post(f"/admin/api/generation/{done['id']}/delete/", {"post": "yes"})
    assert r.status_code == 302, r.content[:500]
    assert not Generation.objects.filter(pk=done["id"]).exists()
    assert not generation_folder(done["id"]).exists()
    assert not input_file(done["id"]).exists()
