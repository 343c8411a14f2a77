"""Status and model overviews for /api/status/ and /api/models/.

With QUEUE=celery the web process loads no model and has no GPU: what is loaded, and on
which devices, is what the live workers say in their status snapshots (celery_executor).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from backend.manager import get_manager
from backend.router import current_mode

from ..selectors import queue_counts

NO_WORKER = (
    "No Celery worker is alive: jobs stay queued until one starts. "
    "A worker shows here within seconds of starting, and drops out when it stops."
)
BROKER_DOWN = "The broker cannot be reached, so no worker can be seen; jobs can't be sent either."


def models_overview() -> list[dict[str, Any]]:
    manager = get_manager()
    mode = current_mode()
    celery = settings.QUEUE == "celery"
    holders: dict[str, list[str]] = {}
    if celery:
        workers, _ = _workers()
        for worker in workers:
            for model_id in worker["loaded_models"]:
                holders.setdefault(model_id, []).append(worker["name"])
        loaded = set(holders)
    else:
        loaded = set(manager.loaded_ids())
    out = []
    for spec in manager.available():
        item = spec.public_dict()
        item["loaded"] = spec.id in loaded
        if celery:
            item["loaded_on"] = holders.get(spec.id, [])
        item["runs_on"] = mode
        item["default"] = spec.id == settings.DEFAULT_MODEL
        out.append(item)
    return out


def status_overview() -> dict[str, Any]:
    from backend.system import system_info

    manager = get_manager()
    mode = current_mode()
    info = system_info()
    body: dict[str, Any] = {
        "status": "ok",
        "mode": mode,
        "queue_backend": settings.QUEUE,
        "default_model": settings.DEFAULT_MODEL,
        "loaded_models": manager.loaded_ids() if settings.QUEUE == "thread" else [],
        "queue": queue_counts(),
        "system_info": info,
    }
    if settings.QUEUE == "celery":
        _celery_status(body, mode)
        return body
    try:
        body["device"] = manager.device_plan().as_dict() if mode == "local" else None
        body["inference_available"] = True
    except Exception as exc:  # noqa: BLE001 - status must answer even when the device is broken
        body["device"] = None
        body["inference_available"] = False
        body["status"] = "degraded"
        body["detail"] = str(exc)
    if mode == "remote":
        body["inference_available"] = bool(settings.ENGINE.hf_token or settings.ENGINE.hf_inference_url)
    return body


# --- QUEUE=celery -------------------------------------------------------------------------------


def _celery_status(body: dict[str, Any], mode: str) -> None:
    """The workers' view: they run the jobs, hold the models and own the GPUs."""
    workers, problem = _workers()
    body["workers"] = workers
    body["loaded_models"] = sorted({m for w in workers for m in w["loaded_models"]})
    # The web process runs no inference: each worker's device plan is in its entry.
    body["device"] = None
    body["system_info"] = _with_worker_gpus(body["system_info"], workers)
    # A broker that isn't Redis carries no worker status: then there is nothing to judge by.
    seen = bool(workers) or problem is _UNKNOWN
    available = seen
    if mode == "remote":
        available = available and bool(settings.ENGINE.hf_token or settings.ENGINE.hf_inference_url)
    body["inference_available"] = available
    if not seen:
        body["status"] = "degraded"
        body["detail"] = problem or NO_WORKER


_UNKNOWN = object()


def _workers() -> tuple[list[dict[str, Any]], Any]:
    """(live workers, why none can be seen): the problem is None when all is well, a sentence
    when the broker is down, _UNKNOWN when the broker keeps no worker status."""
    from .celery_executor import WorkerStatusUnavailable, live_workers

    try:
        raw = live_workers()
    except WorkerStatusUnavailable as exc:
        return [], f"{BROKER_DOWN} ({exc})"
    if raw is None:
        return [], _UNKNOWN
    return [_worker_entry(item) for item in raw], None


def _worker_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """A worker's snapshot in the documented shape, whatever version of the code wrote it."""

    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) else None

    def strings(key: str) -> list[str]:
        value = raw.get(key)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    pid = raw.get("pid")
    entry: dict[str, Any] = {
        "name": raw["name"],
        "node": text("node"),
        "hostname": text("hostname") or "",
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        "queues": strings("queues"),
        "mode": raw.get("mode") if raw.get("mode") in ("local", "remote") else None,
        "loaded_models": strings("loaded_models"),
        "device": raw.get("device") if isinstance(raw.get("device"), dict) else None,
        "system_info": _system_info_entry(raw.get("system_info")),
        "current_job": text("current_job"),
        "started_at": text("started_at"),
        "updated_at": text("updated_at"),
    }
    if text("device_error"):
        entry["device_error"] = text("device_error")
    return entry


def _system_info_entry(raw: Any) -> dict[str, Any]:
    raw = raw if isinstance(raw, dict) else {}
    devices = [d for d in raw.get("devices") or [] if isinstance(d, dict)]
    return {
        "python_version": str(raw.get("python_version") or ""),
        "pytorch_version": str(raw.get("pytorch_version") or ""),
        "cuda_available": bool(raw.get("cuda_available")),
        "cuda_version": raw.get("cuda_version") if isinstance(raw.get("cuda_version"), str) else None,
        "cudnn_version": raw.get("cudnn_version") if isinstance(raw.get("cudnn_version"), int) else None,
        "device_count": len(devices),
        "devices": devices,
        "platform": str(raw.get("platform") or ""),
    }


def _with_worker_gpus(info: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The web process's facts, but its GPU fields describe the workers' GPUs when any has one.

    Each device then names its ``worker``, and its ``index`` is the index that worker sees
    (after its CUDA_VISIBLE_DEVICES). ``devices_from`` says which is shown.
    """
    gpu_workers = [w for w in workers if w["system_info"]["cuda_available"]]
    if not gpu_workers:
        return {**info, "devices_from": "web"}
    devices = [{**d, "worker": w["name"]} for w in gpu_workers for d in w["system_info"]["devices"]]
    first = gpu_workers[0]["system_info"]
    return {
        **info,
        "cuda_available": True,
        "cuda_version": first["cuda_version"],
        "cudnn_version": first["cudnn_version"],
        "device_count": len(devices),
        "devices": devices,
        "devices_from": "workers",
    }
