"""Retention (RESULTS_TTL_DAYS, prune_results, periodic pruning) and per-key storage quotas.

Everything here runs on real rows and real files under MEDIA_ROOT; the periodic pruning runs in
real processes (the web process's embedded worker, and a Celery worker on a real Redis).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import uuid
from contextlib import redirect_stderr
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from api import storage
from api.auth import api_key_create
from api.images import thumbnail_name
from api.models import ApiKey, GeneratedImage, Generation, WebhookDelivery
from api.services.retention import PeriodicPrune, format_bytes, prune, storage_used
from tests.api.test_celery_worker import ROOT, Worker, database_env, redis_reachable, wait_for
from tests.conftest import png_of, require_service

GEN = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3}


# --- helpers -----------------------------------------------------------------------------------


def stored_row(
    status: str,
    *,
    ended_days_ago: float | None = None,
    created_days_ago: float = 0,
    images: int = 0,
    with_input: bool = False,
    owner: ApiKey | None = None,
) -> Generation:
    """A generation with real files under MEDIA_ROOT and the sizes recorded as the server does."""
    gid = uuid.uuid4()
    input_name = ""
    input_bytes = 0
    if with_input:
        input_name = f"inputs/{gid}.png"
        data = png_of((10, 20, 30))
        storage.save(input_name, data)
        input_bytes = len(data)
    row = Generation.objects.create(
        id=gid,
        kind="img2img" if with_input else "txt2img",
        model_id="tiny-sd",
        params={"prompt": "x"},
        seed=1,
        status=status,
        input_image=input_name,
        input_bytes=input_bytes,
        owner=owner,
    )
    for index in range(images):
        name = f"generations/{gid}/{index}-{index}.png"
        data = png_of((index * 40, 100, 200), size=(64 + 8 * index, 64))
        storage.save(name, data)
        GeneratedImage.objects.create(
            generation=row, index=index, file=name, seed=index, width=64, height=64, bytes=len(data)
        )
    now = timezone.now()
    # auto_now_add ignores explicit values: set the timestamps afterwards.
    Generation.objects.filter(pk=gid).update(
        created_at=now - timedelta(days=created_days_ago),
        finished_at=None if ended_days_ago is None else now - timedelta(days=ended_days_ago),
    )
    return Generation.objects.get(pk=gid)


def files_of(row: Generation) -> list[Path]:
    """Every file the row has on disk (images and input)."""
    root = Path(settings.MEDIA_ROOT)
    found = sorted((root / "generations" / str(row.pk)).glob("*"))
    if row.input_image:
        found.append(root / row.input_image)
    return found


def disk_bytes(rows: list[Generation]) -> int:
    """On-disk size of what a quota counts: each image's PNG and thumbnail, the input and the mask."""
    root = Path(settings.MEDIA_ROOT)
    images = [name for row in rows for name in row.images.values_list("file", flat=True)]
    names = [*images, *(thumbnail_name(name) for name in images)]
    names += [name for row in rows for name in (row.input_image, row.mask_image) if name]
    return sum((root / name).stat().st_size for name in names if (root / name).is_file())


def exists(row: Generation) -> bool:
    return Generation.objects.filter(pk=row.pk).exists()


def client_for(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def input_files() -> set[str]:
    folder = Path(settings.MEDIA_ROOT) / "inputs"
    return {p.name for p in folder.glob("*")} if folder.exists() else set()


# --- pruning -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_prune_deletes_old_finished_rows_with_their_files_and_keeps_recent_and_active():
    old_ok = stored_row("succeeded", ended_days_ago=10, created_days_ago=10, images=2, with_input=True)
    old_failed = stored_row("failed", ended_days_ago=8, created_days_ago=8, with_input=True)
    # Finished but without an end time (an old row): its creation time counts.
    old_cancelled = stored_row("cancelled", ended_days_ago=None, created_days_ago=9, images=1)
    recent = stored_row("succeeded", ended_days_ago=0.5, created_days_ago=0.5, images=1, with_input=True)
    # Never pruned, however old, even with a stray finished_at.
    queued = stored_row("queued", ended_days_ago=30, created_days_ago=30, with_input=True)
    running = stored_row("running", created_days_ago=30, images=1)
    # Its webhook is still being delivered: kept until the delivery ends.
    webhooked = stored_row("succeeded", ended_days_ago=10, created_days_ago=10, images=1)
    WebhookDelivery.objects.create(generation=webhooked, event="completed", url="https://example.com/hook", msg_id="m1")

    doomed = [old_ok, old_failed, old_cancelled]
    kept = [recent, queued, running, webhooked]
    doomed_files = [path for row in doomed for path in files_of(row)]
    kept_files = [path for row in kept for path in files_of(row)]
    assert len(doomed_files) == 5 and len(kept_files) == 5
    expected_bytes = disk_bytes(doomed)

    dry = prune(older_than_days=7, dry_run=True)
    assert (dry.dry_run, dry.generations, dry.images, dry.bytes) == (True, 3, 3, expected_bytes)
    assert all(exists(row) for row in doomed + kept)
    assert all(path.is_file() for path in doomed_files + kept_files)

    done = prune(older_than_days=7)
    assert (done.dry_run, done.generations, done.images, done.bytes) == (False, 3, 3, expected_bytes)
    assert not any(exists(row) for row in doomed)
    assert not any(path.exists() for path in doomed_files)
    assert not (Path(settings.MEDIA_ROOT) / "generations" / str(old_ok.pk)).exists()
    assert all(exists(row) for row in kept)
    assert all(path.is_file() for path in kept_files)
    assert GeneratedImage.objects.filter(generation__in=doomed).count() == 0

    # Nothing left to prune: a second pass is a no-op.
    again = prune(older_than_days=7)
    assert (again.generations, again.images, again.bytes) == (0, 0, 0)
    # The delivery ends: the row goes on the next pass.
    WebhookDelivery.objects.filter(generation=webhooked).update(state=WebhookDelivery.DELIVERED)
    assert prune(older_than_days=7).generations == 1
    assert not exists(webhooked)


@pytest.mark.django_db
def test_prune_works_in_batches():
    rows = [stored_row("succeeded", ended_days_ago=3, created_days_ago=3, images=1) for _ in range(5)]
    report = prune(older_than_days=1, batch_size=2)
    assert (report.generations, report.images) == (5, 5)
    assert not any(exists(row) for row in rows)
    assert not any(path.exists() for row in rows for path in files_of(row))


@pytest.mark.django_db
def test_prune_refuses_a_non_positive_age():
    for days in (0, -1):
        with pytest.raises(ValueError, match="older_than_days must be > 0"):
            prune(older_than_days=days)


@pytest.mark.usefixtures("live_db")
def test_two_pruners_at_once_delete_each_row_once_and_fail_nowhere():
    rows = [stored_row("succeeded", ended_days_ago=5, created_days_ago=5, images=1) for _ in range(12)]
    reports: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(prune(older_than_days=1, batch_size=3))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(r.generations for r in reports) == 12
    assert sum(r.images for r in reports) == 12
    assert Generation.objects.count() == 0
    assert not any(path.exists() for row in rows for path in files_of(row))


@pytest.mark.django_db
def test_prune_results_command_dry_run_then_for_real(settings):
    old = stored_row("succeeded", ended_days_ago=40, created_days_ago=40, images=2)
    recent = stored_row("failed", ended_days_ago=1, created_days_ago=1)
    size = disk_bytes([old])

    out = io.StringIO()
    call_command("prune_results", "--days", "30", "--dry-run", stdout=out)
    assert out.getvalue().startswith(
        f"would delete 1 finished generation(s) with 2 image(s), {format_bytes(size)} ({size} bytes)"
    )
    assert exists(old) and all(p.is_file() for p in files_of(old))

    # Without --days the setting is the age.
    settings.RESULTS_TTL_DAYS = 30
    out = io.StringIO()
    call_command("prune_results", stdout=out)
    assert out.getvalue().startswith(f"deleted 1 finished generation(s) with 2 image(s), {format_bytes(size)}")
    assert not exists(old) and exists(recent)


@pytest.mark.django_db
def test_prune_results_command_needs_an_age_above_zero(settings):
    settings.RESULTS_TTL_DAYS = 0
    with pytest.raises(CommandError, match="give --days N, or set RESULTS_TTL_DAYS"):
        call_command("prune_results")
    for bad in ("0", "-2", "soon"):
        with pytest.raises(CommandError, match="--days"):
            call_command("prune_results", "--days", bad)


def test_format_bytes_is_decimal_with_one_digit():
    assert [format_bytes(n) for n in (0, 999, 1000, 1_234_567, 999_960, 5 * 10**12)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.2 MB",
        "1.0 MB",
        "5.0 TB",
    ]


# --- periodic pruning --------------------------------------------------------------------------


@pytest.mark.django_db
def test_periodic_prune_runs_only_with_a_ttl_and_once_per_interval(settings):
    periodic = PeriodicPrune()
    first = stored_row("succeeded", ended_days_ago=3, created_days_ago=3, images=1)
    settings.RESULTS_TTL_DAYS = 0
    assert periodic() is None and exists(first)

    settings.RESULTS_TTL_DAYS = 2
    settings.PRUNE_INTERVAL = 3600
    report = periodic()
    assert report is not None and report.generations == 1 and not exists(first)
    # Not due again within PRUNE_INTERVAL.
    second = stored_row("succeeded", ended_days_ago=3, created_days_ago=3, images=1)
    assert periodic() is None and exists(second)
    settings.PRUNE_INTERVAL = 0.05
    threading.Event().wait(0.1)
    report = periodic()
    assert report is not None and report.generations == 1 and not exists(second)


def _process_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings_test",
        ENV_FILE="none",
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        TINY_MODELS_DIR=str(settings.ENGINE.tiny_models_dir),
        PYTHONUNBUFFERED="1",
        **database_env(),
        **extra,
    )
    return env


def _old_and_new_rows() -> tuple[Generation, Generation, Generation]:
    old = stored_row("succeeded", ended_days_ago=5, created_days_ago=5, images=1, with_input=True)
    recent = stored_row("succeeded", ended_days_ago=0.1, created_days_ago=0.1, images=1)
    # Held by a live worker elsewhere (fresh heartbeat): neither recovered nor pruned.
    running = stored_row("running", created_days_ago=5, images=0)
    Generation.objects.filter(pk=running.pk).update(
        worker="thread@elsewhere:4242/0123456789ab", attempts=1, started_at=timezone.now(), heartbeat_at=timezone.now()
    )
    return old, recent, running


def _assert_pruned_on_its_own(old: Generation, recent: Generation, running: Generation, alive: Any) -> None:
    old_files = files_of(old)
    # Rows go first and files after (see api/services/retention.py): wait for both.
    wait_for(
        "the old result to be pruned",
        lambda: alive() and not exists(old) and not any(p.exists() for p in old_files),
        90,
        0.1,
    )
    assert exists(recent) and all(p.is_file() for p in files_of(recent))
    assert Generation.objects.get(pk=running.pk).status == "running"
    # And again on a later pass, not only once.
    later = stored_row("failed", ended_days_ago=6, created_days_ago=6, with_input=True)
    later_files = files_of(later)
    wait_for(
        "a later old result to be pruned",
        lambda: alive() and not exists(later) and not any(p.exists() for p in later_files),
        90,
        0.1,
    )
    assert exists(recent)


@pytest.mark.usefixtures("live_db")
def test_the_web_process_embedded_worker_prunes_on_its_own(tmp_path, tiny_model_dirs):
    old, recent, running = _old_and_new_rows()
    log = (tmp_path / "web.log").open("wb")
    # The web process's own start-up path (config/wsgi.py), as gunicorn runs it.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time, config.wsgi; time.sleep(300)"],
        cwd=ROOT,
        env=_process_env(QUEUE="thread", RESULTS_TTL_DAYS="1", PRUNE_INTERVAL="0.2", JOB_RECOVERY_INTERVAL="0.1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def alive() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"the web process exited: {(tmp_path / 'web.log').read_text(errors='replace')[-3000:]}"
            )
        return True

    try:
        _assert_pruned_on_its_own(old, recent, running, alive)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
        Generation.objects.filter(pk=running.pk).delete()


class PruningWorker(Worker):
    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "RESULTS_TTL_DAYS": "1",
            "PRUNE_INTERVAL": "0.2",
            "JOB_RECOVERY_INTERVAL": "0.1",
        }


@pytest.mark.redis
@pytest.mark.usefixtures("live_db")
def test_a_celery_worker_prunes_on_its_own(tmp_path, tiny_model_dirs):
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    old, recent, running = _old_and_new_rows()
    worker = PruningWorker(f"test-{uuid.uuid4().hex[:10]}", tmp_path)
    try:
        worker.start()
        _assert_pruned_on_its_own(old, recent, running, worker._alive)
    finally:
        worker.stop()
        Generation.objects.filter(pk=running.pk).delete()


# --- quotas ------------------------------------------------------------------------------------


def new_key(*args: str) -> tuple[ApiKey, str]:
    out = io.StringIO()
    with redirect_stderr(io.StringIO()):
        call_command("create_api_key", "quota-user", *args, stdout=out)
    key = out.getvalue().strip()
    return ApiKey.objects.get(prefix=key[:12]), key


@pytest.mark.django_db
def test_create_api_key_sets_the_quota():
    row, _ = new_key("--quota-bytes", "5000000")
    assert row.storage_quota_bytes == 5_000_000
    assert new_key("--quota-bytes", "0")[0].storage_quota_bytes == 0
    assert new_key()[0].storage_quota_bytes is None
    count = ApiKey.objects.count()
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(CommandError, match="--quota-bytes"):
            call_command("create_api_key", "bad", "--quota-bytes", bad)
    assert ApiKey.objects.count() == count


def quota_message(used: int, limit: int) -> str:
    return (
        f"this API key stores {format_bytes(used)} ({used} bytes) of the {format_bytes(limit)} ({limit} bytes) it "
        "may keep; delete results (DELETE /api/results/<id>/) or ask for a larger quota"
    )


@pytest.mark.usefixtures("live_db")
def test_quota_below_at_and_above_and_deleting_frees_it(tiny_model_dirs):
    key, secret = new_key("--quota-bytes", "0")
    client = client_for(secret)
    first = client.post("/api/img2img/", {**GEN, "image": io.BytesIO(png_of()), "strength": 0.5}, format="multipart")
    assert first.status_code == 200, first.json()
    row = Generation.objects.get(pk=first.json()["id"])
    # The recorded sizes are the sizes on disk: the image with its thumbnail, and the stored input.
    image = row.images.get()
    png, thumbnail = (Path(settings.MEDIA_ROOT) / name for name in (image.file, thumbnail_name(image.file)))
    assert png.stat().st_size > 0 and thumbnail.stat().st_size > 0
    assert image.bytes == png.stat().st_size + thumbnail.stat().st_size
    assert row.input_bytes == (Path(settings.MEDIA_ROOT) / row.input_image).stat().st_size > 0
    used = storage_used(owner=key)
    assert used == disk_bytes([row])

    rows_before, inputs_before = Generation.objects.count(), input_files()
    for limit in (used, used - 1):  # at and above the quota: refused, nothing written
        ApiKey.objects.filter(pk=key.pk).update(storage_quota_bytes=limit)
        r = client.post("/api/img2img/", {**GEN, "image": io.BytesIO(png_of())}, format="multipart")
        assert r.status_code == 403
        assert r.json() == {"error": {"code": "storage_quota_exceeded", "message": quota_message(used, limit)}}
    assert Generation.objects.count() == rows_before and input_files() == inputs_before

    ApiKey.objects.filter(pk=key.pk).update(storage_quota_bytes=used + 1)  # below: accepted
    second = client.post("/api/txt2img/", GEN, format="json")
    assert second.status_code == 200, second.json()
    now_used = storage_used(owner=key)
    assert now_used > used + 1
    r = client.post("/api/txt2img/", GEN, format="json")
    assert r.status_code == 403 and r.json()["error"]["message"] == quota_message(now_used, used + 1)

    # Deleting a result frees its bytes.
    assert client.delete(f"/api/results/{second.json()['id']}/").status_code == 204
    assert storage_used(owner=key) == used
    assert client.post("/api/txt2img/", GEN, format="json").status_code == 200


@pytest.mark.usefixtures("live_db")
def test_default_quota_applies_to_keys_without_their_own_and_not_to_anonymous(settings, tiny_model_dirs):
    default_key, default_secret = new_key()
    unlimited_key, unlimited_secret = new_key("--quota-bytes", "0")
    for owner in (default_key, unlimited_key, None):
        stored_row("succeeded", ended_days_ago=0, images=1, owner=owner)
    stored = storage_used(owner=default_key)
    assert stored > 0
    settings.STORAGE_QUOTA_BYTES = stored

    r = client_for(default_secret).post("/api/txt2img/", GEN, format="json")
    assert r.status_code == 403
    assert r.json()["error"]["message"] == quota_message(stored, stored)
    assert client_for(unlimited_secret).post("/api/txt2img/", GEN, format="json").status_code == 200
    assert APIClient().post("/api/txt2img/", GEN, format="json").status_code == 200

    settings.STORAGE_QUOTA_BYTES = 0  # the default back to unlimited
    assert client_for(default_secret).post("/api/txt2img/", GEN, format="json").status_code == 200


@pytest.mark.usefixtures("live_db")
def test_quota_is_checked_after_an_idempotent_replay(tiny_model_dirs):
    """A retried request that already made its generation gets it back, even once over quota."""
    key, secret = new_key("--quota-bytes", "0")
    client = client_for(secret)
    first = client.post("/api/txt2img/", GEN, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    assert first.status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(storage_quota_bytes=1)
    replay = client.post("/api/txt2img/", GEN, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    fresh = client.post("/api/txt2img/", GEN, format="json", HTTP_IDEMPOTENCY_KEY="other")
    assert fresh.status_code == 403 and fresh.json()["error"]["code"] == "storage_quota_exceeded"


@pytest.mark.usefixtures("live_db")
def test_openai_images_over_quota_is_a_403_in_openai_shape(live_server, tiny_model_dirs):
    key, secret = api_key_create(name="openai-quota")
    stored_row("succeeded", ended_days_ago=0, images=1, owner=key)
    used = storage_used(owner=key)
    ApiKey.objects.filter(pk=key.pk).update(storage_quota_bytes=used)
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.images.generate(prompt="fox", size="64x64")
    response = caught.value.response
    assert response.status_code == 403
    assert response.headers["x-should-retry"] == "false"
    assert response.json() == {
        "error": {
            "message": quota_message(used, used),
            "type": "invalid_request_error",
            "param": None,
            "code": "storage_quota_exceeded",
        }
    }
    assert Generation.objects.filter(owner=key).count() == 1

    ApiKey.objects.filter(pk=key.pk).update(storage_quota_bytes=used + 1)
    result = client.images.generate(prompt="fox", size="64x64")
    assert len(result.data) == 1 and Generation.objects.filter(owner=key).count() == 2


@pytest.mark.django_db(transaction=True)
def test_the_migration_records_the_sizes_of_files_stored_before_it():
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate([("api", "0004_webhooks")])
    apps = executor.loader.project_state([("api", "0004_webhooks")]).apps
    OldGeneration, OldImage = apps.get_model("api", "Generation"), apps.get_model("api", "GeneratedImage")
    gid = uuid.uuid4()
    image_data, input_data, mask_data = png_of(size=(64, 64)), png_of(size=(72, 64)), png_of(size=(80, 64))
    storage.save(f"generations/{gid}/0-1.png", image_data)
    storage.save(f"inputs/{gid}.png", input_data)
    storage.save(f"inputs/{gid}-mask.png", mask_data)
    row = OldGeneration.objects.create(
        id=gid,
        kind="inpaint",
        model_id="tiny-sd",
        seed=1,
        status="succeeded",
        input_image=f"inputs/{gid}.png",
        mask_image=f"inputs/{gid}-mask.png",
    )
    OldImage.objects.create(generation=row, index=0, file=f"generations/{gid}/0-1.png", seed=1, width=64, height=64)
    # A row whose file is already gone counts 0 rather than failing the migration.
    lost = OldGeneration.objects.create(
        kind="img2img", model_id="tiny-sd", seed=2, status="failed", input_image="inputs/gone.png"
    )

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert GeneratedImage.objects.get(generation_id=gid).bytes == len(image_data)
    assert Generation.objects.get(pk=gid).input_bytes == len(input_data) + len(mask_data)
    assert Generation.objects.get(pk=lost.pk).input_bytes == 0
