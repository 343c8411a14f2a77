"""A1111's /sdapi/v1/ driven by the real ``webuiapi`` client and plain HTTP over a live server."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import webuiapi
from PIL import Image, ImageChops

from api.auth import api_key_create
from api.models import Generation, Status

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")

FAST = {"width": 64, "height": 64, "steps": 3}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def basic(key: str, user: str = "user") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def decode(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    img.load()
    return img


def fast_previews(monkeypatch) -> None:  # noqa: ANN001
    from backend.manager import get_manager

    manager = get_manager()
    # A small positive interval: a preview after (nearly) every step.
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, preview_interval_s=0.01))


def solid(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), color)


@pytest.fixture
def client(live_server) -> webuiapi.WebUIApi:  # noqa: ANN001
    return webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")


# --- webuiapi ---------------------------------------------------------------------------------


def test_webuiapi_txt2img_batch_seeds_info_and_png_chunk(client):
    result = client.txt2img(
        prompt="a red fox",
        negative_prompt="blurry",
        seed=1234,
        cfg_scale=6.5,
        sampler_name="Euler a",
        batch_size=2,
        **FAST,
    )
    assert [img.size for img in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["steps"] == 3
    assert (info["width"], info["height"], info["batch_size"], info["index_of_first_image"]) == (64, 64, 2, 0)
    assert info["sd_model_name"] == "tiny-sd" and len(info["sd_model_hash"]) == 10
    assert info["all_prompts"] == ["a red fox"] * 2 and info["all_negative_prompts"] == ["blurry"] * 2
    assert info["infotexts"][1] == (
        "a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, "
        f"Seed: 1235, Size: 64x64, Model hash: {info['sd_model_hash']}, Model: tiny-sd"
    )
    # The PNG's own text chunk is the same infotext, byte for byte.
    for image, text in zip(result.json["images"], info["infotexts"], strict=True):
        assert decode(image).text["parameters"] == text
    assert result.parameters["sampler_name"] == "Euler a" and result.parameters["batch_size"] == 2
    row = Generation.objects.get(pk=info["generation_id"])
    assert (row.status, row.params["scheduler"], row.params["num_images"], row.owner) == (
        Status.SUCCEEDED,
        "euler_a",
        2,
        None,
    )


def test_webuiapi_img2img_and_inpaint_keeps_pixels_outside_the_mask(client):
    source = solid((200, 30, 30))
    out = client.img2img(images=[source], prompt="a blue fox", seed=5, denoising_strength=0.5, **FAST)
    assert [img.size for img in out.images] == [(64, 64)]
    assert out.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in out.info["infotexts"][0]
    assert out.parameters["init_images"] is None  # A1111 leaves inputs out of the echo
    assert Generation.objects.get(pk=out.info["generation_id"]).kind == "img2img"

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half, keep the right
    painted = client.img2img(
        images=[source], mask_image=mask, mask_blur=0, prompt="a blue fox", seed=5, denoising_strength=1.0, **FAST
    )
    result = painted.images[0].convert("RGB")
    kept = ImageChops.difference(result.crop((32, 0, 64, 64)), source.crop((32, 0, 64, 64)))
    assert max(hi for _, hi in kept.getextrema()) <= 2
    repainted = ImageChops.difference(result.crop((0, 0, 32, 64)), source.crop((0, 0, 32, 64)))
    assert max(hi for _, hi in repainted.getextrema()) > 30
    row = Generation.objects.get(pk=painted.info["generation_id"])
    assert row.kind == "inpaint" and row.params["mask_blur"] == 0

    # inpainting_mask_invert=1: the same mask now marks what to keep.
    inverted = client.img2img(
        images=[source],
        mask_image=mask,
        mask_blur=0,
        inpainting_mask_invert=1,
        prompt="a blue fox",
        seed=5,
        denoising_strength=1.0,
        **FAST,
    ).images[0]
    kept_left = ImageChops.difference(inverted.convert("RGB").crop((0, 0, 32, 64)), source.crop((0, 0, 32, 64)))
    assert max(hi for _, hi in kept_left.getextrema()) <= 2


def test_webuiapi_models_options_and_listings(client):
    titles = client.util_get_model_names()
    assert {m["model_name"] for m in client.get_sd_models()} >= {"tiny-sd", "tiny-sdxl"}
    for model in client.get_sd_models():
        assert model["title"] == f"{model['model_name']} [{model['hash']}]"
        assert model["sha256"].startswith(model["hash"]) and "/" not in model["filename"]
    assert client.util_get_current_model().startswith("tiny-sd [")
    sdxl = next(t for t in titles if t.startswith("tiny-sdxl"))
    client.util_set_model(sdxl)
    assert client.util_get_current_model() == sdxl
    # The chosen checkpoint is the default of the next generation.
    out = client.txt2img(prompt="a fox", seed=1, **FAST)
    assert out.info["sd_model_name"] == "tiny-sdxl"
    assert Generation.objects.get(pk=out.info["generation_id"]).model_id == "tiny-sdxl"
    # override_settings wins for one request.
    over = client.txt2img(prompt="a fox", seed=1, override_settings={"sd_model_checkpoint": "tiny-sd"}, **FAST)
    assert over.info["sd_model_name"] == "tiny-sd"

    samplers = client.util_get_sampler_names()
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "UniPC", "PLMS"} <= set(samplers)
    assert {"automatic", "karras", "normal"} <= set(client.util_get_scheduler_names())
    assert client.get_upscalers()[0]["name"] == "None"
    assert [m["name"] for m in client.get_latent_upscale_modes()][0] == "Latent"
    assert client.get_sd_vae() == [] and client.get_loras() == [] and client.get_hypernetworks() == []
    assert client.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert client.get_scripts() == {"txt2img": [], "img2img": []}
    assert set(client.get_memory()) == {"ram", "cuda"}
    assert client.get_cmd_flags()["api"] is True
    idle = client.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert client.interrupt() == {} and client.skip() is None
    assert client.refresh_checkpoints() is None


def test_webuiapi_with_auth_required_owns_the_generation(live_server, settings):  # noqa: ANN001
    settings.AUTH_REQUIRED = True
    key_row, key = api_key_create(name="a1111")
    anonymous = requests.get(f"{live_server.url}/sdapi/v1/options", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "HTTPException" and set(anonymous.json()) == {
        "error",
        "detail",
        "body",
        "errors",
    }
    assert (
        requests.get(f"{live_server.url}/sdapi/v1/options", headers=basic("sdk_wrong"), timeout=30).status_code == 401
    )
    assert requests.get(f"{live_server.url}/internal/ping", timeout=30).json() == {}

    client = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1", username="any-user", password=key)
    out = client.txt2img(prompt="a fox", seed=3, **FAST)
    assert len(out.images) == 1
    assert Generation.objects.get(pk=out.info["generation_id"]).owner_id == key_row.pk
    assert client.get_progress()["state"]["job_count"] == 0


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"width": 63}, "width"),
        ({"height": 2056}, "height"),
        ({"cfg_scale": "x"}, "cfg_scale"),
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"sampler_name": "nope"}, "sampler_name"),
        ({"scheduler": "sideways"}, "scheduler"),
        ({"batch_size": 100}, "batch_size"),
        ({"batch_size": 3, "n_iter": 3}, "n_iter"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": 2**40}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint"),
    ],
)
def test_txt2img_bad_value_names_the_a1111_field_and_creates_nothing(live_server, change, field):  # noqa: ANN001
    body = {"prompt": "a fox", "seed": 1, **FAST, **change}
    r = requests.post(f"{live_server.url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in item["loc"] for item in detail), detail
    assert any(field in item["msg"] for item in detail), detail
    assert all(item["loc"][0] == "body" and item["type"] == "value_error" for item in detail)
    assert Generation.objects.count() == 0


def test_limits_below_at_and_above(live_server):  # noqa: ANN001
    url = f"{live_server.url}/sdapi/v1/txt2img"
    for batch, expected in ((8, 200), (9, 422)):
        r = requests.post(
            url, json={"prompt": "fox", "batch_size": batch, "steps": 1, "width": 64, "height": 64}, timeout=60
        )
        assert r.status_code == expected, r.text
    assert Generation.objects.count() == 1
    assert len(r.json()["detail"]) == 2 and "batch_size x n_iter must be at most 8, got 9 x 1 = 9" in r.text
    r = requests.post(url, json={"prompt": "fox", "steps": 151, **{k: 64 for k in ("width", "height")}}, timeout=30)
    assert r.status_code == 422 and "steps must be between 1 and 150, got 151" in r.json()["detail"][0]["msg"]
    assert Generation.objects.count() == 1


def test_img2img_bad_inputs(live_server):  # noqa: ANN001
    url = f"{live_server.url}/sdapi/v1/img2img"
    good = base64.b64encode(decode_png(solid((1, 2, 3)))).decode()
    cases = [
        ({"init_images": ["not base64"]}, "init_images"),
        ({"init_images": []}, "init_images"),
        ({"init_images": [good], "denoising_strength": 1.5}, "denoising_strength"),
        ({"init_images": [good], "mask": "garbage"}, "mask"),
        ({"init_images": [good], "mask": good, "mask_blur": 65}, "mask_blur"),
        ({"init_images": [good], "mask": good, "inpainting_mask_invert": 2}, "inpainting_mask_invert"),
    ]
    for change, field in cases:
        r = requests.post(url, json={"prompt": "fox", **FAST, **change}, timeout=30)
        assert r.status_code == 422, (change, r.text)
        assert [item["loc"] for item in r.json()["detail"]] == [["body", field]], r.text
    assert Generation.objects.count() == 0
    # Not JSON, and the wrong method: FastAPI's shapes.
    r = requests.post(url, data="notjson", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"
    assert requests.get(url, timeout=30).json() == {"detail": "Method Not Allowed"}
    assert requests.get(f"{live_server.url}/sdapi/v1/no-such-thing", timeout=30).json() == {"detail": "Not Found"}


def decode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_options_post_refuses_an_unknown_checkpoint(live_server):  # noqa: ANN001
    url = f"{live_server.url}/sdapi/v1/options"
    r = requests.post(url, json={"sd_model_checkpoint": "nope"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert "tiny-sd [" in r.json()["detail"][0]["msg"]
    assert requests.get(url, timeout=30).json()["sd_model_checkpoint"].startswith("tiny-sd [")


# --- per key: checkpoint, progress, interrupt -----------------------------------------------


def test_per_key_checkpoint_progress_and_interrupt(live_server, monkeypatch):  # noqa: ANN001
    fast_previews(monkeypatch)
    base = f"{live_server.url}/sdapi/v1"
    row_a, key_a = api_key_create(name="a")
    _, key_b = api_key_create(name="b")
    a, b = basic(key_a), basic(key_b)

    options_b = requests.get(f"{base}/options", headers=b, timeout=30).json()
    sdxl = next(
        m["title"] for m in requests.get(f"{base}/sd-models", timeout=30).json() if m["model_name"] == "tiny-sdxl"
    )
    assert requests.post(f"{base}/options", json={"sd_model_checkpoint": sdxl}, headers=a, timeout=30).json() is None
    assert requests.get(f"{base}/options", headers=a, timeout=30).json()["sd_model_checkpoint"] == sdxl
    assert requests.get(f"{base}/options", headers=b, timeout=30).json() == options_b
    assert requests.get(f"{base}/options", timeout=30).json() == options_b  # anonymous: the default

    answer: dict[str, Any] = {}

    def slow() -> None:
        body = {"prompt": "slow", "seed": 9, "width": 64, "height": 64, "steps": 150}
        body["override_settings"] = {"sd_model_checkpoint": "tiny-sd"}
        answer["r"] = requests.post(f"{base}/txt2img", json=body, headers=a, timeout=120)

    thread = threading.Thread(target=slow)
    thread.start()
    try:

        def a_running() -> dict[str, Any] | None:
            p = requests.get(f"{base}/progress", headers=a, timeout=30).json()
            return p if p["state"]["sampling_step"] >= 1 and p["current_image"] else None

        progress = wait_for("key A's job to report progress", a_running)
        assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 1
        assert progress["state"]["sampling_steps"] == 150 and progress["eta_relative"] >= 0
        assert decode(progress["current_image"]).size[0] >= 1
        skipped = requests.get(f"{base}/progress?skip_current_image=true", headers=a, timeout=30).json()
        assert skipped["current_image"] is None and skipped["state"]["job_count"] == 1

        # Key B sees an idle server and can't stop A's job.
        idle = requests.get(f"{base}/progress", headers=b, timeout=30).json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        assert requests.post(f"{base}/interrupt", headers=b, timeout=30).json() == {}
        assert requests.post(f"{base}/interrupt", timeout=30).json() == {}  # anonymous neither
        job = Generation.objects.get(owner=row_a)
        assert job.status == Status.RUNNING and not job.cancel_requested

        assert requests.post(f"{base}/interrupt", headers=a, timeout=30).json() == {}
    finally:
        thread.join(120)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and info["sd_model_name"] == "tiny-sd"
    assert Generation.objects.get(owner=row_a).status == Status.CANCELLED
    after = requests.get(f"{base}/progress", headers=a, timeout=30).json()
    assert after["progress"] == 0 and after["state"]["job_count"] == 0


def test_an_infotext_sampler_and_sdcpp_names_are_accepted_back(live_server):
    """Every sampler this server writes into a PNG's parameters is one it accepts again, and
    SillyTavern's stable-diffusion.cpp names (euler_a, dpm++2m; schedules discrete, ays) map."""
    from api.images import INFOTEXT_SAMPLERS
    from protocols.a1111.protocol import sampler_find, schedule_find

    for native, (name, schedule) in INFOTEXT_SAMPLERS.items():
        found = sampler_find(name)
        assert found is not None, name
        assert found.native == native or (schedule == "Karras" and found.karras == native), (native, name)
    assert sampler_find("euler_a").native == "euler_a" and sampler_find("dpm++2m").native == "dpmpp_2m"
    assert schedule_find("discrete").name == "automatic" and schedule_find("ays").name == "align_your_steps"
    r = requests.post(
        f"{live_server.url}/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "DPM++ 2S", "scheduler": "ays"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert Generation.objects.get().params["scheduler"] == "dpmpp_2s"


def test_png_info_reads_back_what_a_generation_wrote(live_server, client):  # noqa: ANN001
    api = client
    result = api.txt2img(
        prompt="a fox, in snow",
        negative_prompt="blurry",
        seed=77,
        steps=3,
        width=64,
        height=64,
        cfg_scale=6,
        sampler_name="Euler a",
    )
    info = api.png_info(result.image)
    params = info.parameters
    assert info.info == result.info["infotexts"][0]
    assert (params["Prompt"], params["Negative prompt"]) == ("a fox, in snow", "blurry")
    assert (params["Seed"], params["Steps"], params["Sampler"], params["CFG scale"]) == ("77", "3", "Euler a", "6.0")
    assert (params["Size-1"], params["Size-2"], params["Model"]) == ("64", "64", "tiny-sd")
    # A quoted value (a comma inside) comes back unquoted.
    from protocols.a1111.pnginfo import parse_infotext

    assert parse_infotext('p\nSteps: 2, Sampler: Euler, Model: "a, b"')["Model"] == "a, b"
    # An image with no parameters: empty info, as A1111 answers; a non-image: 422 naming image.
    plain = requests.post(
        f"{live_server.url}/sdapi/v1/png-info",
        json={"image": base64.b64encode(decode_png(solid((9, 9, 9)))).decode()},
        timeout=60,
    )
    assert plain.status_code == 200 and plain.json() == {"info": "", "items": {}, "parameters": {}}
    bad = requests.post(f"{live_server.url}/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"}, timeout=60)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image"]


def test_old_sampler_names_that_carry_a_schedule_type_run(live_server):  # noqa: ANN001
    """Before A1111 1.9 the schedule was part of the sampler's name ("DPM++ SDE Karras"); A1111
    strips a trailing schedule type off the name, and so does this server."""
    client = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")
    expected = {
        "DPM++ 2M Karras": "dpmpp_2m_karras",  # a name of its own
        "DPM++ 2M  karras": "dpmpp_2m_karras",
        "DPM++ SDE Karras": "dpmpp_2s",
        "Euler a Karras": "euler_a",
        "LMS Karras": "lms",
        "DPM++ 2M Exponential": "dpmpp_2m",
        "Euler SGM Uniform": "euler",
    }
    for name, native in expected.items():
        out = client.txt2img(prompt="a fox", sampler_name=name, seed=1, **FAST)
        assert len(out.images) == 1, name
        assert Generation.objects.get(pk=out.info["generation_id"]).params["scheduler"] == native, name
    # The name's schedule wins over the field, as in A1111.
    out = client.txt2img(prompt="a fox", sampler_name="DPM++ 2M Karras", scheduler="normal", seed=1, **FAST)
    assert Generation.objects.get(pk=out.info["generation_id"]).params["scheduler"] == "dpmpp_2m_karras"
    r = requests.post(
        f"{live_server.url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope Karras", **FAST}, timeout=30
    )
    assert r.status_code == 422 and "sampler_name" in r.text and "Nope Karras" in r.text


def test_a_size_that_is_not_a_multiple_of_8_is_rounded_down_as_a1111_does(live_server):  # noqa: ANN001
    client = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")
    out = client.txt2img(prompt="a fox", width=70, height=93, steps=2, seed=1)
    assert out.images[0].size == (64, 88)
    assert (out.info["width"], out.info["height"]) == (64, 88)
    assert (out.parameters["width"], out.parameters["height"]) == (70, 93)  # the request, as sent
    # Below the minimum even after rounding: refused, naming the field, the limit and the value.
    r = requests.post(f"{live_server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 7, "steps": 2}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]
    assert "got 7" in r.json()["detail"][0]["msg"] and "multiple of 8 between" in r.json()["detail"][0]["msg"]
