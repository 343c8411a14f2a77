"""Tiny Stable Diffusion pipelines, built from configs with seeded random weights.

They load through the same ``from_pretrained`` code as real models, so tests and offline
demos exercise the real path. Their images are noise: they exist for tests, not art.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint")
_FORMAT_VERSION = "1"  # bump when the recipes below change, so caches rebuild


def bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-char table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _write_tokenizer(folder: Path) -> None:
    """A character-level CLIP tokenizer (no merges): every byte, alone or word-final."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


def _text_encoder_config(**extra):  # noqa: ANN202
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        max_position_embeddings=77,
        **extra,
    )


def _vae(**extra):  # noqa: ANN202
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        **extra,
    )


def _scheduler():  # noqa: ANN202
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_tiny_sd(out: Path, *, in_channels: int = 4) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(1)
    vae = _vae()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_encoder_config())
    tok_dir = out.parent / (out.name + ".tok")
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)


def _build_tiny_sdxl(out: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
    )
    torch.manual_seed(1)
    vae = _vae(force_upcast=True)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_encoder_config())
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(projection_dim=32))
    tok_dir = out.parent / (out.name + ".tok")
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = _scheduler()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)


def _build_tiny_sd_inpaint(out: Path) -> None:
    # An inpainting checkpoint: the UNet reads noisy latents, the mask and the masked image's
    # latents (4 + 1 + 4 channels). Saved as a plain SD pipeline, as such checkpoints are.
    _build_tiny_sd(out, in_channels=9)


_BUILDERS = {"tiny-sd": _build_tiny_sd, "tiny-sdxl": _build_tiny_sdxl, "tiny-sd-inpaint": _build_tiny_sd_inpaint}


def build_tiny_model(model_id: str, out: Path) -> Path:
    """Build ``model_id`` into ``out`` (a diffusers folder). Deterministic: same weights every time."""
    if model_id not in _BUILDERS:
        raise KeyError(f"no tiny model called {model_id!r}; there are {list(TINY_MODELS)}")
    _BUILDERS[model_id](Path(out))
    return Path(out)


def ensure_tiny_model(model_id: str, cache_dir: str | os.PathLike[str]) -> Path:
    """The folder of ``model_id`` under ``cache_dir``, built on first use.

    Safe across processes (test workers, web + worker): the build happens in a temporary
    folder under a file lock and is renamed into place, so a reader never sees half a model.
    """
    from filelock import FileLock

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{model_id}-v{_FORMAT_VERSION}"
    if (final / "model_index.json").exists():
        return final
    with FileLock(str(cache / f".{model_id}.lock")):
        if (final / "model_index.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=cache))
        try:
            build_tiny_model(model_id, tmp / "model")
            os.replace(tmp / "model", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
