"""The job lifecycle where the database or the storage fails part way, or where two of its
steps race: every job still ends, runs, or waits where something will pick it up.

The failures are injected at one call each (a database error, an unreachable bucket), and the
race by running the other side's step at the exact moment between two statements; everything
else is the real worker, recovery and cancel code on the suite's database.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import OperationalError
from django.db.models import QuerySet
from django.utils import timezone

from api.models import Generation, Status
from api.services import jobs
from api.services import worker as worker_module
from api.services.executors import ThreadExecutor
from api.services.jobs import generation_cancel, generation_execute, generation_recover
from api.services.liveness import worker_identity
from backend.params import GenerationParams

pytestmark = pytest.mark.django_db(transaction=True)
LOST = "thread@gone:1/x"


def queued(prompt: str = "a cat", seed: int = 1) -> Generation:
    params = GenerationParams(
        kind="txt2img", model_id="tiny-sd", prompt=prompt, width=64, height=64, steps=2, guidance_scale=7.0, seed=seed
    )
    return Generation.objects.create(
        id=uuid.uuid4(), kind=params.kind, model_id=params.model_id, params=params.to_dict(), seed=params.seed
    )


def lost(*rows: Generation) -> None:
    """Running on a worker that stopped beating an hour ago."""
    old = timezone.now() - timedelta(hours=1)
    for row in rows:
        Generation.objects.filter(pk=row.pk).update(
            status=Status.RUNNING, attempts=1, worker=LOST, heartbeat_at=old, started_at=old
        )


def executor_that_holds_its_jobs(monkeypatch: pytest.MonkeyPatch) -> ThreadExecutor:
    """A ThreadExecutor whose worker thread is not started: what it is handed stays in its queue."""
    ex = ThreadExecutor()
    monkeypatch.setattr(ex, "start", lambda: None)
    return ex


def test_a_companion_search_that_fails_in_a_later_round_keeps_the_companions_already_claimed(
    tiny_model_dirs, settings, monkeypatch
):
    settings.BATCH_MAX_IMAGES = 4
    settings.BATCH_WINDOW_MS = 300
    lead, companion = queued("lead", 1), queued("lead", 2)
    real_claim, real_key = worker_module._claim_many, worker_module.batch_key
    late: list[Generation] = []

    def claim(ids, worker):  # noqa: ANN001, ANN202
        claimed = real_claim(ids, worker)
        if not late:
            late.append(queued("late", 3))  # arrives during the window
        return claimed

    def key(params):  # noqa: ANN001, ANN202
        if params.prompt == "late":
            raise OperationalError("the connection dropped")  # the second round's read fails
        return real_key(params)

    monkeypatch.setattr(worker_module, "_claim_many", claim)
    monkeypatch.setattr(worker_module, "batch_key", key)
    status = generation_execute(generation_id=lead.pk, worker=worker_identity("thread"))
    assert status == Status.SUCCEEDED
    rows = {g.pk: g for g in Generation.objects.all()}
    # The companion claimed in the first round ran with the lead, not left running unwatched.
    assert rows[companion.pk].status == Status.SUCCEEDED and rows[companion.pk].timings["batch_jobs"] == 2
    assert rows[late[0].pk].status == Status.QUEUED  # never claimed: it waits for its own turn


def test_the_read_after_a_claim_is_retried_while_the_database_is_unavailable(tiny_model_dirs, monkeypatch):
    row = queued()
    real_first = QuerySet.first
    failures = [OperationalError("the connection dropped")]

    def first(self):  # noqa: ANN001, ANN202
        if self.model is Generation and failures:
            raise failures.pop()
        return real_first(self)

    monkeypatch.setattr(QuerySet, "first", first)
    assert generation_execute(generation_id=row.pk, worker=worker_identity("thread")) == Status.SUCCEEDED
    row.refresh_from_db()
    assert not failures and row.status == Status.SUCCEEDED and row.attempts == 1 and row.images.count() == 1


def test_thread_recovery_wakes_the_request_waiting_on_a_job_it_fails(settings, monkeypatch):
    settings.MAX_ATTEMPTS = 1
    gone, stopped = queued(seed=1), queued(seed=2)
    lost(gone, stopped)
    Generation.objects.filter(pk=stopped.pk).update(cancel_requested=True)
    ex = executor_that_holds_its_jobs(monkeypatch)
    waiting = {row.pk: threading.Event() for row in (gone, stopped)}
    ex._events.update({str(pk): event for pk, event in waiting.items()})  # synchronous requests wait on these
    outcome = ex.recover_once()
    assert (outcome["failed"], outcome["cancelled"]) == ([gone.pk], [stopped.pk])
    assert ex.wait(gone.pk, 5.0) and ex.wait(stopped.pk, 5.0)
    assert Generation.objects.get(pk=gone.pk).error["code"] == "worker_lost"


def test_a_recovery_pass_whose_file_removal_fails_still_hands_its_jobs_on(settings, monkeypatch):
    settings.MAX_ATTEMPTS = 3
    rows = [queued(seed=1), queued(seed=2)]
    lost(*rows)
    failures = [ConnectionError("the bucket is unreachable")]
    real_delete = jobs.storage.delete_prefix

    def delete_prefix(prefix):  # noqa: ANN001, ANN202
        if failures:
            raise failures.pop()
        return real_delete(prefix)

    monkeypatch.setattr(jobs.storage, "delete_prefix", delete_prefix)
    ex = executor_that_holds_its_jobs(monkeypatch)
    outcome = ex.recover_once()
    assert not failures and sorted(outcome["requeued"]) == sorted(r.pk for r in rows)
    assert set(Generation.objects.values_list("status", flat=True)) == {Status.QUEUED}
    assert ex.pending() == 2  # both handed to the worker thread's queue


def test_a_recovery_pass_that_stops_part_way_returns_what_it_already_changed(settings):
    first, second = queued(seed=1), queued(seed=2)
    lost(first, second)
    seen: list[object] = []

    def is_orphaned(row):  # noqa: ANN001, ANN202
        seen.append(row.pk)
        if len(seen) == 2:
            raise OperationalError("the connection dropped")
        return True

    outcome = generation_recover(max_attempts=3, is_orphaned=is_orphaned)
    assert outcome["requeued"] == [seen[0]]  # committed, so the caller must still send it
    assert Generation.objects.get(pk=seen[0]).status == Status.QUEUED
    assert Generation.objects.get(pk=seen[1]).status == Status.RUNNING  # the next pass's
    # Nothing changed before the failure: the error is the caller's.
    with pytest.raises(OperationalError):
        generation_recover(max_attempts=3, is_orphaned=lambda row: (_ for _ in ()).throw(OperationalError("down")))


def test_a_cancel_that_races_recovery_sending_the_job_back_to_the_queue_still_cancels_it(monkeypatch):
    row = queued()
    lost(row)
    real_filter = QuerySet.filter
    raced: list[bool] = []

    def filter(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.model is Generation and kwargs.get("status") == Status.RUNNING and not raced and "pk" in kwargs:
            # Between the cancel's two updates, recovery requeues the lost job.
            raced.append(True)
            real_filter(Generation.objects.all(), pk=row.pk).update(status=Status.QUEUED, worker="")
        return real_filter(self, *args, **kwargs)

    monkeypatch.setattr(QuerySet, "filter", filter)
    result = generation_cancel(generation=Generation.objects.get(pk=row.pk))
    assert raced and result.status == Status.CANCELLED and result.cancel_requested


def test_a_cancel_that_races_recovery_and_a_new_claim_still_reaches_the_running_job(monkeypatch):
    """Recovery requeues the job between the cancel's two updates, and a worker claims it again
    before the cancel looks: the cancel finds it running and flags it."""
    row = queued()
    lost(row)
    real_filter = QuerySet.filter
    steps: list[str] = []

    def filter(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.model is Generation and "pk" in kwargs:
            if kwargs.get("status") == Status.RUNNING and not steps:
                steps.append("requeued")
                real_filter(Generation.objects.all(), pk=row.pk).update(status=Status.QUEUED, worker="")
            elif "status__in" in kwargs and steps == ["requeued"]:
                steps.append("claimed again")
                real_filter(Generation.objects.all(), pk=row.pk).update(status=Status.RUNNING, worker="thread@new:2/y")
        return real_filter(self, *args, **kwargs)

    monkeypatch.setattr(QuerySet, "filter", filter)
    result = generation_cancel(generation=Generation.objects.get(pk=row.pk))
    assert steps == ["requeued", "claimed again"]
    assert result.status == Status.RUNNING and result.cancel_requested  # the worker stops at its next step
