"""Single-file checkpoints: ``*.safetensors`` in the original (LDM) layout, from a folder.

This is how Stable Diffusion users keep models: one file per model, as model sites hand
them out. A file holds the weights but not the architecture, so each family's diffusers
component configs ship in ``backend/model_configs/<family>/``; the CLIP tokenizers' vocab
is built at first use from the BPE file shipped beside them. Nothing here touches the
network.

Only ``.safetensors`` files are ever listed or opened: ``.ckpt``/``.pt``/``.bin`` files are
pickles, and unpickling runs code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .tiny import bytes_to_unicode

if TYPE_CHECKING:
    from .catalog import ModelSpec

log = logging.getLogger("backend.single_file")

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
BPE_FILE = MODEL_CONFIGS_DIR / "bpe_simple_vocab_16e6.txt.gz"
CHECKPOINT_SUFFIX = ".safetensors"

# The UNet's first convolution: its input channels say 4 (ordinary) or 9 (inpainting).
UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# Text encoder prefixes, one per family, in the original layouts.
SDXL_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG beside CLIP ViT-L (embedders.0)
SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H
SD1_PREFIX = "cond_stage_model.transformer."  # CLIP ViT-L, as transformers names it
# Some trainers mark a v-prediction model with an empty tensor of this name.
V_PRED_KEY = "v_pred"

DEFAULT_SIZES = {"sd15": 512, "sd2": 768, "sdxl": 1024}
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # the catalogue's id rule
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

# The CLIP BPE: 256 bytes, 256 word-final bytes, this many merges, 2 special tokens = 49,408.
_CLIP_MERGES = 49152 - 256 - 2
_TOKENIZER_FORMAT = "1"  # bump when the materialised folder's recipe changes


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says about it."""

    family: str  # sd15 | sd2 | sdxl
    in_channels: int  # 4, or 9 for an inpainting checkpoint
    prediction_type: str | None  # None: the family's scheduler config decides

    @property
    def is_inpainting(self) -> bool:
        return self.in_channels == 9


class CheckpointError(ValueError):
    """A file can't be read as a safetensors file."""


def read_header(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The tensor table of a safetensors file: name -> {"dtype", "shape", "data_offsets"}.

    Read by hand (8-byte little-endian length, then JSON) rather than with
    ``safetensors.safe_open``, which needs a tensor framework imported: listing a folder of
    checkpoints should not cost a torch import.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError("shorter than a safetensors header")
            size = int.from_bytes(raw, "little")
            if not 2 <= size <= _MAX_HEADER:
                raise CheckpointError(f"header length {size} is not plausible")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def detect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The family and UNet input channels of a checkpoint, from its header alone.

    None for a file that isn't a whole Stable Diffusion checkpoint (a LoRA, an embedding, a
    lone UNet or VAE, an SDXL refiner). Raises ``CheckpointError`` when the file can't be read.

    SD 2.x comes as 768 v-prediction and 512 epsilon models whose keys are the same; nothing
    in the file tells them apart, so SD 2.x is taken as v-prediction like SD 2.1 (the
    catalogue file can say otherwise), except inpainting checkpoints, which are epsilon.
    """
    header = read_header(path)
    unet_in = header.get(UNET_IN_KEY)
    shape = unet_in.get("shape") if isinstance(unet_in, dict) else None
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) for n in shape)):
        return None
    in_channels = shape[1]
    if in_channels not in (4, 9):
        return None
    keys = header.keys()
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        family = "sdxl"
    elif any(k.startswith(SD2_PREFIX) for k in keys):
        family = "sd2"
    elif any(k.startswith(SD1_PREFIX) for k in keys):
        family = "sd15"
    else:
        return None
    prediction_type: str | None = None
    if V_PRED_KEY in header:
        prediction_type = "v_prediction"
    elif family == "sd2":
        prediction_type = "epsilon" if in_channels == 9 else "v_prediction"
    return CheckpointInfo(family=family, in_channels=in_channels, prediction_type=prediction_type)


def checkpoint_id(file_name: str) -> str | None:
    """A catalogue id from a file name: ``"My Model (v2).safetensors"`` -> ``"my-model-v2"``.

    None when nothing usable is left.
    """
    stem = file_name[: -len(CHECKPOINT_SUFFIX)] if file_name.lower().endswith(CHECKPOINT_SUFFIX) else file_name
    model_id = re.sub(r"[^a-z0-9._-]", "-", stem.lower())
    model_id = re.sub(r"-{2,}", "-", model_id).strip("-._")[:64].rstrip("-._")
    return model_id if _ID_RE.match(model_id) else None


def checkpoint_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``*.safetensors`` files under ``folder`` (subfolders too), sorted by path.

    Hidden files and folders are skipped, and so is anything whose real location is outside
    ``folder`` (a symlink out of it): the folder is the whole of what an operator shares.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        return []
    real_root = root.resolve()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(CHECKPOINT_SUFFIX):
                continue
            path = Path(dirpath) / name
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                log.warning("checkpoint %s: a broken link; skipped", path)
                continue
            if not real.is_relative_to(real_root):
                log.warning("checkpoint %s: leads outside %s; skipped", path, root)
                continue
            if real.is_file():
                found.append(path)
    return sorted(found)


def folder_signature(folder: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every checkpoint file: changes when a file comes, goes or changes."""
    signature = []
    for path in checkpoint_files(folder):
        try:
            st = path.stat()
        except OSError:
            continue
        signature.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(signature)


def scan_checkpoints(folder: str | os.PathLike[str]) -> list[ModelSpec]:
    """One catalogue entry per Stable Diffusion checkpoint in ``folder``.

    The id comes from the file name; when two files give one id, the first by sorted path
    wins. Files that aren't checkpoints (LoRAs, VAEs, embeddings) are left out quietly, and
    unreadable ones with a warning.
    """
    from .catalog import ModelSpec

    specs: dict[str, ModelSpec] = {}
    for path in checkpoint_files(folder):
        model_id = checkpoint_id(path.name)
        if model_id is None:
            log.warning("checkpoint %s: no usable id in the file name; rename it (letters, digits, . _ -)", path)
            continue
        if model_id in specs:
            log.warning("checkpoint %s: id %r is taken by %s; rename one of them", path, model_id, specs[model_id].path)
            continue
        try:
            info = detect_checkpoint(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s: skipped, %s", path, exc)
            continue
        if info is None:
            log.debug("%s is not a Stable Diffusion checkpoint; not listed", path)
            continue
        stem = path.name[: -len(CHECKPOINT_SUFFIX)]
        specs[model_id] = ModelSpec(
            id=model_id,
            name=stem,
            family=info.family,
            default_size=DEFAULT_SIZES[info.family],
            source="single_file",
            path=str(path),
            prediction_type=info.prediction_type,
            default_guidance_scale=5.0 if info.family == "sdxl" else 7.5,
            description="single-file checkpoint",
            tags=("checkpoint", "inpainting") if info.is_inpainting else ("checkpoint",),
        )
    return list(specs.values())


# -- component configs -------------------------------------------------------------------------
def write_clip_vocab(folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of the CLIP tokenizer, from the shipped BPE file.

    The vocabulary order is CLIP's own, so the ids match the published tokenizers.
    """
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _CLIP_MERGES + 1]  # the first line is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"{BPE_FILE} gave {len(vocab)} tokens, expected 49408")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _shipped_digest(family_dir: Path) -> str:
    digest = hashlib.sha256(_TOKENIZER_FORMAT.encode())
    for path in sorted(p for p in family_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(family_dir)).encode() + b"\0" + path.read_bytes())
    digest.update(hashlib.sha256(BPE_FILE.read_bytes()).digest())
    return digest.hexdigest()[:12]


def family_config_dir(family: str, cache_dir: str | os.PathLike[str], *, in_channels: int = 4) -> Path:
    """A diffusers config folder (no weights) for ``family``, for ``from_single_file(config=...)``.

    Copied from ``model_configs/<family>`` into ``cache_dir`` with the tokenizer files built
    in, on first use. ``in_channels=9`` gives the inpainting variant of the UNet config. Safe
    across processes: built in a temporary folder under a file lock, then renamed into place.
    """
    from filelock import FileLock

    shipped = MODEL_CONFIGS_DIR / family
    if not (shipped / "model_index.json").is_file():
        raise KeyError(f"no shipped configs for family {family!r}")
    if in_channels not in (4, 9):
        raise ValueError(f"in_channels must be 4 or 9, got {in_channels}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = family + ("-inpaint" if in_channels == 9 else "")
    final = cache / f"{name}-{_shipped_digest(shipped)}"
    if (final / "model_index.json").exists():
        return final
    with FileLock(str(cache / f".{name}.lock")):
        if (final / "model_index.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            folder = tmp / "configs"
            shutil.copytree(shipped, folder)
            for tokenizer in sorted(folder.glob("tokenizer*")):
                write_clip_vocab(tokenizer)
            if in_channels != 4:
                unet_config = folder / "unet" / "config.json"
                config = json.loads(unet_config.read_text())
                config["in_channels"] = in_channels
                unet_config.write_text(json.dumps(config, indent=2) + "\n")
            os.replace(folder, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
