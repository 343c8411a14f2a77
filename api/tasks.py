"""Celery tasks. A task takes only the generation id: the row holds everything else."""

from __future__ import annotations

from config.celery import TASK_NAME, app


@app.task(name=TASK_NAME)
def generation_run(generation_id: str) -> str | None:
    from api.services.celery_executor import worker_run

    return worker_run(generation_id=generation_id)
