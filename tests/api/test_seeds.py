"""Seed rules: reproducible bytes, server-picked seeds, per-image seeds in a batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.conftest import media_path

pytestmark = pytest.mark.usefixtures("live_db")


def pixels(url: str) -> np.ndarray:
    with Image.open(media_path(url)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_same_params_and_seed_give_byte_identical_png(api):
    body = {"prompt": "a quiet harbour", "seed": 1234, "negative_prompt": "rain"}
    first = api.post("/api/txt2img/", body, format="json").json()
    second = api.post("/api/txt2img/", body, format="json").json()
    assert first["id"] != second["id"]
    a, b = (media_path(g["images"][0]["url"]).read_bytes() for g in (first, second))
    assert a == b


def test_same_seed_gives_the_same_png_in_a_fresh_process(api):
    """A server restart: a new process loads the model from disk and must make the same bytes."""
    body = {"prompt": "a quiet harbour", "seed": 99, "steps": 3}
    ours = media_path(api.post("/api/txt2img/", body, format="json").json()["images"][0]["url"]).read_bytes()
    code = textwrap.dedent(
        """
        import os, sys
        os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings_test"
        import django
        django.setup()
        from django.conf import settings
        from backend.local import LocalBackend
        from backend.params import GenerationParams
        from api.images import png_bytes, parameters_text
        p = GenerationParams(kind="txt2img", model_id="tiny-sd", prompt="a quiet harbour", width=64, height=64,
                             steps=3, guidance_scale=7.5, seed=99)
        out = LocalBackend().generate(p)
        sys.stdout.buffer.write(png_bytes(out.images[0].image, text={"parameters": parameters_text(p.to_dict(), 99)}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == ours


@pytest.mark.parametrize("seed", [None, -1])
def test_missing_or_minus_one_seed_is_picked_and_returned(api, seed):
    body = {"prompt": "x"} if seed is None else {"prompt": "x", "seed": seed}
    first = api.post("/api/txt2img/", body, format="json").json()
    second = api.post("/api/txt2img/", body, format="json").json()
    for g in (first, second):
        assert 0 <= g["seed"] <= 2**32 - 1
        assert g["params"]["seed"] == g["seed"] == g["images"][0]["seed"]
    assert first["seed"] != second["seed"]
    # The returned seed reproduces the image.
    again = api.post("/api/txt2img/", {"prompt": "x", "seed": first["seed"]}, format="json").json()
    assert media_path(again["images"][0]["url"]).read_bytes() == media_path(first["images"][0]["url"]).read_bytes()


def test_batch_images_get_consecutive_seeds_each_reproducible_alone(api):
    batch = api.post("/api/txt2img/", {"prompt": "three cats", "seed": 500, "num_images": 3}, format="json").json()
    assert [img["seed"] for img in batch["images"]] == [500, 501, 502]
    assert len({media_path(img["url"]).read_bytes() for img in batch["images"]}) == 3
    for image in batch["images"][1:]:
        alone = api.post("/api/txt2img/", {"prompt": "three cats", "seed": image["seed"]}, format="json").json()
        diff = np.abs(pixels(alone["images"][0]["url"]) - pixels(image["url"]))
        assert diff.max() <= 2, diff.max()


def test_batch_seeds_wrap_at_2_pow_32(api):
    batch = api.post("/api/txt2img/", {"prompt": "x", "seed": 2**32 - 1, "num_images": 2}, format="json").json()
    assert [img["seed"] for img in batch["images"]] == [2**32 - 1, 0]
