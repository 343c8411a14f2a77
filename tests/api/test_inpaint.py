"""POST /api/inpaint/: img2img plus a mask (white repaints, black keeps)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from api.models import Generation
from tests.conftest import media_path, png_of

pytestmark = pytest.mark.usefixtures("live_db")

RED = (200, 30, 30)


def mask_png(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> bytes:
    """Black (keep) everywhere but a white (repaint) box."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(body: dict, index: int = 0) -> np.ndarray:
    with Image.open(media_path(body["images"][index]["url"])) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def inpaint(api, **fields):  # noqa: ANN001, ANN003, ANN201
    body = {"prompt": "a blue square", "seed": 5, "image": b64(png_of(RED)), "mask": b64(mask_png())} | fields
    return api.post("/api/inpaint/", body, format="json")


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl", "tiny-sd-inpaint"])
def test_outside_the_mask_comes_back_as_sent_inside_it_is_repainted(api, model_id):
    r = inpaint(api, model_id=model_id, mask_blur=0, strength=1.0)
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["kind"] == "inpaint" and body["status"] == "succeeded"
    assert body["params"]["mask_blur"] == 0
    out = pixels(body)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    # Pasted back: exactly the input's pixels wherever the mask is black.
    assert (out[outside] == np.array(RED)).all()
    # Repainted by a model of noise: the masked box is no longer the flat input colour.
    assert np.abs(out[16:48, 16:48] - np.array(RED)).max() > 20


def test_the_inpaint_pipeline_shares_the_weights_and_knows_an_inpainting_checkpoint(api):
    from backend.manager import get_manager

    assert inpaint(api, model_id="tiny-sd").status_code == 200
    assert inpaint(api, model_id="tiny-sd-inpaint").status_code == 200
    plain, nine = get_manager().get("tiny-sd"), get_manager().get("tiny-sd-inpaint")
    assert type(plain.inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert plain.inpaint.unet is plain.txt2img.unet and not plain.is_inpainting
    assert nine.inpaint.unet.config.in_channels == 9 and nine.is_inpainting


def test_an_inpainting_checkpoint_also_serves_txt2img_and_img2img(api):
    t = api.post("/api/txt2img/", {"prompt": "x", "seed": 2, "model_id": "tiny-sd-inpaint"}, format="json")
    assert t.status_code == 200, t.content
    assert pixels(t.json()).shape == (64, 64, 3)
    # img2img starts from the image: with one seed, two inputs give two results, and the same
    # input gives the same one. (The tiny VAE's random weights blur how much the input shows.)
    outs = []
    for color in ((250, 250, 250), (0, 0, 0), (250, 250, 250)):
        body = {"prompt": "x", "seed": 2, "model_id": "tiny-sd-inpaint", "image": b64(png_of(color)), "strength": 0.5}
        r = api.post("/api/img2img/", body, format="json")
        assert r.status_code == 200, r.content
        outs.append(pixels(r.json()))
    assert (outs[0] != outs[1]).any() and (outs[0] == outs[2]).all()


def test_a_mask_of_another_size_is_resized(api):
    r = inpaint(api, mask=b64(mask_png(size=(32, 32), box=(8, 8, 24, 24))), mask_blur=0, strength=1.0)
    assert r.status_code == 200, r.content
    out = pixels(r.json())
    # The 32px mask's box (8..24) scales to 16..48 on the 64px image.
    assert (out[:12, :] == np.array(RED)).all() and (out[52:, :] == np.array(RED)).all()


def test_blur_softens_the_seam_and_the_same_seed_reproduces(api):
    sharp = inpaint(api, mask_blur=0, strength=1.0).json()
    soft = inpaint(api, mask_blur=8, strength=1.0).json()
    again = inpaint(api, mask_blur=8, strength=1.0).json()
    assert media_path(soft["images"][0]["url"]).read_bytes() == media_path(again["images"][0]["url"]).read_bytes()
    # Just outside the box: untouched when sharp, blended when blurred.
    assert (pixels(sharp)[14, 20:44] == np.array(RED)).all()
    assert (pixels(soft)[14, 20:44] != np.array(RED)).any()


def test_multipart_upload_and_files_are_removed_with_the_result(api):
    r = api.post(
        "/api/inpaint/",
        {
            "prompt": "x",
            "seed": "3",
            "image": SimpleUploadedFile("a.png", png_of(), content_type="image/png"),
            "mask": SimpleUploadedFile("../m.png", mask_png(), content_type="image/png"),
        },
        format="multipart",
    )
    assert r.status_code == 200, r.content
    generation = Generation.objects.get(pk=r.json()["id"])
    assert generation.mask_image == f"inputs/{generation.id}-mask.png"
    mask_file = Path(settings.MEDIA_ROOT) / generation.mask_image
    with Image.open(mask_file) as stored:
        assert stored.mode == "L"
    assert api.delete(f"/api/results/{generation.id}/").status_code == 204
    assert not mask_file.exists()


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"mask": None}, "mask", "mask is required"),
        ({"mask": "not base64!"}, "mask", "base64"),
        ({"mask": b64(b"GIF89a" + b"\0" * 40)}, "mask", "PNG, JPEG or WebP"),
        ({"mask_blur": -1}, "mask_blur", "between 0 and 64 pixels, got -1"),
        ({"mask_blur": 65}, "mask_blur", "between 0 and 64 pixels, got 65"),
        ({"image": None}, "image", "image is required"),
    ],
)
def test_bad_masks_are_refused_naming_the_field_and_nothing_is_created(api, fields, field, words):
    before = Generation.objects.count()
    body = {"prompt": "x", "image": b64(png_of()), "mask": b64(mask_png())} | fields
    r = api.post("/api/inpaint/", {k: v for k, v in body.items() if v is not None}, format="json")
    assert r.status_code == 400, r.content
    assert words in r.json()["error"]["fields"][field][0]
    assert Generation.objects.count() == before


def test_mask_blur_at_its_limits_is_accepted(api):
    for blur in (0, 64):
        assert inpaint(api, mask_blur=blur).status_code == 200
