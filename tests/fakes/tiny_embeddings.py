"""Textual-inversion embedding files for the tiny models, in the layouts found in the wild.

The values are seeded random vectors with a standard deviation of 1: far from the tiny text
encoder's own token vectors (about 0.02), so a prompt that uses one gives a visibly different
image. Same arguments, same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Style = Literal["a1111", "diffusers", "sdxl"]


def make_tiny_embedding(
    out: Path,
    *,
    width: int = 32,
    vectors: int = 2,
    seed: int = 0,
    style: Style = "a1111",
    width_2: int = 32,
) -> Path:
    """Write an embedding to ``out`` (a ``.safetensors`` path) and return it.

    - ``a1111``: ``{"emb_params": [vectors, width]}``, what A1111 writes as safetensors;
    - ``diffusers``: ``{"<stem>": [vectors, width]}`` (``[width]`` for one vector), the
      ``learned_embeds.safetensors`` layout whose one key is the trained token;
    - ``sdxl``: ``{"clip_l": [vectors, width], "clip_g": [vectors, width_2]}``.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def vecs(w: int) -> torch.Tensor:
        return torch.randn(vectors, w, generator=gen)

    if style == "a1111":
        tensors = {"emb_params": vecs(width)}
    elif style == "diffusers":
        t = vecs(width)
        tensors = {f"<{out.stem}>": t[0].contiguous() if vectors == 1 else t}
    elif style == "sdxl":
        tensors = {"clip_l": vecs(width), "clip_g": vecs(width_2)}
    else:
        raise ValueError(f"style must be a1111, diffusers or sdxl, got {style!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out
