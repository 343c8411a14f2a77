"""SillyTavern's Stable Diffusion extension (source "auto"), replayed against a live server.

Its Node server replaces the URL's path with ``/sdapi/v1/...``, sends
``Authorization: Basic <b64 of auth>`` (``Basic `` by default) and forwards the browser's
whole generate body, ``url`` and ``auth`` included.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import pytest
import requests
from PIL import Image

from api.auth import api_key_create
from api.models import Generation, Status
from tests.protocols.test_a1111 import fast_previews, wait_for

pytestmark = pytest.mark.usefixtures("live_db", "tiny_model_dirs")


class SillyTavern:
    def __init__(self, url: str, auth: str = "") -> None:
        self.url, self.auth = url, auth
        self.headers = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}/sdapi/v1/{path}", headers=self.headers, timeout=30)

    def ping(self) -> bool:
        return self.get("options").ok

    def samplers(self) -> list[str]:
        return [x["name"] for x in self.get("samplers").json()]

    def get_model(self) -> str:
        return self.get("options").json()["sd_model_checkpoint"]

    def models(self) -> list[str]:
        return [x["title"] for x in self.get("sd-models").json()]

    def upscalers(self) -> list[str]:
        upscalers = [x["name"] for x in self.get("upscalers").json()]
        latent = [x["name"] for x in self.get("latent-upscale-modes").json()]
        upscalers[1:1] = latent
        return upscalers

    def schedulers(self) -> list[str]:
        return [x["name"] for x in self.get("schedulers").json()]

    def vaes(self) -> list[str]:
        for path in ("sd-vae", "sd-modules"):  # Promise.allSettled: the first fulfilled array
            r = self.get(path)
            if r.ok and isinstance(r.json(), list):
                return [x["model_name"] for x in r.json()]
        raise AssertionError("no VAE listing")

    def set_model(self, model: str) -> int:
        r = requests.post(
            f"{self.url}/sdapi/v1/options",
            data=f'{{"sd_model_checkpoint": "{model}"}}',
            headers={"Content-Type": "application/json", **self.headers},
            timeout=30,
        )
        assert r.ok, r.text
        for attempt in range(10):
            state = self.get("progress").json()
            if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
                return attempt
            time.sleep(0.2)  # 2 s in SillyTavern
        return 10

    def body(self, prompt: str, **settings: Any) -> dict[str, Any]:
        sd = {"sampler": "DDIM", "scheduler": "normal", "steps": 2, "scale": 7, "width": 64, "height": 64, "seed": -1}
        sd.update(settings)
        payload: dict[str, Any] = {
            "url": self.url,
            "auth": self.auth,
            "prompt": "best quality, absurdres, aesthetic, " + prompt,
            "negative_prompt": "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality",
            "sampler_name": sd["sampler"],
            "scheduler": sd["scheduler"],
            "steps": sd["steps"],
            "cfg_scale": sd["scale"],
            "width": sd["width"],
            "height": sd["height"],
            "restore_faces": False,
            "enable_hr": False,
            "hr_upscaler": "Latent",
            "hr_scale": 1,
            "hr_additional_modules": [],
            "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "forge_additional_modules": ["x.safetensors"]},
            "override_settings_restore_afterwards": True,
            "clip_skip": 1,
            "save_images": True,
            "send_images": True,
            "do_not_save_grid": False,
            "do_not_save_samples": False,
            "alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}},
        }
        if sd["seed"] >= 0:
            payload["seed"] = sd["seed"]
        return payload

    def generate(self, payload: dict[str, Any]) -> requests.Response:
        options = self.get("options")
        if options.ok and "forge_preset" not in options.json():
            payload["override_settings"].pop("forge_additional_modules", None)
        return requests.post(
            f"{self.url}/sdapi/v1/txt2img",
            json=payload,
            headers={"Content-Type": "application/json", **self.headers},
            timeout=300,
        )

    def interrupt(self) -> requests.Response:
        # No body and no Content-Type, as node-fetch sends it.
        return requests.post(f"{self.url}/sdapi/v1/interrupt", headers=self.headers, timeout=30)


def test_sillytavern_connect_load_settings_set_model_and_generate(live_server):  # noqa: ANN001
    st = SillyTavern(live_server.url)
    assert st.ping()
    samplers, schedulers = st.samplers(), st.schedulers()
    assert "DDIM" in samplers and "normal" in schedulers
    models = st.models()
    assert st.get_model() in models  # the dropdown shows the current model
    upscalers = st.upscalers()
    assert upscalers[0] == "None" and upscalers[1] == "Latent"
    assert st.vaes() == []

    sdxl = next(t for t in models if t.startswith("tiny-sdxl"))
    assert st.set_model(sdxl) == 0  # idle at once: the first poll ends the loop
    assert st.get_model() == sdxl

    r = st.generate(st.body("a red fox in snow", seed=77))
    assert r.status_code == 200, r.text
    data = r.json()
    with Image.open(io.BytesIO(base64.b64decode(data["images"][0]))) as img:  # saved as .png
        assert img.format == "PNG" and img.size == (64, 64)
    # A1111's fields are echoed as sent; SillyTavern's own url and auth are not (A1111 drops them).
    assert data["parameters"]["prompt"].endswith("a red fox in snow") and data["parameters"]["seed"] == 77
    assert "url" not in data["parameters"] and "auth" not in data["parameters"]
    row = Generation.objects.get()
    assert (row.model_id, row.seed, row.params["scheduler"], row.params["num_images"]) == ("tiny-sdxl", 77, "ddim", 1)
    assert row.params["prompt"].endswith("a red fox in snow")


def test_sillytavern_stop_interrupts_the_running_job(live_server, monkeypatch):  # noqa: ANN001
    fast_previews(monkeypatch)
    st = SillyTavern(live_server.url)
    answer: dict[str, requests.Response] = {}
    payload = st.body("slow", steps=150, sampler="Euler a", scheduler="karras")
    thread = threading.Thread(target=lambda: answer.setdefault("r", st.generate(payload)))
    thread.start()
    try:
        wait_for("the job to run", lambda: st.get("progress").json()["state"]["sampling_step"] >= 1)
        assert st.interrupt().json() == {}
    finally:
        thread.join(120)
    assert answer["r"].status_code == 200 and answer["r"].json()["images"] == []
    row = Generation.objects.get()
    assert row.status == Status.CANCELLED and row.params["steps"] == 150
    assert row.progress["step"] < 150
    assert st.set_model(st.get_model()) == 0  # and the server is idle again


def test_the_api_key_sillytavern_sends_in_its_body_never_comes_back(live_server, settings):  # noqa: ANN001
    """With a key required, SillyTavern's ``auth`` (user:key) is both its Basic header and a field
    of the body it forwards; the answer's ``parameters`` must not hand the key back."""
    settings.AUTH_REQUIRED = True
    key_row, key = api_key_create(name="st")
    st = SillyTavern(live_server.url, auth=f"user:{key}")
    r = st.generate(st.body("a lighthouse", seed=5))
    assert r.status_code == 200, r.text
    assert key not in r.text and "auth" not in r.json()["parameters"]
    assert Generation.objects.get().owner_id == key_row.pk
