"""Status and model overviews for /api/status/ and /api/models/."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from backend.manager import get_manager
from backend.router import current_mode

from ..selectors import queue_counts


def models_overview() -> list[dict[str, Any]]:
    manager = get_manager()
    mode = current_mode()
    loaded = set(manager.loaded_ids()) if settings.QUEUE == "thread" else set()
    out = []
    for spec in manager.available():
        item = spec.public_dict()
        item["loaded"] = spec.id in loaded
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
