"""Cheap latent previews of a running job: made by the engine, kept on the row, gone at the end."""

from __future__ import annotations

import base64
import dataclasses
import io

import pytest
import torch
from PIL import Image

from api.models import Generation
from api.selectors import generation_preview
from backend.preview import LATENT_RGB, latents_to_rgb
from tests.api.test_async_progress_cancel import SLOW, wait_for


def test_the_linear_map_gives_an_eighth_size_rgb_image_per_family():
    latents = torch.zeros(2, 4, 8, 12)
    latents[0, 0] = 1.0  # channel 0 only: the preview is that channel's RGB row, rescaled
    for family, (factors, bias) in LATENT_RGB.items():
        img = latents_to_rgb(latents, family)
        assert img.size == (12, 8) and img.mode == "RGB"
        expected = tuple(round(min(max((f + b + 1) / 2, 0), 1) * 255) for f, b in zip(factors[0], bias, strict=True))
        assert img.getpixel((0, 0)) == expected


@pytest.fixture
def every_step_previews(monkeypatch):  # noqa: ANN001, ANN201
    from backend.manager import get_manager

    manager = get_manager()
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, preview_interval_s=0.0))


@pytest.mark.usefixtures("live_db", "every_step_previews")
def test_a_running_job_has_a_decodable_preview_and_a_finished_one_none(api):
    body = api.post("/api/txt2img/", {"prompt": "x", "seed": 1, "async": True, **SLOW}, format="json").json()
    preview = wait_for("a preview", lambda: generation_preview(generation_id=body["id"]))
    from backend.manager import get_manager

    factor = get_manager().get("tiny-sd").txt2img.vae_scale_factor  # 8 for real models, 2 for tiny ones
    with Image.open(io.BytesIO(base64.b64decode(preview))) as img:
        assert img.format == "PNG" and img.size == (64 // factor, 64 // factor)
    # Not part of the resource: a poll doesn't carry image data.
    assert "preview" not in api.get(f"/api/results/{body['id']}/").json()
    assert api.post(f"/api/results/{body['id']}/cancel/").status_code in (200, 202)
    wait_for("the end", lambda: Generation.objects.get(pk=body["id"]).is_finished)
    assert generation_preview(generation_id=body["id"]) == ""


@pytest.mark.usefixtures("live_db")
def test_previews_off_means_none_are_made(api, monkeypatch):
    from backend.manager import get_manager

    manager = get_manager()
    seen: list[str] = []
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, previews=False, preview_interval_s=0))
    body = api.post("/api/txt2img/", {"prompt": "x", "seed": 1, "async": True, **SLOW}, format="json").json()
    wait_for("progress", lambda: (Generation.objects.get(pk=body["id"]).progress or {}).get("step", 0) >= 3)
    seen.append(generation_preview(generation_id=body["id"]))
    api.post(f"/api/results/{body['id']}/cancel/")
    assert seen == [""]
