"""gunicorn for the web process:  gunicorn -c gunicorn.conf.py config.wsgi:application

The process and thread model follows QUEUE (read from the environment, or from .env as the
Django settings read it):

- QUEUE=thread (embedded): each web process runs the jobs itself, on one worker thread with
  its own copy of every model it loads. Two processes would mean two copies of a model in
  GPU memory and two pipelines fighting for one GPU, so there is exactly ONE process, and
  requests are served by its threads (gthread). WEB_CONCURRENCY above 1 is refused.
- QUEUE=celery: web processes only store jobs, answer reads and wait for Celery workers, and
  never load a model. Any number of processes is fine; WEB_CONCURRENCY sets it (default
  2 x CPUs + 1, at most 8).

Each synchronous generate request holds one thread while it waits (up to SYNC_TIMEOUT). At
most MAX_SYNC_WAITERS of them wait at once (default: GUNICORN_THREADS less a quarter), so the
rest of the threads stay free for reads and async requests, which take one for milliseconds.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from dotenv import load_dotenv

_env_file = os.environ.get("ENV_FILE", str(Path(__file__).resolve().parent / ".env"))
if _env_file and _env_file.lower() != "none":
    load_dotenv(_env_file, override=False)


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SystemExit(f"{name} must be >= {minimum}, got {value}")
    return value


queue_mode = os.environ.get("QUEUE", "thread").strip().lower() or "thread"

if queue_mode == "celery":
    workers = _int("WEB_CONCURRENCY", min(2 * multiprocessing.cpu_count() + 1, 8))
else:
    workers = _int("WEB_CONCURRENCY", 1)
    if workers != 1:
        raise SystemExit(
            f"WEB_CONCURRENCY={workers} with QUEUE=thread would load one copy of each model per process; "
            "keep 1 process (add GUNICORN_THREADS for more requests) or use QUEUE=celery to scale out"
        )

worker_class = "gthread"
# Each open event stream (GET /api/results/<id>/events/) holds a thread while it lasts; the app
# lets at most SSE_MAX_STREAMS be open, so that many threads more keep the others for requests.
threads = _int("GUNICORN_THREADS", 16) + _int("SSE_MAX_STREAMS", 256)
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")

# gthread: a request may run long (a synchronous generation waits up to SYNC_TIMEOUT); this
# timeout only restarts a process whose main loop has stopped answering.
timeout = _int("GUNICORN_TIMEOUT", 120)
# On SIGTERM, requests get this long to finish. A job cut short in thread mode is picked up
# again when the server starts (it was left ``running`` by a dead process).
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = 5

# Never recycle processes in thread mode: a restart drops the loaded models and the running job.
max_requests = 0
# The app (and in thread mode its worker thread) starts in each process after the fork:
# threads don't survive a fork, and a model loaded before it would be shared unsafely.
preload_app = False

# Heartbeat files in memory: a container's overlay disk can stall gunicorn's liveness checks.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Behind a proxy that sets X-Forwarded-*: the addresses it connects from.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


# --- Metrics (GET /metrics): the processes write into one folder, PROMETHEUS_MULTIPROC_DIR ----
# (a folder made for this run when it is unset). api/metrics/files.py has the details.
def on_starting(server: object) -> None:
    # Before any process is forked: what processes of an earlier run left there is removed.
    from api.metrics import files

    files.prepare()


def child_exit(server: object, worker: object) -> None:
    # A process ended: its live gauges go from the sums; its counters stay in the totals.
    from api.metrics import files

    files.mark_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    from api.metrics import files

    files.cleanup()


def worker_abort(worker: object) -> None:
    # gunicorn aborts a process whose main loop stopped answering for GUNICORN_TIMEOUT seconds:
    # every thread's stack goes to the log first, so the log says where it hung.
    import faulthandler
    import sys

    sys.stderr.write(f"process {os.getpid()} stopped answering; its threads:\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
