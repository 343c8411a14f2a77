"""GET /api/models/, /api/status/, /api/health/."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.usefixtures("live_db")

CATALOGUE = {
    "stable-diffusion-v1-5",
    "stable-diffusion-2-1",
    "dreamshaper-8",
    "sdxl-base-1.0",
    "openjourney-v4",
    "tiny-sd",
    "tiny-sdxl",
}


def test_models_lists_the_catalogue_with_loaded_flags(api):
    models = {m["id"]: m for m in api.get("/api/models/").json()}
    assert CATALOGUE <= set(models)
    for model in models.values():
        assert {"id", "name", "default_size", "family", "loaded", "location", "runs_on"} <= set(model)
    assert models["tiny-sd"]["default_size"] == 64 and models["tiny-sd"]["family"] == "sd15"
    assert models["tiny-sdxl"]["family"] == "sdxl"
    assert models["sdxl-base-1.0"]["default_size"] == 1024
    assert models["stable-diffusion-2-1"]["prediction_type"] == "v_prediction"
    api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
    models = {m["id"]: m for m in api.get("/api/models/").json()}
    assert models["tiny-sd"]["loaded"] is True
    assert models["stable-diffusion-v1-5"]["loaded"] is False


def test_status_reports_mode_queue_and_system_info(api):
    api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
    body = api.get("/api/status/").json()
    assert body["status"] == "ok"
    assert body["inference_available"] is True
    assert body["mode"] == "local"
    assert "tiny-sd" in body["loaded_models"]
    assert body["queue"] == {"queued": 0, "running": 0}
    info = body["system_info"]
    assert {"pytorch_version", "cuda_available", "cuda_version", "device_count", "devices"} <= set(info)
    assert info["cuda_available"] is False and info["device_count"] == 0
    assert body["device"]["device"] == "cpu" and body["device"]["dtype"] == "fp32"


def test_health_is_ok(api):
    r = api.get("/api/health/")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_health_never_imports_torch():
    code = textwrap.dedent(
        """
        import os, sys
        os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings_test"
        import django
        django.setup()
        from django.test import Client
        r = Client().get("/api/health/")
        assert r.status_code == 200, r.status_code
        print("torch" in sys.modules, "diffusers" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_unknown_path_gives_404_in_the_error_shape(api):
    r = api.get("/api/results/00000000-0000-0000-0000-000000000000/")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
