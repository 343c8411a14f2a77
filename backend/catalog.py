"""The model catalogue: model id -> where it comes from, its family and defaults.

A model id is only ever a key into this table. It never becomes a path: a local folder
can only come from an operator's catalogue file, never from a request.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sd2", "sdxl")
SOURCES = ("hub", "local", "builtin")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    family: str
    default_size: int
    source: str = "hub"  # hub | local | builtin
    repo: str | None = None  # hub repository, for source=hub
    path: str | None = None  # diffusers folder, for source=local
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16": asked for when the model runs in fp16
    prediction_type: str | None = None  # "v_prediction" for SD2-768
    default_steps: int = 30
    default_guidance_scale: float = 7.5
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def location(self) -> str:
        if self.source == "hub":
            return f"hf://{self.repo}"
        if self.source == "local":
            return f"file://{self.path}"
        return "builtin://" + self.id

    def public_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        # A local folder is operator configuration, not something to publish.
        data.pop("path", None)
        data["location"] = self.location if self.source != "local" else "local"
        return data


DEFAULT_CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="stable-diffusion-v1-5",
        name="Stable Diffusion 1.5",
        family="sd15",
        default_size=512,
        repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        variant="fp16",
        description="The original SD 1.5 checkpoint, 512x512.",
    ),
    ModelSpec(
        id="stable-diffusion-2-1",
        name="Stable Diffusion 2.1",
        family="sd2",
        default_size=768,
        repo="stabilityai/stable-diffusion-2-1",
        variant="fp16",
        prediction_type="v_prediction",
        description="SD 2.1 at 768x768, v-prediction.",
    ),
    ModelSpec(
        id="dreamshaper-8",
        name="DreamShaper 8",
        family="sd15",
        default_size=512,
        repo="Lykon/dreamshaper-8",
        variant="fp16",
        description="A popular SD 1.5 fine-tune for general art.",
    ),
    ModelSpec(
        id="sdxl-base-1.0",
        name="Stable Diffusion XL base 1.0",
        family="sdxl",
        default_size=1024,
        repo="stabilityai/stable-diffusion-xl-base-1.0",
        variant="fp16",
        default_guidance_scale=5.0,
        description="SDXL base at 1024x1024, two text encoders.",
    ),
    ModelSpec(
        id="openjourney-v4",
        name="Openjourney v4",
        family="sd15",
        default_size=512,
        repo="prompthero/openjourney-v4",
        description="SD 1.5 fine-tuned on Midjourney-style images.",
    ),
    ModelSpec(
        id="tiny-sd",
        name="Tiny SD (test model, makes noise)",
        family="sd15",
        default_size=64,
        source="builtin",
        default_steps=4,
        description="Built locally with random weights for tests and offline demos; images are noise.",
        tags=("test",),
    ),
    ModelSpec(
        id="tiny-sdxl",
        name="Tiny SDXL (test model, makes noise)",
        family="sdxl",
        default_size=64,
        source="builtin",
        default_steps=4,
        default_guidance_scale=5.0,
        description="SDXL-shaped, built locally with random weights; images are noise.",
        tags=("test",),
    ),
)

_SPEC_FIELDS = set(ModelSpec.__dataclass_fields__)


class CatalogError(ValueError):
    """A catalogue file entry is invalid; the message names the entry and the field."""


def spec_from_dict(data: dict[str, Any], *, base: ModelSpec | None = None, where: str = "") -> ModelSpec:
    unknown = set(data) - _SPEC_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}")
    values = dict(data)
    if "tags" in values:
        values["tags"] = tuple(values["tags"])
    if base is not None:
        spec = replace(base, **values)
    else:
        missing = {"id", "family", "default_size"} - set(values)
        if missing:
            raise CatalogError(f"{where}: missing field(s) {sorted(missing)}")
        values.setdefault("name", values["id"])
        if "source" not in values:
            values["source"] = "local" if values.get("path") else "hub"
        spec = ModelSpec(**values)
    _check_spec(spec, where)
    return spec


def _check_spec(spec: ModelSpec, where: str) -> None:
    if not _ID_RE.match(spec.id):
        raise CatalogError(f"{where}: id must match {_ID_RE.pattern}, got {spec.id!r}")
    if spec.family not in FAMILIES:
        raise CatalogError(f"{where}: family must be one of {list(FAMILIES)}, got {spec.family!r}")
    if spec.source not in SOURCES:
        raise CatalogError(f"{where}: source must be one of {list(SOURCES)}, got {spec.source!r}")
    if spec.source == "hub" and not spec.repo:
        raise CatalogError(f"{where}: a hub model needs 'repo'")
    if spec.source == "local" and not spec.path:
        raise CatalogError(f"{where}: a local model needs 'path'")
    if spec.source == "builtin" and spec.id not in {"tiny-sd", "tiny-sdxl"}:
        raise CatalogError(f"{where}: builtin models are only 'tiny-sd' and 'tiny-sdxl'")
    if not (isinstance(spec.default_size, int) and 64 <= spec.default_size <= 4096 and spec.default_size % 8 == 0):
        raise CatalogError(f"{where}: default_size must be a multiple of 8 in [64, 4096], got {spec.default_size!r}")


def load_catalog(catalog_file: str | os.PathLike[str] | None = None) -> dict[str, ModelSpec]:
    """The built-in catalogue, with an operator's JSON file (a list of entries) applied on top.

    An entry whose id exists overrides only the fields it gives; a new id adds a model;
    ``{"id": "...", "remove": true}`` drops one.
    """
    catalog = {spec.id: spec for spec in DEFAULT_CATALOG}
    if not catalog_file:
        return catalog
    path = Path(catalog_file)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"MODEL_CATALOG_FILE {path}: can't read JSON ({exc})") from exc
    if isinstance(entries, dict):
        entries = entries.get("models", entries)
    if not isinstance(entries, list):
        raise CatalogError(f"MODEL_CATALOG_FILE {path}: expected a list of model entries")
    for n, entry in enumerate(entries):
        where = f"MODEL_CATALOG_FILE {path} entry {n}"
        if not isinstance(entry, dict) or "id" not in entry:
            raise CatalogError(f"{where}: each entry must be an object with an 'id'")
        entry = dict(entry)
        if entry.pop("remove", False):
            catalog.pop(entry["id"], None)
            continue
        if entry.get("path"):
            # Relative local folders are relative to the catalogue file, not the cwd.
            entry["path"] = str((path.parent / entry["path"]).resolve())
        catalog[entry["id"]] = spec_from_dict(entry, base=catalog.get(entry["id"]), where=where)
    return catalog
