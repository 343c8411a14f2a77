"""The model catalogue: model id -> where it comes from, its family and defaults.

A model id is only ever a key into this table. It never becomes a path: a local folder
can only come from an operator's catalogue file, never from a request.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("backend.catalog")

FAMILIES = ("sd15", "sd2", "sdxl")
SOURCES = ("hub", "local", "builtin", "single_file")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# The diffusers pipeline classes of each family: (txt2img, img2img, inpaint). img2img and
# inpaint are made from the loaded txt2img pipeline with ``from_pipe``, so all three share one
# copy of the weights. The inpaint classes take both ordinary UNets (4 input channels) and
# inpainting checkpoints (9: latents + mask + masked-image latents).
FAMILY_PIPELINES: dict[str, tuple[str, str, str]] = {
    "sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sd2": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    family: str
    default_size: int
    source: str = "hub"  # hub | local | builtin | single_file
    repo: str | None = None  # hub repository, for source=hub
    path: str | None = None  # diffusers folder (local) or .safetensors file (single_file)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16": asked for when the model runs in fp16
    prediction_type: str | None = None  # "v_prediction" for SD2-768
    default_steps: int = 30
    default_guidance_scale: float = 7.5
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # single_file only: a diffusers folder whose component configs describe the checkpoint's
    # architecture; None means the family's shipped configs (backend/model_configs/).
    config: str | None = None

    @property
    def location(self) -> str:
        if self.source == "hub":
            return f"hf://{self.repo}"
        if self.source in ("local", "single_file"):
            return f"file://{self.path}"
        return "builtin://" + self.id

    @property
    def pipelines(self) -> dict[str, str]:
        txt2img, img2img, inpaint = FAMILY_PIPELINES[self.family]
        return {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}

    def public_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        # Local files and folders are operator configuration, not something to publish.
        data.pop("path", None)
        data.pop("config", None)
        data["location"] = "local" if self.source in ("local", "single_file") else self.location
        data["pipelines"] = self.pipelines
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
    ModelSpec(
        id="tiny-sd-inpaint",
        name="Tiny SD inpainting (test model, makes noise)",
        family="sd15",
        default_size=64,
        source="builtin",
        default_steps=4,
        description="An SD 1.5-shaped inpainting checkpoint (9-channel UNet), built locally; images are noise.",
        tags=("test", "inpainting"),
    ),
)

_SPEC_FIELDS = set(ModelSpec.__dataclass_fields__)
_STR_FIELDS = (
    "id",
    "name",
    "family",
    "source",
    "repo",
    "path",
    "revision",
    "variant",
    "prediction_type",
    "description",
    "config",
)
_BUILTIN_IDS = ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint")
_REQUIRED = {"id", "family", "default_size"}  # of an entry that adds a model


class CatalogError(ValueError):
    """A catalogue file entry is invalid; the message names the entry and the field."""


def spec_from_dict(data: dict[str, Any], *, base: ModelSpec | None = None, where: str = "") -> ModelSpec:
    """A spec from one catalogue entry; over ``base`` (the entry it overrides) when given."""
    unknown = set(data) - _SPEC_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}")
    values = dict(data)
    for name in _STR_FIELDS:
        if values.get(name) is not None and not isinstance(values[name], str):
            raise CatalogError(f"{where}: {name} must be a string, got {values[name]!r}")
    if "tags" in values:
        if not isinstance(values["tags"], list) or not all(isinstance(t, str) for t in values["tags"]):
            raise CatalogError(f"{where}: tags must be a list of strings, got {values['tags']!r}")
        values["tags"] = tuple(values["tags"])
    if "source" not in values:
        # Giving a folder or a repository says where the model comes from.
        if values.get("path") and values.get("repo"):
            raise CatalogError(
                f"{where}: give either 'repo' (hub) or 'path' (local folder), or say which with 'source'"
            )
        if values.get("path"):
            is_file = values["path"].lower().endswith(".safetensors")
            values["source"] = "single_file" if is_file else "local"
        elif values.get("repo"):
            values["source"] = "hub"
    if base is not None:
        spec = replace(base, **values)
        # A model moved to another source forgets the old one's location.
        if spec.source != "hub" and "repo" not in values:
            spec = replace(spec, repo=None, revision=None)
        if spec.source not in ("local", "single_file") and "path" not in values:
            spec = replace(spec, path=None)
        if spec.source != "single_file" and "config" not in values:
            spec = replace(spec, config=None)
    else:
        missing = _REQUIRED - set(values)
        if missing:
            raise CatalogError(f"{where}: missing field(s) {sorted(missing)}")
        values.setdefault("name", values["id"])
        values.setdefault("source", "hub")
        spec = ModelSpec(**values)
    _check_spec(spec, where)
    return spec


def _check_spec(spec: ModelSpec, where: str) -> None:
    if not isinstance(spec.id, str) or not _ID_RE.match(spec.id):
        raise CatalogError(f"{where}: id must match {_ID_RE.pattern}, got {spec.id!r}")
    if spec.family not in FAMILIES:
        raise CatalogError(f"{where}: family must be one of {list(FAMILIES)}, got {spec.family!r}")
    if spec.source not in SOURCES:
        raise CatalogError(f"{where}: source must be one of {list(SOURCES)}, got {spec.source!r}")
    if spec.source == "hub" and not (spec.repo and _REPO_RE.match(spec.repo)):
        raise CatalogError(f"{where}: a hub model needs 'repo' as owner/name, got {spec.repo!r}")
    if spec.source == "local" and not spec.path:
        raise CatalogError(f"{where}: a local model needs 'path', a diffusers folder (with model_index.json)")
    if spec.source == "single_file" and not (spec.path and spec.path.lower().endswith(".safetensors")):
        # Only safetensors: .ckpt/.pt/.bin checkpoints are pickles, and unpickling runs code.
        raise CatalogError(f"{where}: a single_file model needs 'path', a .safetensors file, got {spec.path!r}")
    if spec.config is not None and spec.source != "single_file":
        raise CatalogError(f"{where}: 'config' is only for single_file models (source is {spec.source!r})")
    if spec.source == "builtin" and spec.id not in _BUILTIN_IDS:
        raise CatalogError(f"{where}: builtin models are only {', '.join(_BUILTIN_IDS)}, got {spec.id!r}")
    if spec.variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", spec.variant):
        raise CatalogError(f"{where}: variant must be a weight-file variant such as 'fp16', got {spec.variant!r}")
    if spec.prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise CatalogError(
            f"{where}: prediction_type must be epsilon, v_prediction or sample, got {spec.prediction_type!r}"
        )
    size = spec.default_size
    if not (isinstance(size, int) and not isinstance(size, bool) and 64 <= size <= 4096 and size % 8 == 0):
        raise CatalogError(f"{where}: default_size must be a multiple of 8 in [64, 4096], got {size!r}")
    if not (
        isinstance(spec.default_steps, int)
        and not isinstance(spec.default_steps, bool)
        and 1 <= spec.default_steps <= 500
    ):
        raise CatalogError(f"{where}: default_steps must be an integer in [1, 500], got {spec.default_steps!r}")
    guidance = spec.default_guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance <= 50:
        raise CatalogError(f"{where}: default_guidance_scale must be a number in [0, 50], got {guidance!r}")


def load_catalog(
    catalog_file: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> dict[str, ModelSpec]:
    """The built-in catalogue, plus the checkpoints in ``checkpoint_dir``, with an operator's
    JSON file applied on top.

    The file holds a list of entries (or ``{"models": [...]}``). An entry whose id exists
    overrides only the fields it gives (a checkpoint's too, by the id its file name gives);
    a new id adds a model; ``{"id": "...", "remove": true}`` drops one. An entry with
    ``path`` is a local diffusers folder or, ending in ``.safetensors``, a single-file
    checkpoint; one with ``repo`` a hub repository. Paths are relative to the file.
    """
    catalog = {spec.id: spec for spec in DEFAULT_CATALOG}
    if checkpoint_dir:
        from .single_file import scan_checkpoints

        for spec in scan_checkpoints(checkpoint_dir):
            if spec.id in catalog:
                # A file must not silently replace a catalogue model (or a test model).
                log.warning("checkpoint %s: id %r is a catalogue model's; rename the file", spec.path, spec.id)
                continue
            catalog[spec.id] = spec
    if not catalog_file:
        return catalog
    path = Path(catalog_file).expanduser()
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CatalogError(f"MODEL_CATALOG_FILE {path}: can't read JSON ({exc})") from exc
    if isinstance(entries, dict):
        entries = entries.get("models", entries)
    if not isinstance(entries, list):
        raise CatalogError(f"MODEL_CATALOG_FILE {path}: expected a list of model entries")
    for n, entry in enumerate(entries):
        where = f"MODEL_CATALOG_FILE {path} entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise CatalogError(f"{where}: each entry must be an object with a string 'id'")
        where = f"{where} ({entry['id']!r})"
        entry = dict(entry)
        remove = entry.pop("remove", False)
        if not isinstance(remove, bool):
            raise CatalogError(f"{where}: remove must be true or false, got {remove!r}")
        if entry["id"] not in catalog and checkpoint_dir and (remove or not _REQUIRED <= set(entry)):
            # Most likely it speaks of a checkpoint whose file isn't (or is no longer) in the
            # folder: files come and go while the server runs, so that is no error.
            log.warning("%s: no such model (is its checkpoint file in %s?); entry ignored", where, checkpoint_dir)
            continue
        if remove:
            if entry["id"] not in catalog:
                raise CatalogError(f"{where}: can't remove a model that isn't in the catalogue")
            del catalog[entry["id"]]
            continue
        for key in ("path", "config"):
            if isinstance(entry.get(key), str) and entry[key]:
                # Relative local files and folders are relative to the catalogue file, not the cwd.
                entry[key] = str((path.parent / Path(entry[key]).expanduser()).resolve())
        catalog[entry["id"]] = spec_from_dict(entry, base=catalog.get(entry["id"]), where=where)
    return catalog
