"""Micro-batching and saving off the device's path, at the service layer: companions claimed in
one step, each job with its own rows, files and end; saves that finish after the next job began."""

from __future__ import annotations

import errno
import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from api.models import Generation, Status
from api.services import worker as worker_module
from api.services.jobs import generation_execute
from api.services.liveness import worker_identity
from api.services.worker import _claim_many, drain_finisher
from backend.params import GenerationParams
from tests.conftest import assert_same_image

pytestmark = pytest.mark.django_db(transaction=True)


def queued(prompt: str = "a cat", seed: int = 1, **overrides) -> Generation:  # noqa: ANN003
    fields = {"kind": "txt2img", "model_id": "tiny-sd", "prompt": prompt, "width": 64, "height": 64, "steps": 2}
    params = GenerationParams(**(fields | {"guidance_scale": 7.0, "seed": seed} | overrides))
    return Generation.objects.create(
        id=uuid.uuid4(), kind=params.kind, model_id=params.model_id, params=params.to_dict(), seed=params.seed
    )


def image_file(g: Generation, index: int = 0) -> Path:
    return Path(django_settings.MEDIA_ROOT) / g.images.get(index=index).file


def test_queued_companions_run_in_the_leads_call_and_each_gets_its_own_rows(tiny_model_dirs, settings):
    lead, same1, same2 = queued("lead", 1), queued("one", 2, num_images=2), queued("two", 3)
    other_steps, cancelled = queued("other", 4, steps=3), queued("gone", 5)
    Generation.objects.filter(pk=cancelled.pk).update(cancel_requested=True)
    me = worker_identity("thread")
    assert generation_execute(generation_id=lead.pk, worker=me) == Status.SUCCEEDED
    rows = {g.pk: g for g in Generation.objects.all()}
    for g in (lead, same1, same2):
        row = rows[g.pk]
        assert row.status == Status.SUCCEEDED and row.worker == me and row.attempts == 1
        assert row.timings["batch_jobs"] == 3 and row.timings["batch_images"] == 4
        assert row.images.count() == row.params["num_images"]
    assert rows[other_steps.pk].status == Status.QUEUED  # another key: not taken
    assert rows[cancelled.pk].status == Status.QUEUED and rows[cancelled.pk].attempts == 0

    # Each image equals the same job run alone (another call, batching off).
    settings.BATCH_MAX_IMAGES = 1
    alone = queued("one", 2, num_images=2)
    assert generation_execute(generation_id=alone.pk, worker=me) == Status.SUCCEEDED
    assert Generation.objects.get(pk=alone.pk).timings["batch_jobs"] == 1
    for i in range(2):
        assert_same_image(image_file(alone, i), image_file(same1, i))


def test_batch_max_images_counts_images_not_jobs(tiny_model_dirs, settings):
    settings.BATCH_MAX_IMAGES = 3
    lead, big, small, later = queued("a", 1), queued("b", 2, num_images=3), queued("c", 3), queued("d", 4)
    generation_execute(generation_id=lead.pk, worker=worker_identity("thread"))
    status = dict(Generation.objects.values_list("pk", "status"))
    # 1 (lead) + 3 would be 4 > 3: the big one waits; the next two single ones fit.
    assert status[big.pk] == Status.QUEUED
    assert status[lead.pk] == status[small.pk] == status[later.pk] == Status.SUCCEEDED


def test_two_workers_claiming_the_same_rows_at_once_never_share_one():
    rows = [queued(f"p{i}", i) for i in range(30)]
    ids = [g.pk for g in rows]
    got: dict[str, list] = {}
    start = threading.Barrier(2)

    def claim(name: str) -> None:
        from django.db import connection

        start.wait()
        try:
            got[name] = [c.id for c in _claim_many(ids, name)]
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(f"celery@h:{n}/x",)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a, b = got["celery@h:1/x"], got["celery@h:2/x"]
    assert not set(a) & set(b)
    assert sorted(map(str, a + b)) == sorted(map(str, ids))
    for g in Generation.objects.filter(pk__in=ids):
        assert g.status == Status.RUNNING and g.attempts == 1
        assert g.worker == ("celery@h:1/x" if g.pk in a else "celery@h:2/x")


def test_the_device_moves_on_while_the_last_images_are_saved(tiny_model_dirs, monkeypatch):
    """With background saving, execute returns while the save waits; the row stays running
    until its files and image rows exist, and only then is its end announced."""
    first, second = queued("first", 1), queued("second", 2, steps=3)
    release = threading.Event()
    real_write = worker_module._write

    def slow_write(member, output, run_s):  # noqa: ANN001, ANN202
        if member.claimed.id == first.pk:
            assert release.wait(30)
        return real_write(member, output, run_s)

    monkeypatch.setattr(worker_module, "_write", slow_write)
    announced: list[tuple] = []

    def notify(pk) -> None:  # noqa: ANN001
        g = Generation.objects.get(pk=pk)
        files = [Path(django_settings.MEDIA_ROOT, i.file).exists() for i in g.images.all()]
        announced.append((str(pk), g.status, files))

    me = worker_identity("thread")
    assert generation_execute(generation_id=first.pk, worker=me, notify=notify, background=True) == Status.RUNNING
    assert Generation.objects.get(pk=first.pk).status == Status.RUNNING
    # The next job runs (and is saved) while the first one's save still waits.
    assert generation_execute(generation_id=second.pk, worker=me, notify=notify, background=True) == Status.RUNNING
    drain_finisher(timeout=0.5)
    assert Generation.objects.get(pk=first.pk).status == Status.RUNNING
    release.set()
    assert drain_finisher(timeout=30)
    assert {pk: (status, files) for pk, status, files in announced} == {
        str(first.pk): (Status.SUCCEEDED, [True]),
        str(second.pk): (Status.SUCCEEDED, [True]),
    }
    assert announced[0][0] == str(second.pk)  # the second ended first


def test_a_full_disk_fails_the_job_typed_leaves_no_files_and_the_next_job_runs(tiny_model_dirs, monkeypatch):
    """ENOSPC can't be made to happen here on demand: the storage write raises it (the only patch)."""
    full, next_one = queued("full", 1, num_images=2), queued("next", 2, steps=3)
    from api import storage

    real = storage.save
    written: list[str] = []

    def save(name, data):  # noqa: ANN001, ANN202
        if str(full.pk) in name and written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        return real(name, data)

    monkeypatch.setattr(storage, "save", save)
    me = worker_identity("thread")
    assert generation_execute(generation_id=full.pk, worker=me) == Status.FAILED
    g = Generation.objects.get(pk=full.pk)
    assert g.error["code"] == "storage_full" and g.error["http_status"] == 507
    assert "disk is full" in g.error["message"]
    assert not (Path(django_settings.MEDIA_ROOT) / "generations" / str(full.pk)).exists()  # the first image went too
    assert not g.images.exists()
    assert generation_execute(generation_id=next_one.pk, worker=me) == Status.SUCCEEDED


def test_a_companions_own_message_finds_it_claimed_and_does_nothing(tiny_model_dirs):
    from api.services.celery_executor import _worker_run

    lead, companion = queued("lead", 1), queued("companion", 2)
    me = worker_identity("celery")
    assert generation_execute(generation_id=lead.pk, worker=me) == Status.SUCCEEDED
    before = Generation.objects.get(pk=companion.pk)
    assert before.status == Status.SUCCEEDED
    assert _worker_run(str(companion.pk), me) is None
    after = Generation.objects.get(pk=companion.pk)
    assert (after.status, after.attempts, after.finished_at) == (before.status, before.attempts, before.finished_at)
