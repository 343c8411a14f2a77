"""Prometheus metrics: GET /metrics on the web server, and on a worker's own port.

Every process that records metrics (gunicorn's processes, Celery's worker processes) writes
them into files in one shared folder, PROMETHEUS_MULTIPROC_DIR (files.py); a scrape adds the
files up (scrape.py), so /metrics is right however many processes serve and run jobs on the
host. Queue depth and running jobs are counted in the job table at scrape time, so they are
right across machines too.

- requests: middleware.py, by route pattern and status code;
- jobs: the worker calls the functions below at a claim, around the pipeline call and when a
  job ends; model loads come from the engine's model manager (recording.py);
- the metric names and kinds: registry.py.

The functions here never raise: a metric that can't be recorded is logged and skipped, and
the job goes on. Nothing is imported until first used, so importing this package costs nothing
(gunicorn's master imports it before any app is loaded).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("api.metrics")


def _record(name: str, *args: Any, **kwargs: Any) -> None:
    try:
        from . import recording

        getattr(recording, name)(*args, **kwargs)
    except Exception:  # noqa: BLE001 - metrics must never fail a job
        log.warning("metrics: %s could not be recorded", name, exc_info=True)


def job_claimed(row: Any) -> None:
    """A worker took the job (its row, with started_at set): its queue wait."""
    _record("job_claimed", row)


def job_succeeded(row: Any, timings: dict[str, Any], *, images: int) -> None:
    """A job's images are saved: its outcome, generation time and images."""
    _record("job_succeeded", row, timings, images=images)


def job_failed(row: Any, error: BaseException) -> None:
    """A job ended without images: failed, or cancelled while it ran."""
    _record("job_failed", row, error)


def pipeline_started() -> None:
    """The device starts a pipeline call (for the busy ratio)."""
    _record("pipeline_started")


def pipeline_ended() -> None:
    _record("pipeline_ended")


# --- Celery workers (config/celery.py) ---------------------------------------------------------


def _celery_tag(node: str | None) -> str:
    return "celery-" + (node or "worker").split("@", 1)[0]


def celery_worker_starting(node: str | None) -> None:
    """In a worker's main process, before its pool starts: the folder is prepared for the
    processes it starts (the files of this host's processes that are gone are removed)."""
    try:
        from . import files

        files.set_tag(_celery_tag(node))
        files.prepare()
    except Exception:  # noqa: BLE001 - a worker without metrics still runs jobs
        log.warning("metrics: the metrics folder could not be prepared", exc_info=True)


def celery_process_started(node: str | None) -> None:
    """In the process that runs jobs (the solo worker, or a prefork child)."""
    try:
        from . import files

        files.set_tag(_celery_tag(node))
        _record("start")
    except Exception:  # noqa: BLE001
        log.warning("metrics: could not start recording", exc_info=True)


def celery_process_stopping() -> None:
    """A clean stop: this process's live gauges go at once (its counters stay)."""
    try:
        from . import files

        files.mark_dead()
    except Exception:  # noqa: BLE001
        log.warning("metrics: could not remove this process's gauges", exc_info=True)


def serve_worker_metrics(node: str | None) -> None:
    """WORKER_METRICS_PORT: this worker's own /metrics, for a Prometheus on another machine."""
    from django.conf import settings

    if not settings.WORKER_METRICS_PORT:
        return
    try:
        from . import exporter, files

        folder = files.ensure_prepared()
        exporter.serve(
            port=settings.WORKER_METRICS_PORT,
            addr=settings.WORKER_METRICS_ADDR,
            folder=folder,
            tag=files.slug(_celery_tag(node)),
            token=settings.METRICS_TOKEN,
        )
    except Exception:  # noqa: BLE001 - e.g. the port is taken: the worker still runs jobs
        log.exception("metrics: could not serve on WORKER_METRICS_PORT=%s", settings.WORKER_METRICS_PORT)
