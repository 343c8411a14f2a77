"""Two instances of this server chained over HTTP: a CPU box in remote mode forwarding to a
GPU box through the HF task API. A runs in this process (``live_server``); B is a separate
``manage.py runserver`` process with its own database and media folder."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from django.conf import settings as django_settings
from PIL import Image

from api.auth import api_key_create
from api.models import Generation
from api.services import jobs
from tests.conftest import png_of

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")

ROOT = Path(django_settings.BASE_DIR)
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Box:
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def box_env(tmp_path: Path, gpu_url: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "HF_", "CELERY"))}
    for name in ("DATABASE_URL", "CACHE_URL", "QUEUE", "SQLITE_TEST_PATH", "AUTH_REQUIRED"):
        env.pop(name, None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "ENV_FILE": "none",
            "DJANGO_ENV": "test",
            "SQLITE_PATH": str(tmp_path / "cpu-box.sqlite3"),
            "MEDIA_ROOT": str(tmp_path / "cpu-box-media"),
            "TINY_MODELS_DIR": str(django_settings.ENGINE.tiny_models_dir),
            "DEFAULT_MODEL": "tiny-sd",
            "USE_LOCAL_MODELS": "false",
            # The GPU box's HF task URL for this model, and one of its API keys as the token.
            "HF_REMOTE_MODEL_MAP": f"tiny-sd={gpu_url}/models/tiny-sd",
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "REMOTE_MAX_RETRIES": "0",
            "REMOTE_TIMEOUT": "120",
            "RATE_LIMIT_GENERATE": "",
            "RATE_LIMIT_READ": "",
        }
    )
    return env


@pytest.fixture
def cpu_box(live_server, settings, tmp_path) -> Iterator[tuple[Box, object]]:  # noqa: ANN001
    """B, pointed at A (the live server) with A's key; A requires keys."""
    settings.AUTH_REQUIRED = True
    key_row, key = api_key_create(name="cpu-box")
    env = box_env(tmp_path, live_server.url, key)
    python = sys.executable
    migrate = subprocess.run(
        [python, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    port = free_port()
    log = tmp_path / "cpu-box.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [python, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        box = Box(url=f"http://127.0.0.1:{port}", log=log)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the CPU box exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{box.url}/api/health/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the CPU box did not start: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield box, key_row
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def fetched_image(box: Box, url: str) -> Image.Image:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, (url, r.status_code)
    return Image.open(io.BytesIO(r.content))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_a_cpu_box_forwards_txt2img_and_img2img_to_a_gpu_box(cpu_box):
    box, key_row = cpu_box
    request = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "fog",
        "seed": 4242,
        "width": 64,
        "height": 72,
        "steps": 3,
        "guidance_scale": 5.5,
        "scheduler": "euler_a",
    }
    r = httpx.post(f"{box.url}/api/txt2img/", json=request, timeout=180)
    assert r.status_code == 200, (r.text[:500], box.log.read_text()[-2000:])
    body = r.json()
    assert (body["status"], body["backend"], body["seed"]) == ("succeeded", "remote", 4242), body
    assert [(i["seed"], i["width"], i["height"]) for i in body["images"]] == [(4242, 64, 72)]

    # The GPU box ran it as an ordinary generation, owned by the key the CPU box sent.
    row = Generation.objects.get(kind="txt2img")
    assert (row.status, row.backend, row.seed, row.owner_id) == ("succeeded", "local", 4242, key_row.pk)
    p = row.params
    assert (p["prompt"], p["negative_prompt"], p["width"], p["height"]) == ("a lighthouse at dusk", "fog", 64, 72)
    assert (p["steps"], p["guidance_scale"], p["scheduler"]) == (3, 5.5, "euler_a")
    gpu_image = Image.open(io.BytesIO(jobs.image_bytes(row.images.get())))
    cpu_image = fetched_image(box, body["images"][0]["url"])
    assert cpu_image.size == gpu_image.size == (64, 72)
    assert np.array_equal(pixels(cpu_image), pixels(gpu_image))

    init = png_of((20, 90, 200), size=(64, 64))
    request = {
        "prompt": "a blue sea",
        "image": base64.b64encode(init).decode(),
        "strength": 0.5,
        "seed": 31,
        "steps": 4,
        "width": 64,
        "height": 64,
    }
    r = httpx.post(f"{box.url}/api/img2img/", json=request, timeout=180)
    assert r.status_code == 200, (r.text[:500], box.log.read_text()[-2000:])
    body = r.json()
    assert (body["status"], body["backend"], body["kind"], body["seed"]) == ("succeeded", "remote", "img2img", 31)
    row = Generation.objects.get(kind="img2img")
    assert (row.status, row.seed, row.owner_id) == ("succeeded", 31, key_row.pk)
    assert (row.params["prompt"], row.params["strength"], row.params["steps"]) == ("a blue sea", 0.5, 4)
    assert (row.params["width"], row.params["height"]) == (64, 64)
    gpu_image = Image.open(io.BytesIO(jobs.image_bytes(row.images.get())))
    assert np.array_equal(pixels(fetched_image(box, body["images"][0]["url"])), pixels(gpu_image))


def test_a_gpu_box_refusal_reaches_the_cpu_box_client_with_its_message(cpu_box, settings):
    box, _ = cpu_box
    # Valid on the CPU box (its limit is 150 steps); the GPU box allows 5 and says so.
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_STEPS": 5}
    r = httpx.post(
        f"{box.url}/api/txt2img/", json={"prompt": "x", "seed": 1, "steps": 9, "width": 64, "height": 64}, timeout=120
    )
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == "remote_rejected"
    assert "num_inference_steps must be between 1 and 5, got 9" in error["message"]
    assert Generation.objects.count() == 0
