"""What shaped a generation's images beyond its parameters, so it can be made again later and
a changed file is noticed: the library versions, and which exact weights ran (the sha256 of a
single-file checkpoint, the resolved commit of a hub model)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .catalog import ModelSpec

log = logging.getLogger("backend.provenance")

# The libraries whose versions change pixels (kernels, schedulers, prompt encoding, adapters).
_LIBRARIES = ("torch", "diffusers", "transformers", "compel", "peft", "safetensors")

_hash_lock = threading.Lock()
_file_hashes: dict[tuple[str, int, int], str] = {}
_HASH_CACHE_MAX = 20_000


@cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, cached by (path, size, mtime): a rescan reads no unchanged file twice,
    and a changed file gets a new hash. Shared by the checkpoint, LoRA and embedding listings."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _file_hashes:
            return _file_hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _hash_lock:
        _file_hashes[key] = value
        while len(_file_hashes) > _HASH_CACHE_MAX:  # the oldest entries go first
            del _file_hashes[next(iter(_file_hashes))]
    return value


def hub_revision(repo: str, revision: str | None) -> str | None:
    """The commit a hub model was loaded from: the snapshot folder of the local cache."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - provenance is best effort; the image is already made
        log.debug("no cached snapshot for %s", repo, exc_info=True)
        return None
    return Path(folder).name


def model_provenance(spec: ModelSpec) -> dict[str, Any]:
    """Which weights a model id stands for right now (no secret, no server path)."""
    out: dict[str, Any] = {"model_source": spec.source}
    if spec.source == "hub" and spec.repo:
        out["model_repo"] = spec.repo
        commit = hub_revision(spec.repo, spec.revision)
        if commit:
            out["model_revision"] = commit
    elif spec.source == "single_file" and spec.path:
        out["model_sha256"] = file_sha256(spec.path)
    elif spec.source == "builtin":
        from .tiny import _FORMAT_VERSION

        out["model_revision"] = f"builtin-v{_FORMAT_VERSION}"
    return out
