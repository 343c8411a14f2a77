"""Shared fixtures: the tiny models (built once per run), an API client, a drained worker."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from PIL import Image

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(reachable: bool, what: str) -> None:
    """Skip when a local service is missing, except under CI=true where it must be there."""
    if reachable:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not reachable")
    pytest.skip(f"{what} is not reachable on this machine")


@pytest.fixture(autouse=True)
def _stop_background_loops() -> Iterator[None]:
    """A test that starts a process's loops (job recovery, webhook dispatch) stops them after
    itself, so they can't act on a later test's rows from the same test process."""
    yield
    from api.services.executors import ThreadExecutor
    from api.services.webhooks import stop_dispatcher

    for executor in list(ThreadExecutor.instances):
        executor.stop_recovery()
    stop_dispatcher()


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    """Build (or find cached) the tiny models once per run."""
    from backend.tiny import TINY_MODELS, ensure_tiny_model

    return {m: ensure_tiny_model(m, settings.ENGINE.tiny_models_dir) for m in TINY_MODELS}


@pytest.fixture
def api(tiny_model_dirs):  # noqa: ANN001, ANN201
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def live_db(transactional_db) -> Iterator[None]:  # noqa: ANN001
    """Committed rows, so the worker thread sees them; waits for the worker to go idle after."""
    yield
    drain_worker()


def drain_worker(timeout: float = 60.0) -> None:
    from api.models import Generation, Status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Generation.objects.filter(status__in=[Status.QUEUED, Status.RUNNING]).exists():
            return
        time.sleep(0.05)


def png_of(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def media_path(url: str) -> Path:
    """The file behind an image URL in a response."""
    rel = url.split(settings.MEDIA_URL, 1)[1]
    return Path(settings.MEDIA_ROOT) / rel


# Images of one micro-batch differ from the same images made alone by floating-point noise of
# the batched matrix products: at most this much on any pixel (0-255), documented in README_BACKEND.
BATCH_PIXEL_TOLERANCE = 2


def assert_same_image(a: Path | bytes, b: Path | bytes, tolerance: int = BATCH_PIXEL_TOLERANCE) -> None:
    """Same size and pixels equal within ``tolerance`` (0: identical) on every channel."""
    import numpy as np

    def pixels(x: Path | bytes) -> np.ndarray:
        data = x.read_bytes() if isinstance(x, Path) else x
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.int16)

    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape, (pa.shape, pb.shape)
    worst = int(np.abs(pa - pb).max()) if pa.size else 0
    assert worst <= tolerance, f"images differ by up to {worst} on a pixel (tolerance {tolerance})"
