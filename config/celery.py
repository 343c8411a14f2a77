"""The Celery app for QUEUE=celery: one worker per GPU, each running one generation at a time.

    celery -A config worker --concurrency 1 -Q generations

The job row in the database is what makes a job safe, not the broker: a worker claims the row
with a conditional UPDATE, so a message delivered twice runs the job once, and a job whose
worker died is found by the row's worker name and heartbeat (api/services/liveness.py) and
retried up to MAX_ATTEMPTS, then failed ``worker_lost``. The broker settings below make
Redis hand a job back when its worker dies, and never to two workers while it runs.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

TASK_NAME = "api.tasks.generation_run"

# A submit waits for the broker this long at most before the request gets its 503.
SUBMIT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5}


def make_app(broker_url: str | None = None) -> Celery:
    """The app, configured from Django settings; ``broker_url`` overrides CELERY_BROKER_URL."""
    from django.conf import settings

    app = Celery("sdapi")
    app.conf.update(
        broker_url=broker_url or settings.CELERY_BROKER_URL,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options={
            # Unacknowledged messages come back after this long: longer than any job may run.
            "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT,
            "socket_connect_timeout": 3,
            # A publish to a broker that vanished without closing the socket fails, not hangs.
            "socket_timeout": 15,
            "socket_keepalive": True,
        },
        include=["api.tasks"],
        task_default_queue=settings.CELERY_DEFAULT_QUEUE,
        task_routes={TASK_NAME: {"queue": settings.CELERY_DEFAULT_QUEUE}},
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        # Results live in the job row; no result backend.
        task_ignore_result=True,
        result_backend=None,
        # Acknowledge after the job, not before: a worker that dies mid-job leaves the message
        # to be delivered again. Reject (requeue) it when the pool child running it dies, so
        # another child or worker picks it up at once; the row's attempt count, not the
        # broker, stops a job that kills its worker every time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One job at a time per worker, and no second job reserved behind it: a queued job
        # waits in Redis where any free GPU can take it.
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_time_limit=settings.CELERY_TASK_TIME_LIMIT,
        task_soft_time_limit=settings.CELERY_TASK_SOFT_TIME_LIMIT,
        # A broker hiccup must not throw away a GPU job that is half done: the job goes on, and
        # a message delivered again meanwhile finds the row claimed and does nothing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_pool_limit=10,
    )
    # Celery's Django fix-up closes the database connection before and after every task, so
    # each job would pay for a new one on its device's path; it closes them only every this
    # many tasks instead, and api.tasks keeps a sound one from one job to the next.
    app.conf.update(CELERY_DB_REUSE_MAX=1_000_000)
    return app


app = make_app()


@signals.celeryd_init.connect
def _prepare_metrics(sender: Any = None, **_: Any) -> None:
    # In the main process, before the pool starts: the metrics folder for its processes, with
    # the files of this worker's processes that are gone removed (api/metrics/files.py).
    from api import metrics

    metrics.celery_worker_starting(sender if isinstance(sender, str) else None)


@signals.worker_process_init.connect
def _record_metrics_in_pool_process(sender: Any = None, **_: Any) -> None:
    from api import metrics

    metrics.celery_process_started(sender if isinstance(sender, str) else None)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _drop_live_metrics(**_: Any) -> None:
    from api import metrics

    metrics.celery_process_stopping()


@signals.worker_ready.connect
def _serve_worker_metrics(sender: Any = None, **_: Any) -> None:
    # WORKER_METRICS_PORT: this worker's own /metrics, for a Prometheus that can't read the web
    # server's folder (a worker on another machine). Started after the pool's first fork.
    from api import metrics

    metrics.serve_worker_metrics(getattr(sender, "hostname", None))


@signals.worker_process_init.connect
def _preload_in_pool_process(sender: Any = None, **_: Any) -> None:
    # The process that runs jobs (the solo worker, or the prefork child) loads PRELOAD_MODELS
    # and publishes its status (models, device, GPUs) to Redis; both in side threads, because
    # a prefork child must report ready within seconds. ``sender`` is the worker's node name;
    # -Q has already been applied to the app's queues.
    from api.services.celery_executor import preload_models, start_worker_status

    preload_models()
    start_worker_status(node=sender if isinstance(sender, str) else None, queues=list(app.amqp.queues.consume_from))


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _remove_worker_status(**_: Any) -> None:
    # A clean stop lets the saves in progress complete (what doesn't is retried by recovery),
    # and takes the worker off /api/status/ at once; a killed one expires.
    from api.services.celery_executor import stop_worker_status
    from api.services.worker import drain_finisher

    drain_finisher(timeout=30)
    stop_worker_status()


@signals.worker_ready.connect
def _recover_on_worker_start(**_: Any) -> None:
    # Runs before the worker takes its first job, so rows bearing its own name are stale.
    from api.services.celery_executor import start_recovery

    start_recovery()
