"""The REST API in remote mode: the real worker thread, the real InferenceClient, and an
inference server on 127.0.0.1. Remote results are saved, listed and served like local ones."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from huggingface_hub import constants as hf_constants
from PIL import Image

from api.models import Generation
from backend.config import EngineConfig, get_config, set_config
from backend.router import reset_backends
from tests.conftest import media_path, png_of
from tests.fakes.inference_server import FakeInferenceServer, Reply, png_for

pytestmark = pytest.mark.usefixtures("live_db")

TOKEN = "hf_ApiRemoteToken0123456789abc"

Switch = Callable[..., EngineConfig]


@pytest.fixture
def server() -> Iterator[FakeInferenceServer]:
    # echo_credentials: a careless service that repeats the Authorization it got in its errors.
    with FakeInferenceServer(token=TOKEN, echo_credentials=True) as s:
        yield s


@pytest.fixture
def remote(server, settings, monkeypatch) -> Iterator[Switch]:  # noqa: ANN001
    """Remote mode pointed at the test server; ``remote(**overrides)`` changes settings mid-test."""
    # HF_HUB_OFFLINE=1 (handy for the local-model tests) blocks the client even on 127.0.0.1.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    original = get_config()

    def switch(**overrides: object) -> EngineConfig:
        values: dict[str, object] = {
            "use_local_models": "false",
            "hf_token": TOKEN,
            "hf_inference_url": server.url,
            "remote_timeout_s": 2.0,
            "remote_max_retries": 2,
            "remote_backoff_s": 0.01,
            "remote_max_backoff_s": 0.05,
        }
        values.update(overrides)
        config = replace(settings.ENGINE, **values)  # type: ignore[arg-type]
        set_config(config)
        settings.ENGINE = config
        reset_backends()
        return config

    switch()
    yield switch
    set_config(original)
    reset_backends()


def png_color(path_or_bytes: object) -> tuple[int, int, int]:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:  # type: ignore[arg-type]
        return img.convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


def test_txt2img_in_remote_mode_is_saved_listed_and_served_like_local(api, remote, server):
    request = {
        "prompt": "a red fox",
        "negative_prompt": "fog",
        "seed": 11,
        "num_images": 2,
        "steps": 5,
        "guidance_scale": 6.0,
        "width": 64,
        "height": 80,
    }
    r = api.post("/api/txt2img/", request, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["status"] == "succeeded" and body["backend"] == "remote" and body["error"] is None
    assert body["seed"] == 11
    assert [(i["seed"], i["width"], i["height"]) for i in body["images"]] == [(11, 64, 80), (12, 64, 80)]

    # What the service was asked for.
    assert len(server.requests) == 2
    for sent, seed in zip(server.requests, (11, 12), strict=True):
        assert sent.path == server.path and sent.authorization == f"Bearer {TOKEN}"
        assert sent.json == {
            "inputs": "a red fox",
            "parameters": {
                "negative_prompt": "fog",
                "width": 64,
                "height": 80,
                "num_inference_steps": 5,
                "guidance_scale": 6.0,
                "seed": seed,
            },
        }

    # What it drew is what was saved, with the seed in the PNG's parameters text.
    for image, payload in zip(body["images"], server.bodies, strict=True):
        path = media_path(image["url"])
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (64, 80)
            assert f"Seed: {image['seed']}" in png.text["parameters"]
        assert png_color(path) == png_color(png_for(payload, (64, 80)))
        served = api.get(image["url"].replace("http://testserver", ""))
        assert served.status_code == 200 and served["Content-Type"] == "image/png"
        assert b"".join(served.streaming_content) == path.read_bytes()

    listed = api.get("/api/results/").json()
    assert listed["results"][0]["id"] == body["id"]
    assert listed["results"][0]["images"] == body["images"]
    detail = api.get(f"/api/results/{body['id']}/").json()
    assert detail["status"] == "succeeded" and detail["backend"] == "remote"
    assert detail["images"] == body["images"]
    assert Generation.objects.get(pk=body["id"]).backend == "remote"


def test_img2img_in_remote_mode(api, remote, server):
    source = png_of((30, 60, 90), size=(96, 96))
    r = api.post(
        "/api/img2img/",
        {"prompt": "make it night", "image": base64.b64encode(source).decode(), "seed": 5, "strength": 0.4},
        format="json",
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["kind"] == "img2img" and body["status"] == "succeeded" and body["backend"] == "remote"
    [image] = body["images"]
    assert image["seed"] == 5

    [sent] = server.requests
    assert sent.authorization == f"Bearer {TOKEN}"
    payload = sent.json
    params = body["params"]
    assert payload["parameters"] == {
        "prompt": "make it night",
        "num_inference_steps": params["steps"],
        "guidance_scale": params["guidance_scale"],
        "target_size": {"width": params["width"], "height": params["height"]},
        "strength": 0.4,
        "seed": 5,
    }
    sent_image = base64.b64decode(payload["inputs"])
    assert png_color(sent_image) == (30, 60, 90)
    with Image.open(io.BytesIO(sent_image)) as img:
        assert img.size == (params["width"], params["height"])

    path = media_path(image["url"])
    assert png_color(path) == png_color(png_for(payload, (params["width"], params["height"])))
    assert api.get("/api/results/").json()["results"][0]["id"] == body["id"]


def test_async_remote_generation_finishes_like_a_local_one(api, remote, server):
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 3, "async": True}, format="json")
    assert r.status_code == 202
    location = r["Location"].replace("http://testserver", "")
    deadline = time.monotonic() + 10
    while (detail := api.get(location).json())["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert detail["status"] == "succeeded" and detail["backend"] == "remote"
    assert detail["images"][0]["seed"] == 3


def test_status_and_models_report_remote_mode(api, remote):
    status = api.get("/api/status/").json()
    assert status["mode"] == "remote" and status["inference_available"] is True
    models = api.get("/api/models/").json()
    assert models and all(m["runs_on"] == "remote" for m in models)


def test_bad_token_is_a_clear_auth_error_and_the_server_keeps_serving(api, remote, server):
    remote(hf_token="hf_WrongToken000000000000")
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
    assert r.status_code == 502, r.content
    body = r.json()
    assert body["status"] == "failed" and body["images"] == []
    assert body["error"]["code"] == "remote_auth_failed"
    assert "HF_TOKEN" in body["error"]["message"] and "401" in body["error"]["message"]
    assert set(body["error"]) == {"code", "message"}
    row = Generation.objects.get(pk=body["id"])
    assert row.status == "failed" and row.error["code"] == "remote_auth_failed"
    assert len(server.requests) == 1

    assert api.get("/api/health/").json() == {"status": "ok"}
    remote()
    ok = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
    assert ok.status_code == 200 and ok.json()["status"] == "succeeded"
    listed = api.get("/api/results/").json()["results"]
    assert [g["status"] for g in listed[:2]] == ["succeeded", "failed"]


def test_503_then_200_succeeds_after_a_retry(api, remote, server):
    server.script(Reply.error(503, "Model remote-test/sd is currently loading", estimated_time=0.01))
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 2}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["status"] == "succeeded" and len(body["images"]) == 1
    assert len(server.requests) == 2
    assert any("retried 1 time" in w for w in body["warnings"])


def test_429_with_retry_after_is_retried_then_a_clear_error(api, remote, server):
    remote(remote_max_retries=2, remote_max_backoff_s=0.1)
    server.always(Reply.error(429, "Rate limit reached", headers={"Retry-After": "1"}))
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 2}, format="json")
    assert r.status_code == 429, r.content
    error = r.json()["error"]
    assert error["code"] == "remote_rate_limited"
    assert "rate limiting" in error["message"] and "3 attempt(s)" in error["message"]
    assert len(server.requests) == 3
    # Retry-After (1 s) capped by REMOTE_MAX_BACKOFF (0.1 s), not the 0.01 s backoff.
    gaps = [b.at - a.at for a, b in zip(server.requests, server.requests[1:], strict=False)]
    assert all(gap >= 0.1 for gap in gaps)


def test_a_hang_fails_with_a_timeout_within_the_configured_time(api, remote, server):
    remote(remote_timeout_s=0.5)
    server.script(Reply.hang(30))
    started = time.monotonic()
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 2}, format="json")
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.content
    assert r.json()["error"]["code"] == "remote_timeout"
    assert elapsed < 3.0
    assert Generation.objects.get(pk=r.json()["id"]).status == "failed"


def test_a_200_that_is_not_an_image_is_a_clear_error(api, remote, server):
    server.script(Reply.raw(b'{"generated_text": "I am not a picture"}', content_type="application/json"))
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 2}, format="json")
    assert r.status_code == 502, r.content
    error = r.json()["error"]
    assert error["code"] == "remote_bad_response" and "not an image" in error["message"]
    assert not (Path(django_settings.MEDIA_ROOT) / "generations" / r.json()["id"]).exists()


def test_a_model_with_no_hub_repo_names_the_setting_that_fixes_it(api, remote):
    remote(hf_inference_url="")
    r = api.post("/api/txt2img/", {"prompt": "x", "model_id": "tiny-sd"}, format="json")
    assert r.status_code == 503, r.content
    error = r.json()["error"]
    assert error["code"] == "remote_model_unavailable" and "HF_REMOTE_MODEL_MAP" in error["message"]


def test_the_token_never_appears_in_logs_or_responses(api, remote, server, caplog):
    names = ("", "api", "backend", "django", "huggingface_hub", "httpx2", "httpcore2")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.DEBUG)
    caplog.handler.setLevel(logging.DEBUG)
    bodies: list[bytes] = []
    try:
        # A service that repeats the credentials it was sent, in a 401 and in a 422.
        remote(hf_token=TOKEN + "Z")
        bodies.append(api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json").content)
        remote()
        server.script(Reply.error(422, f"bad parameters for Bearer {TOKEN} ({TOKEN})"))
        rejected = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
        assert rejected.status_code == 400 and rejected.json()["error"]["code"] == "remote_rejected"
        bodies.append(rejected.content)
        server.script(Reply.error(503, f"loading {TOKEN}"))
        ok = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
        assert ok.status_code == 200
        bodies.append(ok.content)
        for path in (
            "/api/results/",
            f"/api/results/{ok.json()['id']}/",
            f"/api/results/{rejected.json()['id']}/",
            "/api/status/",
            "/api/models/",
        ):
            bodies.append(api.get(path).content)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)

    assert all(request.authorization in (f"Bearer {TOKEN}", f"Bearer {TOKEN}Z") for request in server.requests)
    assert "generation" in caplog.text and "answered HTTP 401" in caplog.text
    secret = TOKEN[3:]
    assert secret not in caplog.text
    for body in bodies:
        assert secret.encode() not in body
    for row in Generation.objects.all():
        assert secret not in json.dumps(row.error or {}) and secret not in json.dumps(row.warnings or [])
    assert "Bearer ***" in rejected.json()["error"]["message"]


def test_inpainting_in_remote_mode_is_refused_before_anything_is_stored(api, remote, server):
    image = base64.b64encode(png_of()).decode()
    before = (Generation.objects.count(), len(server.requests))
    inputs = Path(django_settings.MEDIA_ROOT) / "inputs"
    files_before = set(inputs.iterdir()) if inputs.exists() else set()
    r = api.post("/api/inpaint/", {"prompt": "x", "image": image, "mask": image}, format="json")
    assert r.status_code == 400, r.content
    assert "inpainting runs on local models only" in r.json()["error"]["fields"]["mask"][0]
    assert (Generation.objects.count(), len(server.requests)) == before
    assert (set(inputs.iterdir()) if inputs.exists() else set()) == files_before
