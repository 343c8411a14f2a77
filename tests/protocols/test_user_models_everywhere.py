"""LoRAs and embeddings reach every protocol: A1111's <lora:> tags and listings, OpenAI's
extra_body, and the HF task's parameters, each giving the same image as the native field."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import requests
import webuiapi
from huggingface_hub import InferenceClient
from PIL import Image

from api.models import Generation
from tests.api.test_user_models import folders  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("live_db", "folders")

BASE = {"prompt": "a red fox", "seed": 9, "steps": 2, "width": 64, "height": 64}


def native(live_server, **fields) -> np.ndarray:  # noqa: ANN001, ANN003
    r = requests.post(
        f"{live_server.url}/api/txt2img/", json=BASE | fields | {"response_format": "b64_json"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return decode(r.json()["images"][0]["b64_json"])


def decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        return np.asarray(img.convert("RGB"))


def test_a1111_lora_tag_listing_and_embeddings(live_server):
    expected = native(live_server, loras=[{"name": "fox", "weight": 0.7}])
    api = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")
    result = api.txt2img(
        prompt="a red fox <lora:fox:0.7>", seed=9, steps=2, width=64, height=64, cfg_scale=7.5, sampler_name="DDIM"
    )
    assert np.array_equal(np.asarray(result.image.convert("RGB")), expected)
    row = Generation.objects.order_by("-created_at").first()
    assert row.params["prompt"] == "a red fox" and row.params["loras"][0]["name"] == "fox"
    loras = requests.get(f"{live_server.url}/sdapi/v1/loras", timeout=30).json()
    assert {item["name"] for item in loras} == {"fox", "ink", "xl-only"}
    assert all(item["path"] == f"{item['name']}.safetensors" for item in loras)
    embeddings = requests.get(f"{live_server.url}/sdapi/v1/embeddings", timeout=30).json()
    assert embeddings["loaded"]["shiny-tok"]["vectors"] == 2 and embeddings["skipped"] == {}


def test_openai_extra_body_loras(live_server):
    expected = native(live_server, loras=[{"name": "ink", "weight": 0.5}])
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="any", max_retries=0, timeout=120)
    result = client.images.generate(
        prompt="a red fox", size="64x64", extra_body={"seed": 9, "steps": 2, "loras": [{"name": "ink", "weight": 0.5}]}
    )
    assert np.array_equal(decode(result.data[0].b64_json), expected)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="x", size="64x64", extra_body={"loras": [{"name": "../fox"}]})
    assert "unknown LoRA '../fox'" in refused.value.message


def test_hf_parameters_loras(live_server):
    expected = native(live_server, loras=[{"name": "fox", "weight": 1.0}])
    client = InferenceClient(base_url=f"{live_server.url}/models/tiny-sd", api_key="any")
    image = client.text_to_image(
        "a red fox",
        seed=9,
        num_inference_steps=2,
        width=64,
        height=64,
        extra_body={"loras": [{"name": "fox", "weight": 1.0}]},
    )
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
