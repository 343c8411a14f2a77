"""What the processes that run jobs record: queue waits, generation times, images, outcomes,
model loads, how busy the device was, and GPU memory.

Everything here is called from the worker's own code paths, so it must be quick and never
raise into them (the facade in ``api.metrics`` catches and logs what does).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from backend.errors import GenerationCancelled

from . import registry as m

log = logging.getLogger("api.metrics")

# How often a process that runs jobs refreshes its busy ratio and GPU memory; a scrape of the
# process itself refreshes them at once.
SAMPLE_INTERVAL = 5.0


class BusyMeter:
    """The share of the last ``window`` seconds spent between ``start`` and ``end`` (a call in
    progress counts up to now). A process younger than the window is measured over its life."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._born = clock()
        self._spans: collections.deque[tuple[float, float]] = collections.deque()
        self._open: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._open is None:
                self._open = self._clock()

    def end(self) -> None:
        with self._lock:
            if self._open is not None:
                self._spans.append((self._open, self._clock()))
                self._open = None

    def ratio(self) -> float:
        with self._lock:
            now = self._clock()
            low = now - self.window
            while self._spans and self._spans[0][1] <= low:
                self._spans.popleft()
            busy = sum(end - max(start, low) for start, end in self._spans)
            if self._open is not None:
                busy += now - max(self._open, low)
            span = min(self.window, now - self._born)
        if span <= 0:
            return 1.0 if self._open is not None else 0.0
        return max(0.0, min(1.0, busy / span))


_meter: BusyMeter | None = None
_sampler: threading.Thread | None = None
_listening = False
_lock = threading.Lock()


def start() -> None:
    """In a process that runs jobs: measure how busy it is, from now on, and keep its sampled
    gauges fresh. Called at a worker's start, and by the first job of a process otherwise."""
    global _meter, _sampler
    listen_to_models()
    with _lock:
        if _meter is None:
            _meter = BusyMeter()
            m.BUSY_RATIO.set(0.0)
        if _sampler is None or not _sampler.is_alive():
            _sampler = threading.Thread(target=_sample_forever, name="metrics-sampler", daemon=True)
            _sampler.start()


def listen_to_models() -> None:
    """Count model loads and loaded models from the engine's model manager (no Django there,
    so it calls back into a plain list)."""
    global _listening
    from backend import manager

    with _lock:
        if not _listening:
            manager.MODEL_LISTENERS.append(model_event)
            _listening = True


def model_event(event: str, model_id: str, seconds: float | None, loaded: int) -> None:
    if event == "loaded" and seconds is not None:
        m.MODEL_LOAD_SECONDS.labels(model_id).observe(seconds)
    m.MODELS_LOADED.set(loaded)


def job_claimed(row: Any) -> None:
    start()
    if row.started_at is not None and row.created_at is not None:
        m.QUEUE_WAIT.observe(max(0.0, (row.started_at - row.created_at).total_seconds()))


def job_succeeded(row: Any, timings: dict[str, Any], *, images: int) -> None:
    m.JOBS.labels(row.model_id, row.kind, "succeeded").inc()
    inference = timings.get("inference_s")
    if isinstance(inference, int | float):
        m.GENERATION_SECONDS.labels(row.model_id, row.kind).observe(max(0.0, float(inference)))
    if images:
        m.IMAGES.labels(row.model_id).inc(images)


def job_failed(row: Any, error: BaseException) -> None:
    status = "cancelled" if isinstance(error, GenerationCancelled) else "failed"
    m.JOBS.labels(row.model_id, row.kind, status).inc()


def pipeline_started() -> None:
    start()
    meter = _meter
    if meter is not None:
        meter.start()
        m.BUSY_RATIO.set(meter.ratio())


def pipeline_ended() -> None:
    if _meter is not None:
        _meter.end()
        m.BUSY_RATIO.set(_meter.ratio())


def sample() -> None:
    """Refresh this process's busy ratio and GPU memory."""
    if _meter is not None:
        m.BUSY_RATIO.set(_meter.ratio())
    sample_gpu_memory(sys.modules.get("torch"))


def sample_gpu_memory(torch: Any) -> None:
    """GPU memory of this process, where it already uses CUDA: this never imports torch, nor
    starts CUDA in a process that hasn't (a web process that only stores jobs)."""
    if torch is None:
        return
    cuda = torch.cuda
    if not cuda.is_available() or not cuda.is_initialized():
        return
    for index in range(cuda.device_count()):
        device = f"cuda:{index}"
        m.GPU_MEMORY.labels(device, "allocated").set(cuda.memory_allocated(index))
        m.GPU_MEMORY.labels(device, "reserved").set(cuda.memory_reserved(index))
        m.GPU_MEMORY.labels(device, "total").set(cuda.get_device_properties(index).total_memory)


def _sample_forever() -> None:
    while True:
        try:
            sample()
        except Exception:  # noqa: BLE001 - the sampler must outlive a bad reading
            log.warning("metrics: sampling failed", exc_info=True)
        time.sleep(SAMPLE_INTERVAL)
