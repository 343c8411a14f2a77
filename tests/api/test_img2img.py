"""POST /api/img2img/ with a multipart file, base64 and a data URL."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from api.models import Generation
from tests.conftest import media_path, png_of

pytestmark = pytest.mark.usefixtures("live_db")


def test_multipart_upload(api):
    upload = SimpleUploadedFile("../../evil name.png", png_of((10, 200, 10)), content_type="image/png")
    r = api.post(
        "/api/img2img/",
        {"prompt": "a green field", "image": upload, "seed": "9", "strength": "0.5"},
        format="multipart",
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["kind"] == "img2img" and body["status"] == "succeeded"
    assert body["params"]["strength"] == 0.5
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (64, 64)
    generation = Generation.objects.get(pk=body["id"])
    # Stored under a server-made name; nothing of the client's file name survives.
    assert generation.input_image == f"inputs/{generation.id}.png"
    assert "evil" not in generation.input_image


def test_base64_and_data_url_give_the_same_image_as_multipart(api):
    raw = png_of((120, 40, 200))
    b64 = base64.b64encode(raw).decode()
    common = {"prompt": "violet", "seed": 21, "strength": 0.75}
    as_b64 = api.post("/api/img2img/", common | {"image": b64}, format="json").json()
    as_url = api.post("/api/img2img/", common | {"image": f"data:image/png;base64,{b64}"}, format="json").json()
    upload = SimpleUploadedFile("in.png", raw, content_type="image/png")
    as_file = api.post("/api/img2img/", {**common, "image": upload}, format="multipart").json()
    files = [media_path(b["images"][0]["url"]).read_bytes() for b in (as_b64, as_url, as_file)]
    assert files[0] == files[1] == files[2]


def test_jpeg_and_webp_inputs_are_accepted(api):
    for fmt in ("JPEG", "WEBP"):
        r = api.post(
            "/api/img2img/",
            {"prompt": "x", "seed": 1, "image": base64.b64encode(png_of(fmt=fmt)).decode()},
            format="json",
        )
        assert r.status_code == 200, (fmt, r.content)


def test_strength_changes_the_result_and_the_input_matters(api):
    image = base64.b64encode(png_of((250, 250, 250))).decode()
    other = base64.b64encode(png_of((0, 0, 0))).decode()
    low = api.post("/api/img2img/", {"prompt": "x", "seed": 3, "image": image, "strength": 0.5}, format="json").json()
    high = api.post("/api/img2img/", {"prompt": "x", "seed": 3, "image": image, "strength": 1.0}, format="json").json()
    dark = api.post("/api/img2img/", {"prompt": "x", "seed": 3, "image": other, "strength": 0.5}, format="json").json()
    files = [media_path(b["images"][0]["url"]).read_bytes() for b in (low, high, dark)]
    assert files[0] != files[1]
    assert files[0] != files[2]


def test_input_is_resized_to_the_requested_size(api):
    image = base64.b64encode(png_of(size=(100, 80))).decode()
    body = api.post(
        "/api/img2img/", {"prompt": "x", "seed": 1, "image": image, "width": 96, "height": 64}, format="json"
    ).json()
    with Image.open(media_path(body["images"][0]["url"])) as out:
        assert out.size == (96, 64)


def test_sdxl_img2img(api):
    image = base64.b64encode(png_of()).decode()
    r = api.post("/api/img2img/", {"prompt": "x", "seed": 1, "image": image, "model_id": "tiny-sdxl"}, format="json")
    assert r.status_code == 200, r.content
    from backend.manager import get_manager

    model = get_manager().get("tiny-sdxl")
    assert type(model.img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    # from_pipe shares the weights with the txt2img pipeline.
    assert model.img2img.unet is model.txt2img.unet


def test_delete_removes_input_and_outputs(api):
    image = base64.b64encode(png_of()).decode()
    body = api.post("/api/img2img/", {"prompt": "x", "seed": 1, "image": image}, format="json").json()
    generation = Generation.objects.get(pk=body["id"])
    input_path = Path(settings.MEDIA_ROOT) / generation.input_image
    output = media_path(body["images"][0]["url"])
    assert input_path.exists() and output.exists()
    assert api.delete(f"/api/results/{body['id']}/").status_code == 204
    assert not input_path.exists() and not output.exists()
