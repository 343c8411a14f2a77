"""LoRA files for the tiny models, made the way trainers make them.

``make_tiny_lora`` puts a seeded peft LoRA on a tiny pipeline's UNet (and, if asked, its text
encoders) and writes it as ``.safetensors`` in one of the two key layouts found in the wild:

- ``"diffusers"``: what the pipeline class's ``save_lora_weights`` writes
  (``unet.<module>.lora.down.weight``, ``text_encoder.<module>.lora_linear_layer...``);
- ``"kohya"``: the A1111 / kohya-ss layout (``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_`` for an SD text encoder, ``lora_te1_`` /
  ``lora_te2_`` for SDXL's two), which diffusers converts on load.

Both hold the same numbers, so they must give the same image. The weights are random and
not small (``init_lora_weights=False``), so a LoRA changes the image visibly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention names

# Making the weights loads a pipeline (a second or so); the files themselves are tiny. Make
# each set of weights once per process and write it out in whichever layout is asked for.
_weights: dict[tuple, dict[str, dict[str, tuple]]] = {}
_pipelines: dict[str, object] = {}


def make_tiny_lora(
    model_dir: Path,
    out: Path,
    *,
    key_format: Literal["diffusers", "kohya"],
    seed: int = 0,
    rank: int = 4,
    scale: float = 1.0,
    text_encoder: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a LoRA for the tiny model in ``model_dir`` to ``out`` (a ``.safetensors`` path).

    ``scale`` multiplies the up (B) matrices, so it scales the LoRA's effect linearly.
    ``text_encoder`` also adapts the text encoder(s): for SDXL both, which marks the file as
    an SDXL LoRA. ``metadata`` goes into the safetensors header (trigger words and so on).
    """
    if key_format not in ("diffusers", "kohya"):
        raise ValueError(f"key_format must be 'diffusers' or 'kohya', got {key_format!r}")
    sdxl = _is_sdxl(Path(model_dir))
    weights = (str(Path(model_dir).resolve()), seed, rank, scale, text_encoder)
    if weights not in _weights:
        _weights[weights] = _lora_weights(Path(model_dir), seed=seed, rank=rank, scale=scale, text_encoder=text_encoder)
    parts = _weights[weights]
    if key_format == "kohya":
        data = _to_bytes(_kohya_tensors(parts, rank=rank, sdxl=sdxl), metadata or {})
    else:
        data = _diffusers_bytes(_pipeline_class(sdxl), parts, metadata or {})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def _is_sdxl(model_dir: Path) -> bool:
    index = json.loads((model_dir / "model_index.json").read_text())
    return "text_encoder_2" in index


def _base_pipeline(model_dir: Path):  # noqa: ANN202
    from diffusers import DiffusionPipeline

    key = str(model_dir.resolve())
    if key not in _pipelines:
        _pipelines[key] = DiffusionPipeline.from_pretrained(model_dir)
    return _pipelines[key]


def _pipeline_class(sdxl: bool) -> type:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def _lora_weights(
    model_dir: Path, *, seed: int, rank: int, scale: float, text_encoder: bool
) -> dict[str, dict[str, tuple]]:
    """component -> {module path: (down, up)}: a seeded LoRA's matrices, in peft's terms."""
    import copy

    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    sdxl = _is_sdxl(model_dir)
    encoders = (["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]) if text_encoder else []
    # Fresh copies of the modules to adapt: the cached pipeline itself stays LoRA-free.
    pipe = _base_pipeline(model_dir)
    modules = {name: copy.deepcopy(getattr(pipe, name)) for name in ["unet", *encoders]}

    torch.manual_seed(seed)
    config = dict(r=rank, lora_alpha=rank, init_lora_weights=False)
    modules["unet"].add_adapter(LoraConfig(target_modules=UNET_TARGETS, **config))
    for name in encoders:
        # transformers' own add_adapter wants a newer peft than diffusers needs: inject directly.
        inject_adapter_in_model(LoraConfig(target_modules=TEXT_ENCODER_TARGETS, **config), modules[name])

    parts: dict[str, dict[str, tuple]] = {}
    for component, module in modules.items():
        state = get_peft_model_state_dict(module)
        pairs: dict[str, tuple] = {}
        for key in state:
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                down = state[key].detach().clone().contiguous()
                up = (state[f"{module}.lora_B.weight"].detach() * scale).contiguous()
                # Files in the wild name CLIP's modules text_model.encoder...: transformers 5
                # dropped that level and diffusers strips it on load. Write what users have.
                path = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
                pairs[path] = (down, up)
        parts[component] = pairs
    return parts


def _kohya_tensors(parts: dict[str, dict[str, tuple]], *, rank: int, sdxl: bool) -> dict:
    import torch

    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    tensors = {}
    for component, modules in parts.items():
        for module, (down, up) in modules.items():
            name = prefixes[component] + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            # alpha == rank: a scale of 1, as peft's lora_alpha=rank above.
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def _diffusers_bytes(pipeline_class: type, parts: dict[str, dict[str, tuple]], metadata: dict[str, str]) -> bytes:
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {}
    for component, modules in parts.items():
        peft_state = {}
        for module, (down, up) in modules.items():
            peft_state[f"{module}.lora_A.weight"] = down
            peft_state[f"{module}.lora_B.weight"] = up
        layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(peft_state)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-lora-"))
    try:
        pipeline_class.save_lora_weights(tmp, weight_name="lora.safetensors", safe_serialization=True, **layers)
        if not metadata:
            return (tmp / "lora.safetensors").read_bytes()
        # save_lora_weights takes no free-form metadata: add it to the header it wrote.
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(tmp / "lora.safetensors", "pt") as f:
            header = dict(f.metadata() or {})
        return _to_bytes(load_file(tmp / "lora.safetensors"), {**header, **metadata})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt", **metadata})
