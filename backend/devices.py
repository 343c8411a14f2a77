"""Device, dtype and memory-option policy, as pure functions so they test without a GPU.

The facts (is CUDA there, how much memory, does the GPU do bf16) come in as arguments;
``ModelManager.device_plan`` reads them from torch. Every decision that isn't simply the
setting as given leaves a note, so ``/api/status/`` and ``test_backend.py`` can say why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Below this much GPU memory, attention slicing is worth its cost even with SDPA.
SMALL_GPU_BYTES = 6 * 1024**3
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(?::(\d+))?)$")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "fp32" | "fp16" | "bf16"
    attention_slicing: bool
    vae_slicing: bool
    vae_tiling: bool
    cpu_offload: str  # off | model | sequential
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith(("cuda", "mps"))

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "attention_slicing": self.attention_slicing,
            "vae_slicing": self.vae_slicing,
            "vae_tiling": self.vae_tiling,
            "cpu_offload": self.cpu_offload,
            "notes": list(self.notes),
        }


def parse_device(setting: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``""`` -> ``("", None)`` (auto). Raises on anything else."""
    value = setting.strip().lower()
    if not value:
        return "", None
    match = _DEVICE_RE.match(value)
    if match is None:
        raise ValueError(f"DEVICE must be cpu, cuda, cuda:N or mps, got {setting!r}")
    if value.startswith("cuda"):
        return "cuda", int(match.group(2)) if match.group(2) is not None else 0
    return value, None


def resolve_device(setting: str, *, cuda_available: bool, device_count: int, mps_available: bool = False) -> str:
    """The ``DEVICE`` setting wins; otherwise the first CUDA device, else CPU."""
    kind, index = parse_device(setting)
    if kind == "cuda":
        if not cuda_available or device_count == 0:
            raise ValueError(f"DEVICE={setting} but CUDA is not available on this machine")
        assert index is not None
        if index >= device_count:
            raise ValueError(
                f"DEVICE={setting} but only {device_count} CUDA device(s) exist (cuda:0..cuda:{device_count - 1})"
            )
        return f"cuda:{index}"
    if kind == "mps":
        if not mps_available:
            raise ValueError("DEVICE=mps but MPS is not available on this machine")
        return "mps"
    if kind == "cpu":
        return "cpu"
    if cuda_available and device_count > 0:
        return "cuda:0"
    return "cpu"


def resolve_dtype(setting: str, *, device: str, bf16_supported: bool = True, notes: list[str] | None = None) -> str:
    """fp16 on GPUs (bf16 on request), fp32 on CPU where half precision is slow or unsupported."""
    notes = notes if notes is not None else []
    if setting not in ("auto", *DTYPES):
        raise ValueError(f"TORCH_DTYPE must be auto, fp16, bf16 or fp32, got {setting!r}")
    if device == "cpu":
        if setting == "fp16":
            # Many CPU kernels have no fp16 version, and those that do are slower than fp32.
            notes.append("TORCH_DTYPE=fp16 ignored on the CPU: running in fp32 (bf16 is allowed on CPU)")
        return "bf16" if setting == "bf16" else "fp32"
    if setting == "auto":
        return "fp16"
    if setting == "bf16" and device.startswith("cuda") and not bf16_supported:
        raise ValueError("TORCH_DTYPE=bf16 but this GPU does not support bfloat16 (it needs Ampere or newer); use fp16")
    return setting


def resolve_attention_slicing(
    setting: str, *, device: str, total_memory: int | None, sdpa: bool, notes: list[str] | None = None
) -> bool:
    """``auto``: off under PyTorch 2 SDPA (slicing only slows it), on for small GPUs or no SDPA."""
    notes = notes if notes is not None else []
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting != "auto":
        raise ValueError(f"ATTENTION_SLICING must be auto, on or off, got {setting!r}")
    if not device.startswith("cuda"):
        return False
    if not sdpa:
        notes.append("attention slicing on: this PyTorch has no scaled_dot_product_attention")
        return True
    if total_memory is not None and total_memory < SMALL_GPU_BYTES:
        notes.append(
            f"attention slicing on: the GPU has {total_memory / 1024**3:.1f} GiB (< {SMALL_GPU_BYTES // 1024**3} GiB)"
        )
        return True
    return False


def plan_device(
    *,
    device_setting: str,
    dtype_setting: str,
    attention_slicing: str,
    vae_slicing: bool,
    vae_tiling: bool,
    cpu_offload: str,
    cuda_available: bool,
    device_count: int,
    total_memory: int | None = None,
    sdpa: bool = True,
    bf16_supported: bool = True,
    mps_available: bool = False,
) -> DevicePlan:
    notes: list[str] = []
    device = resolve_device(
        device_setting, cuda_available=cuda_available, device_count=device_count, mps_available=mps_available
    )
    if cpu_offload not in ("off", "model", "sequential"):
        raise ValueError(f"CPU_OFFLOAD must be off, model or sequential, got {cpu_offload!r}")
    if cpu_offload != "off" and not device.startswith("cuda"):
        # Offload moves weights between CPU and GPU; without a GPU there is nothing to offload to.
        notes.append(f"CPU_OFFLOAD={cpu_offload} ignored: it needs a CUDA device, this runs on {device}")
        cpu_offload = "off"
    return DevicePlan(
        device=device,
        dtype=resolve_dtype(dtype_setting, device=device, bf16_supported=bf16_supported, notes=notes),
        attention_slicing=resolve_attention_slicing(
            attention_slicing, device=device, total_memory=total_memory, sdpa=sdpa, notes=notes
        ),
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        cpu_offload=cpu_offload,
        notes=tuple(notes),
    )


def torch_dtype(name: str):  # noqa: ANN201
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
