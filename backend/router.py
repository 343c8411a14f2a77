"""Pick the backend that runs a generation: local pipelines or the HF Inference API.

``USE_LOCAL_MODELS``: ``true`` local, ``false`` remote, ``auto`` local when CUDA is
present, otherwise remote when a token is set, otherwise local on the CPU.
"""

from __future__ import annotations

from typing import Any, Protocol

from .config import EngineConfig, get_config
from .params import GenerationOutput, GenerationParams


class Backend(Protocol):
    name: str

    def generate(
        self,
        params: GenerationParams,
        *,
        init_image: Any = None,
        mask_image: Any = None,
        on_progress: Any = None,
        should_cancel: Any = None,
        on_preview: Any = None,
    ) -> GenerationOutput: ...


def choose_mode(setting: str, *, cuda_available: bool, has_token: bool) -> str:
    if setting == "true":
        return "local"
    if setting == "false":
        return "remote"
    if cuda_available:
        return "local"
    if has_token:
        return "remote"
    return "local"


def current_mode(config: EngineConfig | None = None) -> str:
    config = config or get_config()
    if config.use_local_models in ("true", "false"):
        return choose_mode(config.use_local_models, cuda_available=False, has_token=False)
    import torch

    return choose_mode("auto", cuda_available=torch.cuda.is_available(), has_token=bool(config.hf_token))


_backends: dict[str, Backend] = {}


def get_backend(mode: str | None = None) -> Backend:
    mode = mode or current_mode()
    if mode not in _backends:
        if mode == "remote":
            from .remote import RemoteBackend

            _backends[mode] = RemoteBackend()
        else:
            from .local import LocalBackend

            _backends[mode] = LocalBackend()
    return _backends[mode]


def reset_backends() -> None:
    _backends.clear()
