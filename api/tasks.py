"""Celery tasks. A task takes only the generation id: the row holds everything else."""

from __future__ import annotations

from celery.signals import task_postrun, task_prerun

from config.celery import TASK_NAME, app


@app.task(name=TASK_NAME)
def generation_run(generation_id: str) -> str | None:
    from api.services.celery_executor import worker_run

    return worker_run(generation_id=generation_id)


# Celery's Django fix-up would close the database connection before and after every task, so
# each job would open a new one on its device's path; it is told to leave it
# (``CELERY_DB_REUSE_MAX`` in config/celery.py), and these keep a sound one from one job to the
# next, but not across an idle pause.


def _runs_for_real(task: object) -> bool:
    request = getattr(task, "request", None)
    return not getattr(request, "is_eager", False)


@task_prerun.connect(sender=generation_run)
def _start_on_a_fresh_connection_after_a_pause(task: object = None, **_: object) -> None:
    from api.services.worker import close_idle_connection

    if _runs_for_real(task):
        close_idle_connection()


@task_postrun.connect(sender=generation_run)
def _keep_the_connection_for_the_next_job(task: object = None, **_: object) -> None:
    from api.services.worker import recycle_connection

    if _runs_for_real(task):
        recycle_connection()
