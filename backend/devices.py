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
# torch.compile modes for COMPILE; the last two capture the UNet's steps in CUDA graphs.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "fp32" | "fp16" | "bf16"
    attention_slicing: bool
    vae_slicing: bool
    vae_tiling: bool
    cpu_offload: str  # off | model | sequential
    # The fast path (backend/fastpath.py): off unless the plan says so.
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: str = "off"  # one of COMPILE_MODES
    # (width, height, batch) warmed up at load; empty: each model's default size, batch 1.
    compile_shapes: tuple[tuple[int, int, int], ...] = ()
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
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "compile": self.compile,
            "compile_shapes": [f"{w}x{h}x{b}" for w, h, b in self.compile_shapes],
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


def _auto_on_off(name: str, setting: str) -> None:
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"{name} must be auto, on or off, got {setting!r}")


def resolve_channels_last(setting: str, *, device: str) -> bool:
    """``auto``: on for CUDA, where cuDNN's NHWC convolution kernels are the fast ones."""
    _auto_on_off("CHANNELS_LAST", setting)
    if setting != "auto":
        return setting == "on"
    return device.startswith("cuda")


def resolve_fuse_qkv(
    setting: str,
    *,
    device: str,
    sdpa: bool,
    attention_slicing: bool,
    cpu_offload: str,
    notes: list[str] | None = None,
) -> bool:
    """``auto``: on for CUDA. One matmul for q, k and v (k and v in cross-attention) instead of
    three; exact, and the separate weights stay (as views) for LoRAs."""
    notes = notes if notes is not None else []
    _auto_on_off("FUSE_QKV", setting)
    if setting == "off" or (setting == "auto" and not device.startswith("cuda")):
        return False
    why_not = None
    if not sdpa:
        why_not = "the fused attention needs PyTorch's scaled_dot_product_attention"
    elif attention_slicing:
        why_not = "attention slicing is on, and the fused attention would replace the sliced one"
    elif cpu_offload == "sequential":
        why_not = "CPU_OFFLOAD=sequential keeps the weights off the GPU between layers"
    if why_not:
        notes.append(f"fused QKV projections off: {why_not}")
        return False
    return True


def resolve_compile(setting: str, *, device: str, cpu_offload: str, notes: list[str] | None = None) -> str:
    """``COMPILE`` as given; refused with CPU offload, whose hooks move weights mid-call."""
    notes = notes if notes is not None else []
    if setting not in COMPILE_MODES:
        raise ValueError(f"COMPILE must be one of {'|'.join(COMPILE_MODES)}, got {setting!r}")
    if setting == "off":
        return setting
    if cpu_offload != "off":
        raise ValueError(
            f"COMPILE={setting} can't be combined with CPU_OFFLOAD={cpu_offload}: offload moves the weights between "
            "devices during every call; turn one of them off"
        )
    if setting in CUDA_GRAPH_MODES and not device.startswith("cuda"):
        notes.append(f"COMPILE={setting} on {device}: compiled without CUDA graphs, which need a CUDA device")
    return setting


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
    channels_last: str = "auto",
    fuse_qkv: str = "auto",
    compile: str = "off",
    compile_shapes: tuple[tuple[int, int, int], ...] = (),
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
    dtype = resolve_dtype(dtype_setting, device=device, bf16_supported=bf16_supported, notes=notes)
    slicing = resolve_attention_slicing(
        attention_slicing, device=device, total_memory=total_memory, sdpa=sdpa, notes=notes
    )
    compile_mode = resolve_compile(compile, device=device, cpu_offload=cpu_offload, notes=notes)
    return DevicePlan(
        device=device,
        dtype=dtype,
        attention_slicing=slicing,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        cpu_offload=cpu_offload,
        channels_last=resolve_channels_last(channels_last, device=device),
        fuse_qkv=resolve_fuse_qkv(
            fuse_qkv, device=device, sdpa=sdpa, attention_slicing=slicing, cpu_offload=cpu_offload, notes=notes
        ),
        compile=compile_mode,
        compile_shapes=tuple(compile_shapes) if compile_mode != "off" else (),
        notes=tuple(notes),
    )


def torch_dtype(name: str):  # noqa: ANN201
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
