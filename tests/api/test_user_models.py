"""Users' own model files through the REST API: LoRAs (the loras field and <lora:> tags),
textual-inversion embeddings, single-file checkpoints, and what a generation records."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from PIL import Image

from api.models import Generation
from tests.conftest import media_path
from tests.fakes.ldm_layout import write_single_file
from tests.fakes.tiny_adapters import make_tiny_lora
from tests.fakes.tiny_embeddings import make_tiny_embedding

pytestmark = pytest.mark.usefixtures("live_db")


class Pickled:
    """Unpickling this would run code: proof that a .pt file is never opened."""

    def __reduce__(self):  # noqa: ANN204
        return (Path("/tmp/should-never-exist-user-models").touch, ())


@pytest.fixture
def folders(tiny_model_dirs, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """LORA_DIR and EMBEDDINGS_DIR with tiny files, for the web side and the worker alike."""
    from backend.manager import get_manager

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    make_tiny_lora(tiny_model_dirs["tiny-sd"], loras / "fox.safetensors", key_format="diffusers", seed=1)
    make_tiny_lora(tiny_model_dirs["tiny-sd"], loras / "styles" / "ink.safetensors", key_format="kohya", seed=2)
    make_tiny_lora(
        tiny_model_dirs["tiny-sdxl"], loras / "xl-only.safetensors", key_format="kohya", seed=3, text_encoder=True
    )
    make_tiny_embedding(embeddings / "shiny-tok.safetensors", width=32, vectors=2, seed=4)
    (loras / "evil.pt").write_bytes(pickle.dumps(Pickled()))
    manager = get_manager()
    monkeypatch.setattr(
        manager, "config", dataclasses.replace(manager.config, lora_dir=loras, embeddings_dir=embeddings)
    )
    return loras, embeddings


def txt2img(api, **fields):  # noqa: ANN001, ANN003, ANN201
    return api.post("/api/txt2img/", {"prompt": "a red fox", "seed": 9, "steps": 2} | fields, format="json")


def pixels(body: dict) -> np.ndarray:
    with Image.open(media_path(body["images"][0]["url"])) as img:
        return np.asarray(img.convert("RGB"))


def test_loras_are_listed_with_family_size_and_hash_and_never_a_pickle(api, folders):
    loras, _ = folders
    r = api.get("/api/loras/")
    assert r.status_code == 200
    listed = {item["name"]: item for item in r.json()}
    assert set(listed) == {"fox", "ink", "xl-only"}
    assert listed["xl-only"]["family"] == "sdxl" and listed["fox"]["key_format"] == "diffusers"
    assert listed["ink"]["size"] == (loras / "styles" / "ink.safetensors").stat().st_size
    assert "path" not in listed["fox"] and str(loras) not in r.content.decode()
    assert not Path("/tmp/should-never-exist-user-models").exists()


def test_weight_zero_is_the_lora_free_image_and_a_weight_changes_it_and_nothing_leaks(api, folders):
    plain = pixels(txt2img(api).json())
    zero = pixels(txt2img(api, loras=[{"name": "fox", "weight": 0}]).json())
    full = txt2img(api, loras=[{"name": "fox", "weight": 1.0}]).json()
    after = pixels(txt2img(api).json())
    assert np.array_equal(plain, zero)
    assert not np.array_equal(plain, pixels(full))
    assert np.array_equal(plain, after)  # the next request without LoRAs is LoRA-free again
    [record] = full["params"]["loras"]
    assert record["name"] == "fox" and record["weight"] == 1.0 and len(record["sha256"]) == 64


def test_the_tag_equals_the_field_and_is_removed_from_the_prompt(api, folders):
    tagged = txt2img(api, prompt="a red fox <lora:ink:0.8>").json()
    field = txt2img(api, loras=[{"name": "ink", "weight": 0.8}]).json()
    assert tagged["params"]["prompt"] == "a red fox"
    assert np.array_equal(pixels(tagged), pixels(field))
    assert tagged["params"]["loras"] == field["params"]["loras"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"loras": [{"name": "../loras/fox"}]}, "unknown LoRA '../loras/fox'"),
        ({"loras": [{"name": "/etc/passwd"}]}, "unknown LoRA '/etc/passwd'"),
        ({"loras": [{"name": "evil"}]}, "unknown LoRA 'evil'"),
        ({"loras": [{"name": "styles/ink"}]}, "unknown LoRA 'styles/ink'"),
        ({"prompt": "x <lora:nope:1>"}, "unknown LoRA 'nope'; available: fox, ink, xl-only"),
        ({"loras": [{"name": "fox", "weight": 2.5}]}, "must be between -2.0 and 2.0, got 2.5"),
        ({"loras": [{"name": "fox"}] * 6}, "at most 5 LoRAs per request"),
        ({"loras": [{"name": "xl-only"}]}, "is for sdxl models"),
        ({"prompt": "x <lora:fox:abc>"}, "<lora:fox:abc>"),
    ],
)
def test_bad_loras_are_refused_naming_them_and_nothing_is_created(api, folders, fields, words):
    r = txt2img(api, **fields)
    assert r.status_code == 400, r.content
    message = json.dumps(r.json()["error"]["fields"])
    assert words in message
    if "sdxl" in words:
        assert "sd15" in message  # both families named
    assert Generation.objects.count() == 0


def test_at_the_limits_is_accepted(api, folders):
    body = txt2img(api, loras=[{"name": "fox", "weight": -2}, {"name": "ink", "weight": 2}]).json()
    assert body["status"] == "succeeded" and len(body["params"]["loras"]) == 2


def test_an_embedding_is_listed_and_used_by_its_name(api, folders):
    listed = api.get("/api/embeddings/").json()
    assert [(e["name"], e["vectors"]) for e in listed] == [("shiny-tok", 2)]
    plain = txt2img(api, prompt="a red fox").json()
    used = txt2img(api, prompt="a red fox shiny-tok").json()
    negative = txt2img(api, prompt="a red fox", negative_prompt="shiny-tok").json()
    assert not np.array_equal(pixels(plain), pixels(used))
    assert not np.array_equal(pixels(plain), pixels(negative))
    assert [e["name"] for e in used["params"]["embeddings"]] == ["shiny-tok"]


def test_the_record_has_versions_tokens_and_the_model_revision(api):
    body = txt2img(api, prompt="a (red:1.3) fox").json()
    params = body["params"]
    assert params["prompt"] == "a (red:1.3) fox" and params["prompt_tokens"] > 0
    assert {"torch", "diffusers", "compel", "peft"} <= set(params["versions"])
    assert params["model_revision"].startswith("builtin-v")


def test_weighting_changes_the_image_and_weight_one_does_not(api):
    plain = pixels(txt2img(api, prompt="a red fox").json())
    same = pixels(txt2img(api, prompt="a (red:1.0) fox").json())
    weighted = pixels(txt2img(api, prompt="a (red:1.5) fox").json())
    assert np.abs(plain.astype(int) - same.astype(int)).max() <= 1
    assert not np.array_equal(plain, weighted)


@pytest.fixture
def checkpoint(tiny_model_dirs, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A CHECKPOINT_DIR holding tiny-sd as one original-layout file, served by a fresh manager."""
    import huggingface_hub.constants

    from backend.manager import ModelManager

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "checkpoints"
    write_single_file(tiny_model_dirs["tiny-sd"], folder / "My Tiny SD.safetensors")
    (folder / "old.ckpt").write_bytes(pickle.dumps(Pickled()))
    catalog_file = tmp_path / "catalog.json"
    # The tiny architecture isn't SD 1.5's, so the catalogue file points at its configs.
    catalog_file.write_text(json.dumps([{"id": "my-tiny-sd", "config": str(tiny_model_dirs["tiny-sd"])}]))
    previous = ModelManager._instance
    config = dataclasses.replace(
        settings.ENGINE, checkpoint_dir=folder, model_catalog_file=str(catalog_file), local_files_only=True
    )
    ModelManager._instance = ModelManager(config)
    yield folder
    ModelManager._instance.unload_all()
    ModelManager._instance = previous


def test_a_single_file_checkpoint_is_a_model_and_matches_its_diffusers_folder(api, checkpoint):
    models = {m["id"]: m for m in api.get("/api/models/").json()}
    assert models["my-tiny-sd"]["family"] == "sd15" and models["my-tiny-sd"]["source"] == "single_file"
    assert "old" not in models and str(checkpoint) not in json.dumps(models)
    single = txt2img(api, model_id="my-tiny-sd", width=64, height=64).json()
    folder = txt2img(api, model_id="tiny-sd").json()
    assert single["status"] == "succeeded", single
    assert np.array_equal(pixels(single), pixels(folder))
    assert len(single["params"]["model_sha256"]) == 64
    assert not Path("/tmp/should-never-exist-user-models").exists()


def test_prompt_problems_are_refused_before_anything_is_queued(api, folders):
    cases = [
        ({"prompt": "a (red:1.2.3) fox"}, "prompt", "prompt weight must be a number, got '1.2.3'"),
        ({"negative_prompt": "blurry <lora:fox:1>"}, "negative_prompt", "from the prompt only"),
        ({"negative_prompt": "blurry <lora:fox:abc>"}, "negative_prompt", "from the prompt only"),
    ]
    for fields, field, words in cases:
        r = txt2img(api, **fields)
        assert r.status_code == 400, r.content
        assert words in r.json()["error"]["fields"][field][0]
    assert Generation.objects.count() == 0


def test_the_png_and_the_a1111_infotext_carry_the_loras_back(api, folders):
    body = txt2img(api, prompt="a red fox <lora:ink:0.8>").json()
    with Image.open(media_path(body["images"][0]["url"])) as img:
        text = img.info["parameters"]
    first, *_ = text.split("\n")
    assert first == "a red fox <lora:ink:0.8>"
    sha = body["params"]["loras"][0]["sha256"]
    assert f'Lora hashes: "ink: {sha[:12]}"' in text


def test_a_deleted_embedding_stops_applying_and_a_foreign_one_is_text_with_a_warning(api, folders, tmp_path):
    _, embeddings = folders
    plain = pixels(txt2img(api, prompt="a red fox shiny-tok").json())  # the embedding loads and applies
    (embeddings / "shiny-tok.safetensors").unlink()
    gone = txt2img(api, prompt="a red fox shiny-tok").json()
    assert "embeddings" not in gone["params"]
    assert not np.array_equal(plain, pixels(gone))
    # An SDXL-width embedding on an SD model: read as text, and the answer says so.
    make_tiny_embedding(embeddings / "wide-tok.safetensors", width=768, vectors=1)
    body = txt2img(api, prompt="a red fox wide-tok").json()
    assert body["status"] == "succeeded" and "embeddings" not in body["params"]
    assert any("wide-tok" in w and "read as text" in w for w in body["warnings"])


def test_a_checkpoint_dropped_in_while_serving_is_usable_at_once(api, checkpoint, tiny_model_dirs):
    assert txt2img(api, model_id="late-arrival").status_code == 400  # not there yet
    catalog_file = checkpoint.parent / "catalog.json"
    entries = json.loads(catalog_file.read_text())
    catalog_file.write_text(json.dumps([*entries, {"id": "late-arrival", "config": str(tiny_model_dirs["tiny-sd"])}]))
    write_single_file(tiny_model_dirs["tiny-sd"], checkpoint / "late-arrival.safetensors")
    # No restart and no listing first: the very next request can name it.
    r = txt2img(api, model_id="late-arrival", width=64, height=64)  # (its family's default is 512)
    assert r.status_code == 200, r.content
    assert np.array_equal(pixels(r.json()), pixels(txt2img(api, model_id="tiny-sd").json()))
