"""The protocols on QUEUE=celery: the web process only translates and waits; a real Celery
worker process (over the local Redis, sharing the test database) runs the jobs. Previews,
progress and interrupt cross the process boundary through the job row."""

from __future__ import annotations

import base64
import io
import threading

import openai
import pytest
import requests
from PIL import Image

from api.models import Generation, Status
from tests.api.test_celery_worker import celery_mode, no_model_in_web, wait_for  # noqa: F401 - fixtures

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("no_model_in_web")]


def test_a1111_progress_preview_and_interrupt_across_processes(live_server, celery_mode, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PREVIEW_INTERVAL", "0")
    celery_mode.start()
    base = f"{live_server.url}/sdapi/v1"
    answer: dict[str, requests.Response] = {}
    body = {"prompt": "slow", "seed": 3, "steps": 150, "width": 64, "height": 64, "sampler_name": "DDIM"}
    thread = threading.Thread(target=lambda: answer.setdefault("r", requests.post(f"{base}/txt2img", json=body)))
    thread.start()
    try:

        def previewing() -> dict | None:
            p = requests.get(f"{base}/progress", timeout=30).json()
            return p if p["progress"] > 0 and p["current_image"] else None

        progress = wait_for("a preview from the worker", previewing, timeout=180, every=0.2)
        assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_step"] >= 1
        with Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))) as preview:
            assert preview.format == "PNG" and preview.size[0] >= 8
        assert requests.post(f"{base}/interrupt", timeout=30).json() == {}
    finally:
        thread.join(120)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert r.json()["images"] == [] and '"interrupted": true' in r.json()["info"]
    job = Generation.objects.get()
    assert job.status == Status.CANCELLED and job.worker.startswith("celery")
    idle = requests.get(f"{base}/progress", timeout=30).json()
    assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)


def test_openai_generation_runs_on_the_worker(live_server, celery_mode):  # noqa: F811
    celery_mode.start()
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="any", max_retries=0, timeout=180)
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x64", extra_body={"seed": 11, "steps": 2})
    sizes = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size for item in result.data]
    assert sizes == [(64, 64), (64, 64)]
    job = Generation.objects.get()
    assert job.status == Status.SUCCEEDED and job.worker.startswith("celery") and job.seed == 11
