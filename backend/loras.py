"""LoRA files from a folder, and putting them on a loaded pipeline.

``scan_loras`` lists the ``.safetensors`` LoRAs in a folder the way A1111 users keep them
(subfolders allowed, the file stem is the name) and reads what their headers say: the
family they were trained for, the trigger words. It reads headers only, never a whole
file as weights, and never a pickle: ``.pt``/``.ckpt``/``.bin`` are not even listed.

``AdapterCache`` keeps the LoRAs of one loaded model as peft adapters. Adapters live in
the model's shared modules (UNet, text encoders), so the txt2img, img2img and inpaint
pipelines made with ``from_pipe`` all see them: the cache belongs to the model, not to a
pipeline. Loading a LoRA costs far more than switching between loaded ones, so each is
loaded once and kept, up to ``max_adapters``, least recently used evicted first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .provenance import file_sha256

log = logging.getLogger("backend.loras")

# The UNet's cross-attention input width (the text embedding width) for each family.
_FAMILY_BY_CROSS_DIM = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
# The width of a lone SD text encoder (kohya `lora_te_`, diffusers `text_encoder.`).
_FAMILY_BY_TEXT_ENCODER_DIM = {768: "sd15", 1024: "sd2"}
# Substrings that mark a tensor as one half of a LoRA pair, in the layouts diffusers loads.
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")
_DOWN_MARKERS = ("lora_down", "lora_A", "lora.down", "lora_linear_layer.down")
# kohya-ss trains SDXL on the original (sgm) UNet, whose blocks have these names; its SD 1.x
# LoRAs use the diffusers names (down_blocks, ...).
_SGM_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_TRIGGER_TAGS_FROM_FREQUENCY = 5


@dataclass(frozen=True)
class LoraFile:
    """A LoRA found in the folder. ``name`` is the key clients use; ``path`` stays on the server."""

    name: str
    path: Path
    family: str | None
    key_format: str
    size: int
    sha256: str
    mtime: float
    trigger_words: list[str]
    cross_attention_dim: int | None
    metadata_title: str | None

    def public_dict(self) -> dict[str, Any]:
        """What a client may see: no path."""
        return {
            "name": self.name,
            "family": self.family,
            "key_format": self.key_format,
            "size": self.size,
            "sha256": self.sha256,
            "trigger_words": list(self.trigger_words),
        }


class LoraLoadError(Exception):
    """A LoRA could not be put on a model. The message names the LoRA, never its path."""


# ---------------------------------------------------------------------------------------------
# Scanning


def scan_loras(folder: Path | str) -> dict[str, LoraFile]:
    """The LoRAs in ``folder`` and its subfolders, by name (the file stem), sorted by name.

    Only ``*.safetensors`` files count. Hidden files and folders are skipped (partial
    downloads, tool caches), as are symlinks that lead out of the folder: the folder is the
    boundary. Files that aren't readable safetensors, or hold no LoRA tensors, are skipped
    with a warning. When two files share a stem, the first by sorted path wins. A missing
    folder gives an empty listing.
    """
    root = Path(folder)
    if not root.is_dir():
        return {}
    root_real = root.resolve()
    found: dict[str, LoraFile] = {}
    for path in _safetensors_files(root):
        if not _inside(path, root_real):
            log.warning("skipping LoRA %s: it is a link that leads outside the LoRA folder", path)
            continue
        name = path.stem
        if name in found:
            log.warning("skipping LoRA %s: another file already has the name %r (%s)", path, name, found[name].path)
            continue
        lora = _read_lora_cached(path, name)
        if lora is not None:
            found[name] = lora
    return dict(sorted(found.items()))


def _safetensors_files(root: Path) -> list[Path]:
    files = []
    # followlinks=False: a linked folder could lead anywhere, and could loop.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or not filename.lower().endswith(".safetensors"):
                continue
            files.append(Path(dirpath) / filename)
    return sorted(files)


def _inside(path: Path, root_real: Path) -> bool:
    try:
        path.resolve().relative_to(root_real)
    except (ValueError, OSError):
        return False
    return True


_cache_lock = threading.Lock()

# Whole listings entries by (path, name, size, mtime): a rescan opens no unchanged file.
_file_cache: OrderedDict[tuple[str, str, int, int], LoraFile | None] = OrderedDict()
_FILE_CACHE_MAX = 20_000


def _read_lora_cached(path: Path, name: str) -> LoraFile | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), name, stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if key in _file_cache:
            _file_cache.move_to_end(key)
            return _file_cache[key]
    lora = _read_lora(path, name)
    with _cache_lock:
        _file_cache[key] = lora
        while len(_file_cache) > _FILE_CACHE_MAX:
            _file_cache.popitem(last=False)
    return lora


def _read_lora(path: Path, name: str) -> LoraFile | None:
    from safetensors import safe_open

    try:
        stat = path.stat()
        # safe_open reads the JSON header only; the tensors stay on disk.
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            lora_keys = [k for k in keys if any(m in k for m in _LORA_MARKERS)]
            if not lora_keys:
                log.warning("skipping %s: it holds no LoRA weights", path)
                return None
            cross_dim = _cross_attention_dim(f, lora_keys)
            family = _family(lora_keys, cross_dim, _text_encoder_dim(f, lora_keys), metadata)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types, and OSError
        log.warning("skipping %s: not a readable safetensors file (%s)", path, exc)
        return None
    return LoraFile(
        name=name,
        path=path,
        family=family,
        key_format=_key_format(lora_keys),
        size=stat.st_size,
        sha256=file_sha256(path),
        mtime=stat.st_mtime,
        trigger_words=trigger_words(metadata),
        cross_attention_dim=cross_dim,
        metadata_title=_title(metadata),
    )


def _key_format(lora_keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in lora_keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in lora_keys):
        return "diffusers"
    return "peft"  # module paths with lora_A / lora_B and no component prefix


def _down_matrix_width(f: Any, keys: list[str]) -> int | None:
    """The input width of the first 2-D down (A) matrix among ``keys``."""
    for key in keys:
        if any(m in key for m in _DOWN_MARKERS):
            shape = f.get_slice(key).get_shape()
            if len(shape) == 2:
                return int(shape[1])
    return None


def _cross_attention_dim(f: Any, lora_keys: list[str]) -> int | None:
    # attn2 is cross-attention; its to_k reads the text embeddings, so the down matrix's
    # input width is the UNet's cross_attention_dim.
    keys = [k for k in lora_keys if "attn2" in k and "to_k" in k and not _is_text_encoder_key(k)]
    return _down_matrix_width(f, keys)


def _text_encoder_dim(f: Any, lora_keys: list[str]) -> int | None:
    # The first text encoder only (kohya lora_te_ / lora_te1_, diffusers text_encoder.).
    keys = [
        k
        for k in lora_keys
        if k.startswith(("lora_te_", "lora_te1_", "text_encoder."))
        and any(m in k for m in ("q_proj", "k_proj", "to_q_lora", "to_k_lora"))
    ]
    return _down_matrix_width(f, keys)


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(("lora_te", "text_encoder"))


def _family(lora_keys: list[str], cross_dim: int | None, text_dim: int | None, metadata: dict[str, str]) -> str | None:
    if cross_dim in _FAMILY_BY_CROSS_DIM:
        return _FAMILY_BY_CROSS_DIM[cross_dim]
    # Only SDXL has a second text encoder, and only kohya's SDXL LoRAs use sgm block names.
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", *_SGM_UNET_PREFIXES)) for k in lora_keys):
        return "sdxl"
    if text_dim in _FAMILY_BY_TEXT_ENCODER_DIM and not any(k.startswith("text_encoder_2.") for k in lora_keys):
        return _FAMILY_BY_TEXT_ENCODER_DIM[text_dim]
    return _family_from_metadata(metadata)


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    # What the trainer wrote down, when the tensors alone don't say.
    arch = metadata.get("modelspec.architecture", "").lower()
    base = metadata.get("ss_base_model_version", "").lower()
    if arch.startswith("stable-diffusion-xl") or base.startswith("sdxl"):
        return "sdxl"
    if (
        arch.startswith("stable-diffusion-v2")
        or base.startswith("sd_v2")
        or metadata.get("ss_v2", "").lower() == "true"
    ):
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or base.startswith("sd_v1"):
        return "sd15"
    return None


def _title(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.title", "ss_output_name"):
        value = metadata.get(key, "").strip()
        if value:
            return value
    return None


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """The words a LoRA wants in the prompt, from its safetensors metadata.

    Trainers' explicit fields first (``modelspec.trigger_phrase``, ``ss_trigger_words``,
    ``trigger_words``: a JSON list or comma-separated text); failing those, kohya's most
    frequent training tags (``ss_tag_frequency``). Malformed values are ignored.
    """
    words: list[str] = []
    for key in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words"):
        words.extend(_word_list(metadata.get(key)))
    if not words:
        words = _top_tags(metadata.get("ss_tag_frequency"))
    return list(dict.fromkeys(w for w in words if w))


def _word_list(value: str | None) -> list[str]:
    if not value or not isinstance(value, str):
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, str):
        return [w.strip() for w in parsed.split(",")]
    if isinstance(parsed, list):
        return [w.strip() for w in parsed if isinstance(w, str)]
    return []


def _top_tags(value: str | None) -> list[str]:
    try:
        datasets = json.loads(value) if value else {}
    except ValueError:
        return []
    counts: dict[str, float] = {}
    if not isinstance(datasets, dict):
        return []
    for tags in datasets.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            if isinstance(tag, str) and isinstance(count, int | float) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + count
    # Most frequent first; ties keep the order the trainer wrote them in.
    ranked = sorted(counts, key=lambda t: -counts[t])
    return ranked[:_TRIGGER_TAGS_FROM_FREQUENCY]


# ---------------------------------------------------------------------------------------------
# Compatibility


def lora_incompatibility(lora: LoraFile, *, family: str, cross_attention_dim: int | None) -> str | None:
    """Why ``lora`` can't go on a model of ``family`` / ``cross_attention_dim``, or None if it can.

    Unknown facts (a LoRA whose family the keys don't reveal) never reject: the load itself
    is the final check.
    """
    if lora.family is not None and family and lora.family != family:
        return f"LoRA '{lora.name}' is for {lora.family} models; this model is {family}"
    if lora.cross_attention_dim is not None and cross_attention_dim is not None:
        if lora.cross_attention_dim != cross_attention_dim:
            return (
                f"LoRA '{lora.name}' was made for a model with cross-attention width "
                f"{lora.cross_attention_dim}; this model's is {cross_attention_dim}"
            )
    return None


# ---------------------------------------------------------------------------------------------
# Adapters on a loaded model


def adapter_name(lora: LoraFile) -> str:
    """The adapter name of a LoRA: from its content, so a changed file is a new adapter."""
    return f"lora_{lora.sha256[:12]}"


class AdapterCache:
    """The LoRA adapters loaded into one model, least recently used first.

    Not thread-safe by design: it changes the model's shared modules, so the caller must
    run one job at a time per model (and call ``apply`` at the start of each job, with the
    job's LoRAs or an empty list), which is how the engine runs jobs anyway.
    """

    def __init__(self, max_adapters: int) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.max_adapters = max_adapters
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> LoRA name

    @property
    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._loaded)

    def apply(self, pipe: Any, loras: list[tuple[LoraFile, float]]) -> None:
        """Make ``pipe`` run with exactly these LoRAs at these weights (none: the plain model).

        A LoRA listed twice gets the sum of its weights, as A1111 stacks it. Raises
        ``LoraLoadError`` when one can't be loaded; the model is then left LoRA-free, with
        the LoRAs that did load kept for later.
        """
        weights: dict[str, float] = {}
        files: dict[str, LoraFile] = {}
        for lora, weight in loras:
            name = adapter_name(lora)
            weights[name] = weights.get(name, 0.0) + float(weight)
            files[name] = lora
        if not weights:
            if self._loaded:
                # Switching the LoRA layers off is exact (the base layer's output alone) and
                # skips the LoRA matmuls, unlike a weight of 0.
                pipe.disable_lora()
            return
        try:
            for name, lora in files.items():
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                else:
                    self._load(pipe, lora, name, needed=set(files))
        except LoraLoadError:
            if self._loaded:
                pipe.disable_lora()
            raise
        pipe.enable_lora()
        pipe.set_adapters(list(weights), list(weights.values()))

    def clear(self, pipe: Any) -> None:
        """Remove every adapter from the model."""
        if self._loaded:
            pipe.delete_adapters(list(self._loaded))
            self._loaded.clear()

    def _load(self, pipe: Any, lora: LoraFile, name: str, *, needed: set[str]) -> None:
        model_dim = getattr(getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", None)
        problem = lora_incompatibility(lora, family="", cross_attention_dim=_as_int(model_dim))
        if problem:
            raise LoraLoadError(problem)
        if not lora.path.is_file():
            # Gone since the folder was scanned. Checked here because diffusers would take a
            # path that isn't a file for a hub repository id.
            raise LoraLoadError(f"LoRA '{lora.name}' is no longer in the LoRA folder")
        self._evict(pipe, needed=needed)
        try:
            # use_safetensors=True: without it, diffusers may fall back to its pickle loader
            # when safetensors can't read the file. local_files_only: never the hub.
            pipe.load_lora_weights(str(lora.path), adapter_name=name, use_safetensors=True, local_files_only=True)
        except Exception as exc:
            log.warning("LoRA %r (%s) failed to load", lora.name, lora.path, exc_info=True)
            self._forget_partial(pipe, name)
            raise LoraLoadError(
                f"LoRA '{lora.name}' could not be loaded on this model: the file is unreadable "
                "or its weights don't fit the model's layers"
            ) from exc
        self._loaded[name] = lora.name
        log.info("loaded LoRA %r as adapter %s", lora.name, name)

    def _evict(self, pipe: Any, *, needed: set[str]) -> None:
        # Make room for one more. A request that needs more than max_adapters keeps them all
        # for now; the next request trims the surplus.
        for old in list(self._loaded):
            if len(self._loaded) < self.max_adapters:
                return
            if old in needed:
                continue
            pipe.delete_adapters(old)
            log.info("evicted LoRA adapter %s (%r)", old, self._loaded.pop(old))

    @staticmethod
    def _forget_partial(pipe: Any, name: str) -> None:
        # A failed load can leave the adapter injected in some modules (the text encoder
        # loaded, the UNet didn't): take it out everywhere it got to.
        try:
            present = {n for names in pipe.get_list_adapters().values() for n in names}
            if name in present:
                pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001 - the load error is the one to report
            log.warning("cleaning up after a failed LoRA load failed", exc_info=True)


def _as_int(value: Any) -> int | None:
    # SDXL-style configs may hold a list of widths; only a single int is comparable.
    return value if isinstance(value, int) else None
