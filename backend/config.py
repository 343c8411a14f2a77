"""Engine settings, read from the environment (``.env`` is loaded by whoever starts us).

A bad value raises ``ConfigError`` naming the variable, at start-up rather than at the
first request. Django's settings wrap it in ``ImproperlyConfigured``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .devices import COMPILE_MODES, parse_device

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    pass


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got {value!r}")
    return value


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be finite, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def parse_model_map(raw: str, name: str = "HF_REMOTE_MODEL_MAP") -> dict[str, str]:
    """``"id=owner/repo,id2=https://endpoint"`` -> ``{"id": "owner/repo", "id2": "https://endpoint"}``."""
    mapping: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        model_id, sep, target = (piece.strip() for piece in part.partition("="))
        if not sep or not model_id or not target:
            raise ConfigError(f"{name} entries must look like model_id=owner/repo, got {part!r}")
        if not target.startswith(("http://", "https://")) and target.count("/") != 1:
            raise ConfigError(f"{name}: {model_id} must map to owner/repo or an http(s) URL, got {target!r}")
        mapping[model_id] = target
    return mapping


def env_model_map(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    parse_model_map(raw, name)
    return raw


_SHAPE_LIMITS = {"size": (64, 4096), "batch": (1, 64)}


def parse_compile_shapes(raw: str, name: str = "COMPILE_SHAPES") -> tuple[tuple[int, int, int], ...]:
    """``"512x512x1,512x512x4,768x512"`` -> ``((512, 512, 1), (512, 512, 4), (768, 512, 1))``."""
    shapes: list[tuple[int, int, int]] = []
    low, high = _SHAPE_LIMITS["size"]
    for part in raw.split(","):
        part = part.strip().lower()
        if not part:
            continue
        pieces = part.split("x")
        if len(pieces) not in (2, 3) or not all(p.strip().isdigit() for p in pieces):
            raise ConfigError(f"{name} entries must look like 512x512x1 (width x height x batch), got {part!r}")
        width, height, batch = (int(p) for p in (*pieces, "1")[:3])
        for what, value in (("width", width), ("height", height)):
            if not (low <= value <= high and value % 8 == 0):
                raise ConfigError(
                    f"{name}: {what} must be a multiple of 8 between {low} and {high}, got {value} in {part!r}"
                )
        if not _SHAPE_LIMITS["batch"][0] <= batch <= _SHAPE_LIMITS["batch"][1]:
            raise ConfigError(
                f"{name}: batch must be between 1 and {_SHAPE_LIMITS['batch'][1]}, got {batch} in {part!r}"
            )
        if (width, height, batch) not in shapes:
            shapes.append((width, height, batch))
    return tuple(shapes)


def env_url(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if value and not value.startswith(("http://", "https://")):
        # Don't echo the value: an endpoint URL may carry credentials.
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    return value


@dataclass(frozen=True)
class EngineConfig:
    base_dir: Path
    use_local_models: str = "true"  # true | false | auto
    device: str = ""  # "" = auto (cuda if present, else cpu)
    dtype: str = "auto"  # auto | fp16 | bf16 | fp32
    attention_slicing: str = "auto"  # auto | on | off
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: str = "off"  # off | model | sequential
    # The GPU fast path (backend/fastpath.py).
    channels_last: str = "auto"  # auto | on | off
    fuse_qkv: str = "auto"  # auto | on | off
    compile: str = "off"  # off | default | reduce-overhead | max-autotune
    compile_shapes: tuple[tuple[int, int, int], ...] = ()  # (width, height, batch) warmed at load
    # A shape nobody warmed up: "eager" runs it uncompiled, "compile" compiles it then and there.
    compile_new_shapes: str = "eager"
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (the last two for debugging)
    compile_cache_dir: Path = field(default_factory=lambda: Path(".cache/compile"))
    max_loaded_models: int = 1
    model_catalog_file: str = ""
    tiny_models_dir: Path = field(default_factory=lambda: Path(".cache/tiny-models"))
    # Single-file checkpoints (*.safetensors, original layout), listed as catalogue models.
    checkpoint_dir: Path = field(default_factory=lambda: Path("models/checkpoints"))
    # LoRAs and textual-inversion embeddings (*.safetensors only), scanned when read.
    lora_dir: Path = field(default_factory=lambda: Path("models/loras"))
    embeddings_dir: Path = field(default_factory=lambda: Path("models/embeddings"))
    # LoRA adapters kept loaded per model (least recently used evicted first).
    max_loaded_loras: int = 8
    # CLIP tokens one prompt may have; prompts are encoded in 75-token chunks, never truncated.
    max_prompt_tokens: int = 600
    local_files_only: bool = False
    enable_safety_checker: bool = False
    hf_token: str = field(default="", repr=False)
    # Remote inference
    hf_inference_url: str = ""
    hf_inference_provider: str = ""
    hf_remote_model_map: str = ""
    remote_timeout_s: float = 120.0
    remote_max_retries: int = 3
    remote_backoff_s: float = 1.0
    remote_max_backoff_s: float = 30.0
    # Live previews of a running job: on or off, and at most one every this many seconds
    # (0: one every step).
    previews: bool = True
    preview_interval_s: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, base_dir: Path | None = None) -> EngineConfig:
        env = os.environ if env is None else env
        base = Path(base_dir or env.get("BASE_DIR") or Path(__file__).resolve().parent.parent)
        tiny_dir = base / (env.get("TINY_MODELS_DIR") or ".cache/tiny-models")
        checkpoint_dir = base / Path(env.get("CHECKPOINT_DIR", "").strip() or "models/checkpoints").expanduser()
        lora_dir = base / Path(env.get("LORA_DIR", "").strip() or "models/loras").expanduser()
        embeddings_dir = base / Path(env.get("EMBEDDINGS_DIR", "").strip() or "models/embeddings").expanduser()
        device = env.get("DEVICE", "").strip().lower()
        try:
            parse_device(device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        cpu_offload = env_choice(env, "CPU_OFFLOAD", "off", ("off", "model", "sequential"))
        compile_mode = env_choice(env, "COMPILE", "off", COMPILE_MODES)
        if compile_mode != "off" and cpu_offload != "off":
            raise ConfigError(
                f"COMPILE={compile_mode} can't be combined with CPU_OFFLOAD={cpu_offload}: offload moves the weights "
                "between devices during every call; set one of them to off"
            )
        compile_cache_dir = base / Path(env.get("COMPILE_CACHE_DIR", "").strip() or ".cache/compile").expanduser()
        return cls(
            base_dir=base,
            use_local_models=env_choice(env, "USE_LOCAL_MODELS", "true", ("true", "false", "auto")),
            device=device,
            dtype=env_choice(env, "TORCH_DTYPE", "auto", ("auto", "fp16", "bf16", "fp32")),
            attention_slicing=env_choice(env, "ATTENTION_SLICING", "auto", ("auto", "on", "off")),
            vae_slicing=env_bool(env, "VAE_SLICING", False),
            vae_tiling=env_bool(env, "VAE_TILING", False),
            cpu_offload=cpu_offload,
            channels_last=env_choice(env, "CHANNELS_LAST", "auto", ("auto", "on", "off")),
            fuse_qkv=env_choice(env, "FUSE_QKV", "auto", ("auto", "on", "off")),
            compile=compile_mode,
            compile_shapes=parse_compile_shapes(env.get("COMPILE_SHAPES", "")),
            compile_new_shapes=env_choice(env, "COMPILE_NEW_SHAPES", "eager", ("eager", "compile")),
            compile_backend=env_choice(env, "COMPILE_BACKEND", "inductor", ("inductor", "aot_eager", "eager")),
            compile_cache_dir=compile_cache_dir,
            max_loaded_models=env_int(env, "MAX_LOADED_MODELS", 1, minimum=1, maximum=64),
            model_catalog_file=env.get("MODEL_CATALOG_FILE", "").strip(),
            tiny_models_dir=tiny_dir,
            checkpoint_dir=checkpoint_dir,
            lora_dir=lora_dir,
            embeddings_dir=embeddings_dir,
            max_loaded_loras=env_int(env, "MAX_LOADED_LORAS", 8, minimum=1, maximum=256),
            max_prompt_tokens=env_int(env, "MAX_PROMPT_TOKENS", 600, minimum=75, maximum=100_000),
            local_files_only=env_bool(env, "HF_HUB_OFFLINE", False),
            enable_safety_checker=env_bool(env, "ENABLE_SAFETY_CHECKER", False),
            hf_token=env.get("HF_TOKEN", "").strip(),
            hf_inference_url=env_url(env, "HF_INFERENCE_URL"),
            hf_inference_provider=env.get("HF_INFERENCE_PROVIDER", "").strip(),
            hf_remote_model_map=env_model_map(env, "HF_REMOTE_MODEL_MAP"),
            remote_timeout_s=env_float(env, "REMOTE_TIMEOUT", 120.0, minimum=0.1),
            remote_max_retries=env_int(env, "REMOTE_MAX_RETRIES", 3, minimum=0, maximum=20),
            remote_backoff_s=env_float(env, "REMOTE_BACKOFF", 1.0, minimum=0.0),
            remote_max_backoff_s=env_float(env, "REMOTE_MAX_BACKOFF", 30.0, minimum=0.0),
            previews=env_bool(env, "PREVIEWS", True),
            preview_interval_s=env_float(env, "PREVIEW_INTERVAL", 0.5, minimum=0.0),
        )


_config: EngineConfig | None = None


def get_config() -> EngineConfig:
    global _config
    if _config is None:
        _config = EngineConfig.from_env()
    return _config


def set_config(config: EngineConfig | None) -> None:
    """Replace the process-wide config (tests, or a host that builds its own)."""
    global _config
    _config = config
