"""Cheap previews of a running job: a fixed linear map from latent channels to RGB.

No VAE decode and no extra weights: each family's four latent channels are mixed into RGB
with a 4x3 matrix (fitted once against the real VAE, as AUTOMATIC1111's "Approx cheap" and
ComfyUI's previews do). The result is an eighth of the image's size, blurry but faithful
enough in layout and colour to watch a picture form.
"""

from __future__ import annotations

from typing import Any

# Rows: latent channels; columns: R, G, B.
_SD15_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SD15_BIAS = (0.0, 0.0, 0.0)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

LATENT_RGB: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd15": (_SD15_FACTORS, _SD15_BIAS),
    "sd2": (_SD15_FACTORS, _SD15_BIAS),  # the same VAE as SD 1.x
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
}


def latents_to_rgb(latents: Any, family: str) -> Any:
    """The first image of a batch of latents ``[B, 4, h, w]`` as a PIL RGB image of ``h x w``."""
    import torch
    from PIL import Image

    factors, bias = LATENT_RGB.get(family, LATENT_RGB["sd15"])
    latent = latents[0, :4].detach().to("cpu", torch.float32)  # [4, h, w]
    weight = torch.tensor(factors, dtype=torch.float32)  # [4, 3]
    rgb = torch.einsum("chw,cr->hwr", latent, weight) + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy(), mode="RGB")
