"""The HF task API with the real ``huggingface_hub.InferenceClient`` against the live server."""

from __future__ import annotations

import base64
import contextlib
import io

import httpx2 as httpx
import numpy as np
import pytest
from django.core.cache import cache
from huggingface_hub import InferenceClient
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import BadRequestError, HfHubHTTPError
from PIL import Image

from api.auth import api_key_create
from api.models import Generation
from api.services import jobs
from tests.conftest import png_of

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")


@pytest.fixture(autouse=True)
def hub_online(monkeypatch) -> None:  # noqa: ANN001
    # HF_HUB_OFFLINE=1 (handy for the local-model tests) blocks the client even on 127.0.0.1.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def client_for(live_server, model: str = "tiny-sd", **kwargs) -> InferenceClient:  # noqa: ANN001
    return InferenceClient(base_url=f"{live_server.url}/models/{model}", **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def stored(generation: Generation) -> Image.Image:
    return Image.open(io.BytesIO(jobs.image_bytes(generation.images.get())))


def test_text_to_image_maps_every_parameter_onto_one_generation(live_server):
    image = client_for(live_server).text_to_image(
        "a red fox",
        negative_prompt="fog",
        width=64,
        height=80,
        num_inference_steps=3,
        guidance_scale=6.5,
        seed=1234,
        scheduler="EulerAncestralDiscreteScheduler",
    )
    assert image.format == "PNG" and image.size == (64, 80)
    # The answer is the stored file itself, parameters text chunk included.
    assert "Seed: 1234" in image.text["parameters"]
    row = Generation.objects.get()
    assert (row.kind, row.status, row.model_id, row.seed) == ("txt2img", "succeeded", "tiny-sd", 1234)
    p = row.params
    assert (p["prompt"], p["negative_prompt"], p["width"], p["height"]) == ("a red fox", "fog", 64, 80)
    assert (p["steps"], p["guidance_scale"], p["scheduler"], p["num_images"]) == (3, 6.5, "euler_a", 1)
    assert np.array_equal(pixels(image), pixels(stored(row)))


def test_same_seed_gives_the_same_pixels_and_another_seed_does_not(live_server):
    client = client_for(live_server)
    args = {"width": 64, "height": 64, "num_inference_steps": 2}
    first = client.text_to_image("a lighthouse", seed=77, **args)
    again = client.text_to_image("a lighthouse", seed=77, **args)
    other = client.text_to_image("a lighthouse", seed=78, **args)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert sorted(Generation.objects.values_list("seed", flat=True)) == [77, 77, 78]


@pytest.mark.parametrize(
    ("scheduler", "native"),
    [("DPMSolverMultistepScheduler", "dpmpp_2m"), ("UniPCMultistep", "unipc"), ("lms", "lms")],
)
def test_scheduler_class_names_and_native_names_map(live_server, scheduler, native):
    client_for(live_server).text_to_image("x", seed=1, num_inference_steps=2, scheduler=scheduler)
    assert Generation.objects.get().params["scheduler"] == native


def test_accept_header_picks_the_format(live_server):
    url = f"{live_server.url}/models/tiny-sd"
    body = {"inputs": "a boat", "parameters": {"seed": 5, "num_inference_steps": 2}}
    # The client's own header quirk: a user Accept is sent beside its image/png, and comes first.
    jpeg = client_for(live_server, headers={"Accept": "image/jpeg"}).text_to_image("a boat", seed=5)
    assert jpeg.format == "JPEG" and jpeg.size == (64, 64)
    for accept, fmt, media in [
        ("image/webp", "WEBP", "image/webp"),
        ("*/*", "PNG", "image/png"),
        ("text/html;q=0.9, image/jpeg;q=0.5, image/webp;q=0.8", "WEBP", "image/webp"),
        ("application/json", "PNG", "image/png"),
    ]:
        r = httpx.post(url, json=body, headers={"Accept": accept}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == media, (accept, r.text[:200])
        assert Image.open(io.BytesIO(r.content)).format == fmt
        assert r.headers["X-Seed"] == "5"
    # No Accept at all, a trailing slash, and a bare JSON string body (HF's classic form).
    r = httpx.post(url + "/", content=b'"a boat"', headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Generation.objects.filter(params__prompt="a boat").count() == 6


def test_image_to_image_with_target_size_and_strength(live_server):
    init = png_of((30, 160, 90), size=(96, 96))
    image = client_for(live_server).image_to_image(
        init,
        prompt="a green field",
        negative_prompt="people",
        target_size={"width": 64, "height": 72},
        num_inference_steps=4,
        guidance_scale=5.0,
        strength=0.5,
        seed=99,
    )
    assert image.size == (64, 72)
    row = Generation.objects.get()
    assert (row.kind, row.status, row.seed) == ("img2img", "succeeded", 99)
    p = row.params
    assert (p["prompt"], p["negative_prompt"], p["width"], p["height"]) == ("a green field", "people", 64, 72)
    assert (p["steps"], p["guidance_scale"], p["strength"]) == (4, 5.0, 0.5)
    assert np.array_equal(pixels(image), pixels(stored(row)))


def test_image_to_image_without_target_size_fits_the_input_to_the_model_and_uses_default_strength(
    live_server, settings
):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MIN_SIZE": 32}
    # A 4:3 photo far larger than the model's 64 px: its aspect ratio, its long side at 64.
    image = client_for(live_server).image_to_image(png_of(size=(1024, 768)), prompt="red", num_inference_steps=4)
    assert image.size == (64, 48)
    row = Generation.objects.get()
    assert (row.kind, row.params["width"], row.params["height"], row.params["strength"]) == ("img2img", 64, 48, 0.75)


def test_a_short_or_base64_looking_prompt_is_a_prompt(live_server):
    client = client_for(live_server)
    long_b64ish = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5eg=="
    for prompt in ("abcd", long_b64ish):
        assert client.text_to_image(prompt, seed=3, num_inference_steps=2).size == (64, 64)
    rows = Generation.objects.order_by("created_at")
    assert [(r.kind, r.params["prompt"]) for r in rows] == [("txt2img", "abcd"), ("txt2img", long_b64ish)]


def test_a_raw_image_body_without_a_prompt_is_refused_naming_prompt(live_server):
    with pytest.raises(BadRequestError) as caught:
        client_for(live_server).image_to_image(png_of())  # no parameters: the raw bytes are the body
    assert caught.value.response.status_code == 400
    assert "prompt is required" in caught.value.server_message
    assert Generation.objects.count() == 0


@pytest.fixture
def small_limits(settings) -> None:  # noqa: ANN001
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_STEPS": 5, "MAX_PROMPT_CHARS": 40}


@pytest.mark.usefixtures("small_limits")
@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"num_inference_steps": 6}, "num_inference_steps", "6"),
        ({"num_inference_steps": 0}, "num_inference_steps", "0"),
        ({"width": 60}, "width", "60"),
        ({"height": 2056}, "height", "2056"),
        ({"guidance_scale": 30.5}, "guidance_scale", "30.5"),
        ({"seed": -5}, "seed", "-5"),
        ({"negative_prompt": "n" * 41}, "negative_prompt", "41"),
        ({"scheduler": "NoSuchScheduler"}, "scheduler", "NoSuchScheduler"),
        ({"extra_body": {"strength": 0.5}}, "strength", "accepted:"),
        ({"extra_body": {"num_images_per_prompt": 2}}, "num_images_per_prompt", "accepted:"),
    ],
)
def test_validation_errors_name_the_hf_field_and_create_nothing(live_server, kwargs, field, value):
    with pytest.raises(BadRequestError) as caught:
        client_for(live_server).text_to_image("a cat", **kwargs)
    message = caught.value.server_message
    assert message.startswith(field) or f" {field}" in message, message
    assert value in message, message
    assert caught.value.response.json()["error_type"] == "validation"
    assert Generation.objects.count() == 0


@pytest.mark.usefixtures("small_limits")
def test_limits_below_at_and_above(live_server):
    client = client_for(live_server)
    for steps in (4, 5):
        assert client.text_to_image("a cat", num_inference_steps=steps, seed=1).size == (64, 64)
    assert Generation.objects.count() == 2
    with pytest.raises(BadRequestError, match="num_inference_steps must be between 1 and 5, got 6"):
        client.text_to_image("a cat", num_inference_steps=6)
    with pytest.raises(BadRequestError, match="inputs must be at most 40 characters, got 41"):
        client.text_to_image("p" * 41)
    assert Generation.objects.count() == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_size": {"width": 60, "height": 64}}, "target_size.width must be a multiple of 8"),
        ({"strength": 1.5}, "strength must be in (0, 1], got 1.5"),
        ({"num_inference_steps": 2, "strength": 0.2}, "strength"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_image_to_image_validation(live_server, kwargs, field):
    with pytest.raises(BadRequestError) as caught:
        client_for(live_server).image_to_image(png_of(), prompt="x", **kwargs)
    assert field in caught.value.server_message
    assert Generation.objects.count() == 0


def test_broken_base64_image_names_inputs(live_server):
    head = base64.b64encode(png_of()).decode()[:80]  # a PNG signature, then cut off
    r = httpx.post(
        f"{live_server.url}/models/tiny-sd", json={"inputs": head + "!", "parameters": {"prompt": "x"}}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"].startswith("inputs"), r.text
    assert Generation.objects.count() == 0


def test_unknown_model_is_404_listing_the_catalogue(live_server):
    with pytest.raises(HfHubHTTPError) as caught:
        client_for(live_server, model="no-such-model").text_to_image("a cat")
    assert caught.value.response.status_code == 404
    assert "no-such-model" in caught.value.server_message and "tiny-sd" in caught.value.server_message
    # A path is a key into the catalogue, nothing else.
    r = httpx.post(f"{live_server.url}/models/../../etc/passwd", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 404
    assert Generation.objects.count() == 0


def test_a_catalogue_entry_is_found_by_its_hub_repository(live_server):
    # openjourney-v4's repo: found (so the request is validated, here refused), not a 404.
    with pytest.raises(BadRequestError, match="num_inference_steps"):
        client_for(live_server, model="prompthero/openjourney-v4").text_to_image("a cat", num_inference_steps=0)
    assert Generation.objects.count() == 0


def test_auth_required(live_server, settings):
    settings.AUTH_REQUIRED = True
    with pytest.raises(HfHubHTTPError) as missing:
        client_for(live_server).text_to_image("a cat")
    assert missing.value.response.status_code == 401
    assert "API key" in missing.value.response.json()["error"]
    with pytest.raises(HfHubHTTPError) as wrong:
        client_for(live_server, api_key="sk-not-a-key").text_to_image("a cat")
    assert wrong.value.response.status_code == 401
    assert Generation.objects.count() == 0

    key_row, key = api_key_create(name="hf-client")
    image = client_for(live_server, api_key=key).text_to_image("a cat", seed=8, num_inference_steps=2)
    assert image.size == (64, 64)
    assert Generation.objects.get().owner_id == key_row.pk


def test_rate_limit_is_429_with_retry_after(live_server, settings):
    settings.RATE_LIMITS = {"generate": "1/minute", "read": ""}
    cache.clear()
    try:
        client = client_for(live_server)
        client.text_to_image("a cat", seed=1, num_inference_steps=2)
        with pytest.raises(HfHubHTTPError) as caught:
            client.text_to_image("a cat", seed=1, num_inference_steps=2)
        response = caught.value.response
        assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
        assert response.json()["error_type"] == "overloaded"
        assert Generation.objects.count() == 1
    finally:
        cache.clear()


def test_sync_timeout_is_504_naming_the_generation(live_server, settings):
    settings.SYNC_TIMEOUT = 0.05
    with pytest.raises(HfHubHTTPError) as caught:
        client_for(live_server).text_to_image("slow", num_inference_steps=40)
    assert caught.value.response.status_code == 504
    row = Generation.objects.get()
    assert f"generation {row.id} did not finish" in caught.value.response.json()["error"]
    # The job goes on after the answer; stop it rather than wait it out.
    with contextlib.suppress(Exception):
        jobs.generation_cancel(generation=row)
