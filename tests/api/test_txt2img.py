"""POST /api/txt2img/: the happy paths, through the real worker thread and tiny pipelines."""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from api.models import Generation
from tests.conftest import media_path

pytestmark = pytest.mark.usefixtures("live_db")


def test_sync_txt2img_returns_finished_generation_with_resolved_params(api):
    r = api.post("/api/txt2img/", {"prompt": "a red fox", "seed": 7}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["status"] == "succeeded"
    assert body["kind"] == "txt2img"
    assert body["model_id"] == "tiny-sd"
    # Defaults filled in from the model's catalogue entry; then what ran, for the record.
    record = {k: body["params"].pop(k) for k in ("versions", "model_source", "model_revision")}
    assert record["model_source"] == "builtin" and "diffusers" in record["versions"]
    assert body["params"] | {"prompt": "a red fox"} == {
        "kind": "txt2img",
        "model_id": "tiny-sd",
        "prompt": "a red fox",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 7,
        "num_images": 1,
        "scheduler": None,
        "strength": None,
        "mask_blur": None,
        "loras": [],
        "prompt_tokens": 7,  # the tiny tokenizer: a character a token, spaces none
        "negative_prompt_tokens": 0,
    }
    assert body["seed"] == 7 and body["error"] is None
    assert body["progress"]["fraction"] == 1.0
    assert body["created_at"] and body["started_at"] and body["finished_at"]
    assert {"queue_s", "load_s", "inference_s"} <= set(body["timings"])
    [image] = body["images"]
    assert image["seed"] == 7 and (image["width"], image["height"]) == (64, 64)
    path = media_path(image["url"])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (64, 64)
        assert "Seed: 7" in png.text["parameters"]
    assert Generation.objects.get(pk=body["id"]).status == "succeeded"


def test_image_url_is_served_as_png_with_nosniff(api):
    body = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json").json()
    url = body["images"][0]["url"]
    r = api.get(url.replace("http://testserver", ""))
    assert r.status_code == 200
    assert r["Content-Type"] == "image/png"
    assert r["X-Content-Type-Options"] == "nosniff"
    data = b"".join(r.streaming_content)
    assert data == media_path(url).read_bytes()


def test_b64_json_response_format_inlines_the_png(api):
    body = api.post("/api/txt2img/", {"prompt": "x", "seed": 3, "response_format": "b64_json"}, format="json").json()
    [image] = body["images"]
    raw = base64.b64decode(image["b64_json"])
    assert raw == media_path(image["url"]).read_bytes()
    assert Image.open(io.BytesIO(raw)).size == (64, 64)


def test_sdxl_shaped_model_runs_with_the_sdxl_pipeline(api):
    r = api.post(
        "/api/txt2img/", {"prompt": "x", "model_id": "tiny-sdxl", "seed": 5, "width": 64, "height": 96}, format="json"
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["model_id"] == "tiny-sdxl"
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (64, 96)
    from backend.manager import get_manager

    assert type(get_manager().get("tiny-sdxl").txt2img).__name__ == "StableDiffusionXLPipeline"


def test_negative_prompt_and_scheduler_change_the_image_and_are_echoed(api):
    base = {"prompt": "a lighthouse", "seed": 11}
    plain = api.post("/api/txt2img/", base, format="json").json()
    negative = api.post("/api/txt2img/", base | {"negative_prompt": "fog"}, format="json").json()
    euler = api.post("/api/txt2img/", base | {"scheduler": "euler_a"}, format="json").json()
    assert negative["params"]["negative_prompt"] == "fog"
    assert euler["params"]["scheduler"] == "euler_a"
    files = [media_path(b["images"][0]["url"]).read_bytes() for b in (plain, negative, euler)]
    assert files[0] != files[1]
    assert files[0] != files[2]


def test_async_request_returns_202_with_location_then_finishes(api):
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 2, "async": True}, format="json")
    assert r.status_code == 202, r.content
    body = r.json()
    # The 202 body is the job as just queued: nothing of a run in it yet.
    assert (body["status"], body["images"], body["started_at"], body["finished_at"]) == ("queued", [], None, None)
    assert body["seed"] == 2 and body["params"]["prompt"] == "x" and body["error"] is None
    assert r["Location"].endswith(f"/api/results/{body['id']}/")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = api.get(f"/api/results/{body['id']}/").json()
        if got["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert got["status"] == "succeeded"
    assert len(got["images"]) == 1


def test_prefer_respond_async_header_also_gives_202(api):
    r = api.post("/api/txt2img/", {"prompt": "x"}, format="json", HTTP_PREFER="respond-async")
    assert r.status_code == 202


def test_generations_show_in_the_admin(api, django_user_model, client):
    body = api.post("/api/txt2img/", {"prompt": "admin check", "seed": 4}, format="json").json()
    admin = django_user_model.objects.create_superuser("admin", "a@example.com", "pw-12345-xyz")
    client.force_login(admin)
    listing = client.get("/admin/api/generation/")
    assert listing.status_code == 200
    assert body["id"] in listing.content.decode()
    detail = client.get(f"/admin/api/generation/{body['id']}/change/")
    assert detail.status_code == 200
    assert "admin check" in detail.content.decode()


def test_a_prompt_longer_than_the_token_window_is_encoded_whole_and_its_tokens_reported(api):
    short = api.post("/api/txt2img/", {"prompt": "a" * 70, "seed": 1}, format="json").json()
    assert short["warnings"] == [] and short["params"]["prompt_tokens"] == 70
    long = api.post(
        "/api/txt2img/", {"prompt": "a" * 200, "seed": 1, "negative_prompt": "b" * 10}, format="json"
    ).json()
    assert long["status"] == "succeeded" and long["warnings"] == []
    # The tiny tokenizer reads characters: every one counts, none is dropped.
    assert (long["params"]["prompt_tokens"], long["params"]["negative_prompt_tokens"]) == (200, 10)
