"""The OpenAI Images API with the real ``openai`` client against the live server."""

from __future__ import annotations

import base64
import dataclasses
import io
import warnings

import httpx2 as httpx
import numpy as np
import openai
import pytest
from django.conf import settings
from PIL import Image

from api.auth import api_key_create
from api.models import Generation
from protocols.openai_images.fields import VARIATION_PROMPT
from tests.conftest import media_path, png_of

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")

# The machines running the suite may be busy: plain HTTP calls get the SDK's patience.
TIMEOUT = 120


def client_for(live_server, api_key: str = "anything") -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=api_key, max_retries=0)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def stored(generation: Generation, index: int = 0) -> Image.Image:
    image = generation.images.get(index=index)
    return Image.open(media_path(settings.MEDIA_URL + image.file))


def gradient_png(size: int = 64) -> bytes:
    """An input with structure, so "kept" and "repainted" are told apart."""
    x = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def alpha_mask_png(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> bytes:
    """OpenAI's mask: opaque everywhere, fully transparent where the edit goes."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


# --- generations ----------------------------------------------------------------------------


def test_generate_b64_json_is_an_ordinary_generation_with_the_seed_from_extra_body(live_server):
    result = client_for(live_server).images.generate(
        prompt="a red fox", size="64x64", extra_body={"seed": 1234, "negative_prompt": "fog", "guidance_scale": 6.5}
    )
    assert len(result.data) == 1 and result.data[0].url is None
    image = decoded(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert (result.size, result.output_format, result.quality) == ("64x64", "png", "medium")
    row = Generation.objects.get()
    assert (row.kind, row.status, row.model_id, row.seed) == ("txt2img", "succeeded", settings.DEFAULT_MODEL, 1234)
    assert (row.params["prompt"], row.params["negative_prompt"], row.params["guidance_scale"]) == (
        "a red fox",
        "fog",
        6.5,
    )
    assert result.created == int(row.created_at.timestamp())
    # The very bytes stored for the job, which history lists.
    assert np.array_equal(pixels(image), pixels(stored(row)))
    history = httpx.get(live_server.url + "/api/results/", timeout=TIMEOUT).json()
    assert [g["id"] for g in history["results"]] == [str(row.id)]
    assert history["results"][0]["seed"] == 1234


def test_url_response_is_an_absolute_url_that_serves_the_png(live_server):
    result = client_for(live_server).images.generate(prompt="fox", response_format="url", extra_body={"seed": 5})
    url = result.data[0].url
    assert url.startswith(live_server.url + settings.MEDIA_URL) and result.data[0].b64_json is None
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 200
    image = Image.open(io.BytesIO(r.content))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_n_2_gives_two_images_of_one_job(live_server):
    result = client_for(live_server).images.generate(prompt="fox", n=2, extra_body={"seed": 77})
    assert len(result.data) == 2
    first, second = (pixels(decoded(d.b64_json)) for d in result.data)
    assert first.shape == second.shape == (64, 64, 3) and not np.array_equal(first, second)
    row = Generation.objects.get()
    assert row.params["num_images"] == 2 and row.images.count() == 2


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_format_converts_the_stored_png(live_server, fmt: str, pil: str):
    result = client_for(live_server).images.generate(
        prompt="fox", output_format=fmt, output_compression=80, extra_body={"seed": 3}
    )
    image = decoded(result.data[0].b64_json)
    assert (image.format, image.size, result.output_format) == (pil, (64, 64), fmt)
    # Lossy, but the same picture as the stored PNG.
    assert np.abs(pixels(image) - pixels(stored(Generation.objects.get()))).mean() < 25


def test_output_compression_changes_the_jpeg(live_server):
    client = client_for(live_server)
    low = client.images.generate(prompt="fox", output_format="jpeg", output_compression=5, extra_body={"seed": 9})
    high = client.images.generate(prompt="fox", output_format="jpeg", output_compression=95, extra_body={"seed": 9})
    assert len(base64.b64decode(low.data[0].b64_json)) < len(base64.b64decode(high.data[0].b64_json))


@pytest.mark.parametrize(
    ("quality", "steps", "label"),
    [("low", 2, "low"), ("medium", 4, "medium"), ("standard", 4, "medium"), ("high", 6, "high"), ("hd", 6, "high")],
)
def test_quality_maps_onto_steps_of_the_model_default(live_server, quality: str, steps: int, label: str):
    # tiny-sd's default_steps is 4: low = 0.5x, medium/standard = 1x, high/hd = 1.5x.
    result = client_for(live_server).images.generate(prompt="fox", quality=quality)
    assert Generation.objects.get().params["steps"] == steps
    assert result.quality == label


def test_explicit_steps_win_over_quality(live_server):
    client_for(live_server).images.generate(prompt="fox", quality="high", extra_body={"steps": 3})
    assert Generation.objects.get().params["steps"] == 3


def test_size_auto_is_the_model_default_and_wxh_sets_both(live_server):
    client = client_for(live_server)
    auto = client.images.generate(prompt="fox", size="auto")
    assert decoded(auto.data[0].b64_json).size == (64, 64) and auto.size == "64x64"
    wide = client.images.generate(prompt="fox", size="96x64")
    assert decoded(wide.data[0].b64_json).size == (96, 64) and wide.size == "96x64"


def test_alias_maps_to_its_target_and_catalogue_ids_are_used_as_they_are(live_server):
    client = client_for(live_server)
    dall_e = client.images.generate(prompt="fox", model="dall-e-3")
    own = client.images.generate(prompt="fox", model="tiny-sdxl")
    rows = Generation.objects.order_by("created_at")
    assert settings.OPENAI_MODEL_ALIASES["dall-e-3"] == settings.DEFAULT_MODEL
    assert [r.model_id for r in rows] == [settings.DEFAULT_MODEL, "tiny-sdxl"]
    # As OpenAI answers them: a dall-e model with a URL by default (its quickstart reads
    # data[0].url), any other with base64.
    assert dall_e.data[0].b64_json is None and own.data[0].url is None
    linked = httpx.get(dall_e.data[0].url, timeout=TIMEOUT)
    assert linked.status_code == 200 and Image.open(io.BytesIO(linked.content)).size == (64, 64)
    assert decoded(own.data[0].b64_json).size == (64, 64)
    asked = client.images.generate(prompt="fox", model="dall-e-2", response_format="b64_json")
    assert asked.data[0].url is None and decoded(asked.data[0].b64_json).size == (64, 64)


def test_unknown_model_is_refused_listing_the_valid_ids(live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live_server).images.generate(prompt="fox", model="../../etc/passwd")
    err = error_of(caught.value)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
    for model_id in ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint", "dall-e-3"):
        assert model_id in err["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert Generation.objects.count() == 0


def test_transparent_background_is_refused_and_opaque_is_fine(live_server):
    client = client_for(live_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="fox", background="transparent")
    assert error_of(caught.value)["param"] == "background"
    assert "transparent" in error_of(caught.value)["message"]
    assert Generation.objects.count() == 0
    assert client.images.generate(prompt="fox", background="opaque").background == "opaque"


@pytest.mark.parametrize("size", ["64x", "abc", "63x64", "64x56x8", "2056x64", "56x64"])
def test_bad_size_is_refused_naming_size(live_server, size: str):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live_server).images.generate(prompt="fox", size=size)
    err = error_of(caught.value)
    assert err["param"] == "size" and repr(size) in err["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert Generation.objects.count() == 0


def test_size_limits_below_at_and_above(live_server, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_SIZE": 128}
    client = client_for(live_server)
    assert decoded(client.images.generate(prompt="fox", size="128x64").data[0].b64_json).size == (128, 64)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="fox", size="136x64")
    assert error_of(caught.value)["param"] == "size"
    assert "between 64 and 128, got 136" in error_of(caught.value)["message"]
    assert Generation.objects.count() == 1


def test_n_limits_below_at_and_above(live_server, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_NUM_IMAGES": 3}
    client = client_for(live_server)
    for n in (0, 4):
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="fox", n=n)
        err = error_of(caught.value)
        assert err["param"] == "n" and err["message"] == f"n must be between 1 and 3, got {n}"
    assert Generation.objects.count() == 0
    assert len(client.images.generate(prompt="fox", n=3).data) == 3


def test_unknown_parameter_is_refused_by_name_and_ignored_ones_are_accepted(live_server):
    client = client_for(live_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="fox", extra_body={"cfg_scale": 7})
    err = error_of(caught.value)
    assert (err["param"], err["code"]) == ("cfg_scale", "unknown_parameter")
    assert Generation.objects.count() == 0
    client.images.generate(prompt="fox", style="vivid", moderation="low", user="u-1")
    assert Generation.objects.count() == 1


def test_native_refusal_names_the_extra_body_field(live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live_server).images.generate(prompt="fox", extra_body={"scheduler": "nope"})
    err = error_of(caught.value)
    assert err["param"] == "scheduler" and "euler_a" in err["message"]
    assert Generation.objects.count() == 0


def test_open_webui_request_replayed_over_plain_http(live_server):
    """Open WebUI's OpenAI engine, unconfigured: model dall-e-2, b64_json, its own image size."""
    r = httpx.post(
        live_server.url + "/v1/images/generations",
        json={
            "model": "dall-e-2",
            "prompt": "a red fox in snow",
            "n": 1,
            "size": "64x64",
            "response_format": "b64_json",
        },
        headers={"Authorization": "Bearer sk-openwebui", "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200
    assert decoded(r.json()["data"][0]["b64_json"]).size == (64, 64)
    assert Generation.objects.get().model_id == settings.OPENAI_MODEL_ALIASES["dall-e-2"]


def test_open_webui_edit_replayed_over_plain_http(live_server):
    """Its chat edit: empty model, image[] with a uuid filename, response_format b64_json."""
    r = httpx.post(
        live_server.url + "/v1/images/edits",
        data={"model": "", "prompt": "make it night", "response_format": "b64_json"},
        files=[("image[]", ("3f2ce1.png", gradient_png(), "image/png"))],
        headers={"Authorization": "Bearer sk-openwebui"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert decoded(r.json()["data"][0]["b64_json"]).size == (64, 64)
    row = Generation.objects.get()
    assert (row.kind, row.model_id) == ("img2img", settings.DEFAULT_MODEL)


def test_trailing_slash_unknown_path_and_method_answer_in_openai_shape(live_server):
    r = httpx.post(
        live_server.url + "/v1/images/generations/", json={"prompt": "fox", "size": "64x64"}, timeout=TIMEOUT
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = httpx.get(live_server.url + "/v1/nothing/here", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):
        client_for(live_server).models.retrieve("no-such-model")
    r = httpx.get(live_server.url + "/v1/images/generations", timeout=TIMEOUT)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # SillyTavern's ping of an OpenAI-style server.
    assert httpx.options(live_server.url + "/v1/images/generations", timeout=TIMEOUT).status_code == 200


# --- edits and variations -------------------------------------------------------------------


def test_edit_with_alpha_mask_is_an_inpaint_that_keeps_the_opaque_area(live_server):
    result = client_for(live_server).images.edit(
        image=("in.png", gradient_png(), "image/png"),
        mask=("mask.png", alpha_mask_png(), "image/png"),
        prompt="a hole",
        extra_body={"seed": 11},
    )
    row = Generation.objects.get()
    assert (row.kind, row.status, row.params["strength"]) == ("inpaint", "succeeded", 1.0)
    out = pixels(decoded(result.data[0].b64_json))
    src = pixels(Image.open(io.BytesIO(gradient_png())))
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False  # the square plus the mask blur
    assert np.abs(out - src)[outside].max() <= 3
    assert np.abs(out - src)[20:44, 20:44].mean() > 10  # the transparent square was repainted


def test_mask_without_alpha_is_refused_naming_mask(live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live_server).images.edit(image=gradient_png(), mask=png_of((255, 255, 255)), prompt="x")
    err = error_of(caught.value)
    assert err["param"] == "mask" and "alpha" in err["message"]
    assert Generation.objects.count() == 0


def test_edit_without_mask_is_img2img_at_the_default_strength_and_strength_from_extra_body(live_server):
    client = client_for(live_server)
    client.images.edit(image=gradient_png(), prompt="night", extra_body={"seed": 4})
    client.images.edit(image=gradient_png(), prompt="night", extra_body={"seed": 4, "strength": 0.5})
    rows = Generation.objects.order_by("created_at")
    assert [(r.kind, r.params["strength"]) for r in rows] == [("img2img", 0.75), ("img2img", 0.5)]


def test_edit_size_auto_keeps_the_input_aspect_at_the_model_size(live_server, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MIN_SIZE": 32}
    tall = io.BytesIO()
    Image.new("RGB", (128, 256), (10, 120, 200)).save(tall, format="PNG")
    result = client_for(live_server).images.edit(image=tall.getvalue(), prompt="x")
    assert decoded(result.data[0].b64_json).size == (32, 64) and result.size == "32x64"
    with_size = client_for(live_server).images.edit(image=tall.getvalue(), prompt="x", size="64x64")
    assert decoded(with_size.data[0].b64_json).size == (64, 64)


def test_several_images_use_the_first(live_server):
    client = client_for(live_server)
    other = png_of((10, 200, 40))
    single = client.images.edit(image=gradient_png(), prompt="x", extra_body={"seed": 8})
    listed = client.images.edit(image=[gradient_png(), other], prompt="x", extra_body={"seed": 8})
    swapped = client.images.edit(image=[other, gradient_png()], prompt="x", extra_body={"seed": 8})
    a, b, c = (pixels(decoded(r.data[0].b64_json)) for r in (single, listed, swapped))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_variation_is_img2img_with_the_neutral_prompt(live_server):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = client_for(live_server).images.create_variation(image=gradient_png(), n=2, extra_body={"seed": 2})
    assert len(result.data) == 2 and decoded(result.data[0].b64_json).size == (64, 64)
    row = Generation.objects.get()
    assert (row.kind, row.params["prompt"], row.params["strength"]) == ("img2img", VARIATION_PROMPT, 0.6)


# --- models -----------------------------------------------------------------------------------


def test_models_list_has_the_catalogue_and_the_aliases(live_server):
    client = client_for(live_server)
    ids = [m.id for m in client.models.list()]
    assert {"tiny-sd", "tiny-sdxl", "tiny-sd-inpaint"} <= set(ids)
    assert set(settings.OPENAI_MODEL_ALIASES) <= set(ids)
    model = client.models.retrieve("dall-e-3")
    assert (model.id, model.object) == ("dall-e-3", "model")
    assert model.model_extra["alias_of"] == settings.DEFAULT_MODEL


# --- streaming --------------------------------------------------------------------------------


@pytest.fixture
def previews_every_step(monkeypatch) -> None:  # noqa: ANN001
    from backend.manager import get_manager

    manager = get_manager()
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, preview_interval_s=0.0))


@pytest.mark.usefixtures("previews_every_step")
def test_stream_sends_partial_images_then_the_completed_image(live_server):
    stream = client_for(live_server).images.generate(
        prompt="fox", stream=True, partial_images=2, output_format="webp", extra_body={"steps": 60, "seed": 21}
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    image = decoded(final.b64_json)
    assert (image.format, image.size) == ("WEBP", (64, 64))
    assert (final.size, final.output_format, final.background) == ("64x64", "webp", "opaque")
    assert final.usage.total_tokens == 0 and final.created_at > 0
    assert decoded(events[0].b64_json).size == (64, 64)
    row = Generation.objects.get()
    assert (row.status, row.seed, row.params["steps"]) == ("succeeded", 21, 60)


def test_edit_stream_uses_image_edit_events(live_server):
    stream = client_for(live_server).images.edit(image=gradient_png(), prompt="x", stream=True, n=2)
    types = [e.type for e in stream]
    assert types == ["image_edit.completed", "image_edit.completed"]


@pytest.mark.usefixtures("previews_every_step")
def test_a_job_stopped_mid_stream_ends_it_with_an_error_event(live_server):
    stream = client_for(live_server).images.generate(
        prompt="fox", stream=True, partial_images=3, extra_body={"steps": 150}
    )
    events = iter(stream)
    assert next(events).type == "image_generation.partial_image"
    row = Generation.objects.get()
    assert httpx.post(f"{live_server.url}/api/results/{row.id}/cancel/", timeout=TIMEOUT).status_code == 200
    with pytest.raises(openai.APIError) as caught:
        list(events)
    assert "cancelled" in caught.value.message
    assert caught.value.body["code"] == "cancelled"


@pytest.mark.usefixtures("previews_every_step")
def test_client_hanging_up_mid_stream_cancels_the_job(live_server):
    body = {"prompt": "fox", "stream": True, "partial_images": 3, "steps": 150, "size": "64x64"}
    with httpx.stream("POST", live_server.url + "/v1/images/generations", json=body, timeout=TIMEOUT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        for line in r.iter_lines():
            if line.startswith("data:") and "partial_image" in line:
                break
    from tests.api.test_async_progress_cancel import wait_for

    row = wait_for("the job to stop", lambda: Generation.objects.filter(status="cancelled").first(), timeout=120)
    assert row.progress is None or row.progress["step"] < 150


# --- auth ---------------------------------------------------------------------------------------


def test_with_auth_on_a_key_is_needed_and_owns_the_generation(live_server, settings):
    settings.AUTH_REQUIRED = True
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(live_server, api_key="not-a-key").images.generate(prompt="fox")
    assert error_of(caught.value)["type"] == "invalid_request_error"
    r = httpx.post(live_server.url + "/v1/images/generations", json={"prompt": "fox"}, timeout=TIMEOUT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert Generation.objects.count() == 0
    key, secret = api_key_create(name="openai-user")
    result = client_for(live_server, api_key=secret).images.generate(prompt="fox")
    assert decoded(result.data[0].b64_json).size == (64, 64)
    assert Generation.objects.get().owner_id == key.pk


def test_rate_limit_is_429_with_retry_after(live_server, settings):
    from django.core.cache import cache

    cache.clear()
    settings.RATE_LIMITS = {**settings.RATE_LIMITS, "generate": "1/minute"}
    client = client_for(live_server)
    client.images.generate(prompt="fox")
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(prompt="fox")
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert error_of(caught.value)["code"] == "rate_limit_exceeded"
    assert Generation.objects.count() == 1
    cache.clear()


def test_missing_prompt_and_malformed_json_are_400_in_openai_shape(live_server):
    url = live_server.url + "/v1/images/generations"
    r = httpx.post(url, json={"size": "64x64"}, timeout=TIMEOUT)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Missing required parameter: 'prompt'.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "missing_required_parameter",
    }
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false"
    r = httpx.post(url, json={"prompt": "fox", "n": "two"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert Generation.objects.count() == 0
