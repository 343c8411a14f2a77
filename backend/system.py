"""Facts about torch, CUDA and the devices, for /api/status/ and test_backend.py."""

from __future__ import annotations

import platform
import sys
from typing import Any


def system_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python_version": platform.python_version(),
        "pytorch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_count": 0,
        "devices": [],
        "platform": sys.platform,
    }
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        for i in range(info["device_count"]):
            props = torch.cuda.get_device_properties(i)
            total, free = props.total_memory, None
            # mem_get_info opens a CUDA context (hundreds of MiB) on the device it asks about:
            # only ask about devices this process already uses.
            if torch.cuda.is_initialized() and torch.cuda.memory_reserved(i) > 0:
                free, total = torch.cuda.mem_get_info(i)
            info["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "total_memory_mb": round(total / 2**20),
                    "free_memory_mb": None if free is None else round(free / 2**20),
                    "allocated_memory_mb": round(torch.cuda.memory_allocated(i) / 2**20),
                    "reserved_memory_mb": round(torch.cuda.memory_reserved(i) / 2**20),
                }
            )
    return info


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", None)
        except ImportError:
            versions[name] = None
    return versions
