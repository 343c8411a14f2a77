"""Write a diffusers SD 1.x pipeline folder as ONE checkpoint file in the original LDM layout.

The inverse of what ``from_single_file`` does on load, ported from diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``: the same key renames, but the
block counts come from the configs instead of SD 1.5's fixed four, so the tiny test models
convert too. Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE, its
attention as 1x1 convolutions) and ``cond_stage_model.transformer.*`` (CLIP text encoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (original, diffusers) names that don't follow from the block structure.
_UNET_FIXED = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def _unet_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes of every UNet block, from the block layout in ``config``."""
    pairs: list[tuple[str, str]] = []
    layers = int(config["layers_per_block"])
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    n = len(down_types)
    for i, kind in enumerate(down_types):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(up_types):
        has_attention = "CrossAttn" in kind
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if has_attention:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            # The upsampler follows the block's last resnet (and its attention, if any).
            slot = 2 if has_attention else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, diffusers in pairs:
        if key.startswith(diffusers):
            return original + key[len(diffusers) :]
    raise KeyError(f"no original name for {key!r}")


def convert_unet(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    pairs = _UNET_FIXED + _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        if "resnets" in key:
            head, _, tail = key.rpartition("resnets.")
            index, _, rest = tail.partition(".")
            for original, diffusers in _UNET_RESNET:
                if rest.startswith(diffusers):
                    rest = original + rest[len(diffusers) :]
                    break
            key = f"{head}resnets.{index}.{rest}"
        out["model.diffusion_model." + _rename(key, pairs)] = value
    return out


def convert_vae(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    layers = int(config.get("layers_per_block", 1))
    n = len(config["block_out_channels"])
    pairs = [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs += [(f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}.") for i in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        # The original decoder counts its blocks from the bottom; diffusers from the top.
        pairs += [
            (f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(layers + 1)
        ]
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for plain in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."):
        pairs.append((plain, plain))
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            head, _, rest = new.partition(".attn_1.")
            for original, diffusers in _VAE_ATTENTION:
                if rest.startswith(diffusers):
                    rest = original + rest[len(diffusers) :]
                    break
            new = f"{head}.attn_1.{rest}"
            if value.ndim == 2:
                # The original attention uses 1x1 convolutions, diffusers linear layers.
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def convert_text_encoder(state: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 saves CLIPTextModel without its "text_model." prefix; the original
    # checkpoints (transformers 4 at the time) have it.
    return {
        "cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in state.items()
    }


def write_single_file(diffusers_dir: Path, out: Path) -> Path:
    """Write the SD 1.x pipeline in ``diffusers_dir`` as the checkpoint file ``out``."""
    from safetensors.torch import load_file, save_file

    diffusers_dir = Path(diffusers_dir)

    def config(name: str) -> dict[str, Any]:
        return json.loads((diffusers_dir / name / "config.json").read_text())

    state = {}
    state.update(
        convert_unet(load_file(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"), config("unet"))
    )
    state.update(convert_vae(load_file(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"), config("vae")))
    state.update(convert_text_encoder(load_file(diffusers_dir / "text_encoder" / "model.safetensors")))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    return out
