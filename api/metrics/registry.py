"""The metrics this server records. Importing this module makes this process's metric files
(see files.py), so a process imports it only once it knows what kind of process it is."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, values

from . import files

files.ensure_prepared()
# Multiprocess mode whatever the environment said when prometheus_client was first imported,
# with each process's files named by files.identifier (kind, host and pid).
values.ValueClass = values.MultiProcessValue(process_identifier=files.identifier)

# A synchronous generation holds its request up to SYNC_TIMEOUT (300 s by default).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
LOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "sd_requests_total",
    "HTTP requests answered, by route pattern (not the raw path) and status code.",
    ["endpoint", "status"],
)
REQUEST_SECONDS = Histogram(
    "sd_request_duration_seconds",
    "Seconds from a request's arrival to its response, by route pattern; a streamed response (events) "
    "is counted until its first byte.",
    ["endpoint"],
    buckets=REQUEST_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "sd_queue_wait_seconds",
    "Seconds a job waited between its creation and its start on a worker.",
    buckets=WAIT_BUCKETS,
)
GENERATION_SECONDS = Histogram(
    "sd_generation_seconds",
    "Seconds of the pipeline call that made a job's images (a batched call's time counts for each of its jobs).",
    ["model", "kind"],
    buckets=GENERATION_BUCKETS,
)
IMAGES = Counter("sd_images_total", "Images generated and saved.", ["model"])
JOBS = Counter(
    "sd_jobs_total",
    "Jobs that ended on a worker, by outcome (succeeded, failed, cancelled while running).",
    ["model", "kind", "status"],
)
MODEL_LOAD_SECONDS = Histogram(
    "sd_model_load_seconds", "Seconds one model took to load.", ["model"], buckets=LOAD_BUCKETS
)
MODELS_LOADED = Gauge(
    "sd_models_loaded",
    "Models loaded, summed over the live processes that run jobs.",
    multiprocess_mode="livesum",
)
GPU_MEMORY = Gauge(
    "sd_gpu_memory_bytes",
    "GPU memory of each live process that uses CUDA, by device and kind (allocated, reserved, total).",
    ["device", "kind"],
    multiprocess_mode="liveall",
)
BUSY_RATIO = Gauge(
    "sd_worker_busy_ratio",
    "Share of the last minute a worker spent inside pipeline calls (the busiest live worker).",
    multiprocess_mode="livemax",
)
