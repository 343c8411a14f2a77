"""Device, dtype and memory-option policy, as pure functions so they test without a GPU."""

from __future__ import annotations

from dataclasses import dataclass

# Below this much GPU memory, attention slicing is worth its cost even with SDPA.
SMALL_GPU_BYTES = 6 * 1024**3


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "fp32" | "fp16" | "bf16"
    attention_slicing: bool
    vae_slicing: bool
    vae_tiling: bool
    cpu_offload: str  # off | model | sequential

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "attention_slicing": self.attention_slicing,
            "vae_slicing": self.vae_slicing,
            "vae_tiling": self.vae_tiling,
            "cpu_offload": self.cpu_offload,
        }


def resolve_device(setting: str, *, cuda_available: bool, device_count: int, mps_available: bool = False) -> str:
    """The ``DEVICE`` setting wins; otherwise the first CUDA device, else CPU."""
    if setting:
        if setting.startswith("cuda"):
            if not cuda_available:
                raise ValueError(f"DEVICE={setting} but CUDA is not available on this machine")
            index = int(setting.split(":", 1)[1]) if ":" in setting else 0
            if index >= device_count:
                raise ValueError(f"DEVICE={setting} but only {device_count} CUDA device(s) exist")
            return f"cuda:{index}"
        if setting == "mps" and not mps_available:
            raise ValueError("DEVICE=mps but MPS is not available on this machine")
        return setting
    if cuda_available and device_count > 0:
        return "cuda:0"
    return "cpu"


def resolve_dtype(setting: str, *, device: str, bf16_supported: bool = True) -> str:
    """fp16 on GPUs (bf16 on request), fp32 on CPU where half precision is slow or unsupported."""
    if device == "cpu":
        # fp16 matmuls on CPU are slow or missing; bf16 can be asked for explicitly.
        return "bf16" if setting == "bf16" else "fp32"
    if setting == "auto":
        return "fp16"
    if setting == "bf16" and not bf16_supported:
        raise ValueError("TORCH_DTYPE=bf16 but this GPU does not support bfloat16")
    return setting


def resolve_attention_slicing(setting: str, *, device: str, total_memory: int | None, sdpa: bool) -> bool:
    """``auto``: off under PyTorch 2 SDPA (slicing only slows it), on for small GPUs or no SDPA."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if not device.startswith("cuda"):
        return False
    if not sdpa:
        return True
    return total_memory is not None and total_memory < SMALL_GPU_BYTES


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
    device = resolve_device(device_setting, cuda_available=cuda_available, device_count=device_count, mps_available=mps_available)
    return DevicePlan(
        device=device,
        dtype=resolve_dtype(dtype_setting, device=device, bf16_supported=bf16_supported),
        attention_slicing=resolve_attention_slicing(attention_slicing, device=device, total_memory=total_memory, sdpa=sdpa),
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        # Offload moves weights between CPU and GPU; without a GPU there is nothing to offload to.
        cpu_offload=cpu_offload if device.startswith("cuda") else "off",
    )


def torch_dtype(name: str):  # noqa: ANN201
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
