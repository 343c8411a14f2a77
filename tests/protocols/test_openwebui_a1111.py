"""Open WebUI's AUTOMATIC1111 image engine, replayed request for request against a live server.

Open WebUI builds each URL as ``f"{base}/sdapi/v1/..."`` and sends a lowercase
``authorization: Basic <b64 of AUTOMATIC1111_API_AUTH>`` on every call, which is ``Basic ``
(empty credentials) when no auth is configured.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from api.auth import api_key_create
from api.models import Generation, Status

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")


def auth_header(api_auth: str) -> dict[str, str]:
    # Open WebUI's get_automatic1111_api_auth(): base64 of the configured "user:pass" string.
    return {"authorization": f"Basic {base64.b64encode(api_auth.encode()).decode()}"}


class OpenWebUI:
    """The calls of open_webui/routers/images.py for engine "automatic1111", in order."""

    def __init__(self, base: str, api_auth: str = "", size: str = "64x64", steps: int = 2) -> None:
        self.base, self.headers, self.size, self.steps = base, auth_header(api_auth), size, steps

    def models(self) -> list[dict[str, str]]:
        r = requests.get(f"{self.base}/sdapi/v1/sd-models", headers=self.headers, timeout=30)
        return [{"id": m["title"], "name": m["model_name"]} for m in r.json()]

    def get_image_model(self) -> str:
        r = requests.get(f"{self.base}/sdapi/v1/options", headers=self.headers, timeout=30)
        return r.json()["sd_model_checkpoint"]

    def set_image_model(self, model: str) -> None:
        options = requests.get(f"{self.base}/sdapi/v1/options", headers=self.headers, timeout=30).json()
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            r = requests.post(f"{self.base}/sdapi/v1/options", json=options, headers=self.headers, timeout=30)
            r.raise_for_status()

    def generate(self, prompt: str, n: int = 1, negative_prompt: str | None = None) -> tuple[list[bytes], dict]:
        self.get_image_model()
        width, height = (int(x) for x in self.size.split("x"))
        data = {"prompt": prompt, "batch_size": n, "width": width, "height": height, "steps": self.steps}
        if negative_prompt is not None:
            data["negative_prompt"] = negative_prompt
        r = requests.post(f"{self.base}/sdapi/v1/txt2img", json=data, headers=self.headers, timeout=300)
        res = r.json()  # no raise_for_status: Open WebUI reads images and info whatever the status
        images = [base64.b64decode(image) for image in res["images"]]  # raw base64, assumed PNG
        return images, json.loads(res["info"])


def test_open_webui_lists_switches_and_generates(live_server):  # noqa: ANN001
    owui = OpenWebUI(live_server.url)
    models = owui.models()
    ids = {m["id"] for m in models}
    assert {m["name"] for m in models} >= {"tiny-sd", "tiny-sdxl"}
    current = owui.get_image_model()
    assert current in ids  # the admin's dropdown shows the current model

    sdxl = next(m["id"] for m in models if m["name"] == "tiny-sdxl")
    owui.set_image_model(sdxl)  # GET options, POST the whole dict back
    assert owui.get_image_model() == sdxl
    owui.set_image_model("")  # the admin saved settings with no model: survives, nothing changes
    assert owui.get_image_model() == sdxl

    images, info = owui.generate("a red fox in snow", negative_prompt="blurry")
    assert len(images) == 1
    with Image.open(io.BytesIO(images[0])) as img:
        assert img.format == "PNG" and img.size == (64, 64)
        assert img.text["parameters"] == info["infotexts"][0]
    assert info["sd_model_name"] == "tiny-sdxl" and info["negative_prompt"] == "blurry"
    row = Generation.objects.get(pk=info["generation_id"])
    assert (row.status, row.model_id, row.params["steps"], row.params["scheduler"]) == (
        Status.SUCCEEDED,
        "tiny-sdxl",
        2,
        "euler",  # A1111's default sampler when none is sent
    )


def test_open_webui_base_url_with_a_trailing_slash(live_server):  # noqa: ANN001
    owui = OpenWebUI(live_server.url + "/")  # -> //sdapi/v1/...
    assert owui.get_image_model().startswith("tiny-sd [")
    assert {m["name"] for m in owui.models()} >= {"tiny-sd"}


def test_open_webui_basic_auth_with_auth_required(live_server, settings):  # noqa: ANN001
    settings.AUTH_REQUIRED = True
    row, key = api_key_create(name="open-webui")
    unconfigured = OpenWebUI(live_server.url)  # sends "authorization: Basic "
    r = requests.get(f"{live_server.url}/sdapi/v1/options", headers=unconfigured.headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"] == "HTTPException"
    # Open WebUI's verify button: only the status counts.
    wrong = OpenWebUI(live_server.url, api_auth="admin:sdk_not_a_key")
    assert requests.get(f"{live_server.url}/sdapi/v1/options", headers=wrong.headers, timeout=30).status_code == 401
    assert Generation.objects.count() == 0

    owui = OpenWebUI(live_server.url, api_auth=f"admin:{key}")
    images, info = owui.generate("a fox")
    assert len(images) == 1
    assert Generation.objects.get(pk=info["generation_id"]).owner_id == row.pk
