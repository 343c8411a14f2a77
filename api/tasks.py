"""Celery tasks. A task takes only the generation id: the row holds everything else."""

from __future__ import annotations

from celery.signals import task_postrun

from config.celery import TASK_NAME, app


@app.task(name=TASK_NAME)
def generation_run(generation_id: str) -> str | None:
    from api.services.celery_executor import worker_run

    return worker_run(generation_id=generation_id)


@task_postrun.connect
def _keep_the_database_connection(**_: object) -> None:
    """The next job uses this job's connection if it is sound, instead of a new one: Celery's
    Django fix-up, which would close it before and after every task, is told to leave it
    (``CELERY_DB_REUSE_MAX`` in config/celery.py)."""
    from api.services.worker import recycle_connection

    recycle_connection()
