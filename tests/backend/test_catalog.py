"""The model catalogue: the five models, and an operator's file that adds, overrides, removes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.catalog import DEFAULT_CATALOG, FAMILY_PIPELINES, CatalogError, load_catalog

FIVE = {
    "stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", 512),
    "stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1", "sd2", 768),
    "dreamshaper-8": ("Lykon/dreamshaper-8", "sd15", 512),
    "sdxl-base-1.0": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
    "openjourney-v4": ("prompthero/openjourney-v4", "sd15", 512),
}


def write(tmp_path: Path, entries: object, name: str = "models.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def test_the_five_models_with_their_family_size_and_pipelines():
    catalog = load_catalog()
    for model_id, (repo, family, size) in FIVE.items():
        spec = catalog[model_id]
        assert (spec.repo, spec.family, spec.default_size, spec.source) == (repo, family, size, "hub")
        assert spec.location == f"hf://{repo}"
        assert spec.pipelines == dict(zip(("txt2img", "img2img", "inpaint"), FAMILY_PIPELINES[family], strict=True))
    assert catalog["stable-diffusion-2-1"].prediction_type == "v_prediction"
    assert catalog["sdxl-base-1.0"].pipelines == {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    }
    # The fp16 variants the hub repositories publish (openjourney-v4 has none).
    assert {m for m in FIVE if catalog[m].variant == "fp16"} == set(FIVE) - {"openjourney-v4"}
    assert {s.id for s in DEFAULT_CATALOG} == set(FIVE) | {"tiny-sd", "tiny-sdxl", "tiny-sd-inpaint"}


def test_public_dict_says_where_a_model_comes_from_but_never_a_local_path(tmp_path):
    catalog = load_catalog(
        write(tmp_path, [{"id": "mine", "family": "sd15", "default_size": 512, "path": "/srv/models/mine"}])
    )
    body = catalog["stable-diffusion-v1-5"].public_dict()
    assert body["location"] == "hf://stable-diffusion-v1-5/stable-diffusion-v1-5" and body["source"] == "hub"
    assert {"id", "name", "family", "default_size", "pipelines"} <= set(body)
    local = catalog["mine"].public_dict()
    assert local["location"] == "local" and "path" not in local and "/srv/models" not in json.dumps(local)
    assert catalog["tiny-sd"].public_dict()["location"] == "builtin://tiny-sd"


def test_no_file_is_the_builtin_catalogue():
    assert load_catalog(None) == load_catalog("") == {s.id: s for s in DEFAULT_CATALOG}


def test_a_file_adds_overrides_and_removes(tmp_path):
    (tmp_path / "folder").mkdir()
    entries = [
        {
            "id": "my-hub-model",
            "family": "sd15",
            "default_size": 512,
            "repo": "me/my-model",
            "variant": "fp16",
            "revision": "v2",
        },
        {"id": "my-local", "name": "Local one", "family": "sdxl", "default_size": 1024, "path": "folder"},
        {"id": "dreamshaper-8", "default_steps": 25, "name": "DreamShaper (ours)"},
        {"id": "openjourney-v4", "remove": True},
    ]
    catalog = load_catalog(write(tmp_path, entries))
    added = catalog["my-hub-model"]
    assert (added.source, added.repo, added.variant, added.revision, added.name) == (
        "hub",
        "me/my-model",
        "fp16",
        "v2",
        "my-hub-model",
    )
    local = catalog["my-local"]
    assert local.source == "local" and local.path == str((tmp_path / "folder").resolve())  # relative to the file
    overridden = catalog["dreamshaper-8"]
    assert overridden.default_steps == 25 and overridden.name == "DreamShaper (ours)"
    assert overridden.repo == "Lykon/dreamshaper-8" and overridden.family == "sd15"  # the rest kept
    assert "openjourney-v4" not in catalog
    assert "stable-diffusion-v1-5" in catalog


def test_an_override_can_move_a_model_to_a_local_folder_and_back(tmp_path):
    catalog = load_catalog(
        write(tmp_path, [{"id": "sdxl-base-1.0", "path": "/models/sdxl"}, {"id": "tiny-sd", "repo": "me/tiny"}])
    )
    sdxl = catalog["sdxl-base-1.0"]
    assert (sdxl.source, sdxl.path, sdxl.repo) == ("local", "/models/sdxl", None)
    assert sdxl.default_size == 1024 and sdxl.family == "sdxl"
    assert (catalog["tiny-sd"].source, catalog["tiny-sd"].repo) == ("hub", "me/tiny")


def test_models_key_form_is_accepted(tmp_path):
    catalog = load_catalog(
        write(tmp_path, {"models": [{"id": "x-1", "family": "sd2", "default_size": 768, "repo": "a/b"}]})
    )
    assert catalog["x-1"].family == "sd2"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "x", "family": "sd15", "default_size": 512}, "a hub model needs 'repo'"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "../../etc"}, "owner/name"),
        ({"id": "x", "family": "sd3", "default_size": 512, "repo": "a/b"}, "family must be one of"),
        ({"id": "x", "family": "sd15", "default_size": 500, "repo": "a/b"}, "multiple of 8"),
        ({"id": "x", "family": "sd15", "default_size": 56, "repo": "a/b"}, r"\[64, 4096\]"),
        ({"id": "x", "family": "sd15", "default_size": "512", "repo": "a/b"}, "default_size"),
        ({"id": "X Y", "family": "sd15", "default_size": 512, "repo": "a/b"}, "id must match"),
        ({"id": "../x", "family": "sd15", "default_size": 512, "repo": "a/b"}, "id must match"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "colour": "red"}, "unknown field"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "path": "/m"}, "either 'repo'"),
        ({"id": "x", "family": "sd15", "default_size": 512, "source": "builtin"}, "builtin models are only"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "variant": "../fp16"}, "variant"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "prediction_type": "v"}, "prediction_type"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "default_steps": 0}, "default_steps"),
        ({"id": "x", "family": "sd15", "default_size": 512, "repo": "a/b", "tags": "a"}, "tags"),
        ({"id": "x", "family": "sd15"}, "missing field"),
        ({"id": "no-such-model", "remove": True}, "can't remove"),
        ({"family": "sd15"}, "string 'id'"),
    ],
)
def test_a_bad_entry_names_the_file_the_entry_and_the_field(tmp_path, entry, message):
    path = write(tmp_path, [entry])
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path)
    assert f"MODEL_CATALOG_FILE {path} entry 0" in str(info.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(CatalogError, match="can't read JSON"):
        load_catalog(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="can't read JSON"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="expected a list"):
        load_catalog(write(tmp_path, "just a string"))


def test_the_manager_uses_the_file_named_in_its_config(tmp_path):
    from backend.config import EngineConfig
    from backend.manager import ModelManager

    path = write(
        tmp_path,
        [
            {"id": "stable-diffusion-2-1", "remove": True},
            {"id": "extra", "family": "sd15", "default_size": 512, "repo": "a/b"},
        ],
    )
    manager = ModelManager(EngineConfig.from_env({"MODEL_CATALOG_FILE": path}, base_dir=tmp_path))
    ids = {s.id for s in manager.available()}
    assert "extra" in ids and "stable-diffusion-2-1" not in ids
