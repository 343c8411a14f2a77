"""What one generation asks for, and what it gives back: plain data shared by every backend."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SEED_MAX = 2**32 - 1
KINDS = ("txt2img", "img2img", "inpaint")

# Callbacks every backend takes: progress(step, total_steps), and "stop now?"; a local
# backend also hands over previews: preview(step, total_steps, PIL image).
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
PreviewFn = Callable[[int, int, Any], None]


def random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i of a batch uses seed + i (wrapping at 2**32), so each one can be made alone."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(count)]


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a generation applies: its name in LORA_DIR, its weight, and the sha256 of the
    file it was checked against (so a changed file is noticed and the result can be remade)."""

    name: str
    weight: float = 1.0
    sha256: str = ""


@dataclass(frozen=True)
class GenerationParams:
    """Resolved parameters: every default already filled in, names as diffusers' ``__call__``."""

    kind: str
    model_id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str = ""
    num_images: int = 1
    scheduler: str | None = None
    strength: float | None = None  # img2img and inpaint
    mask_blur: int | None = None  # inpaint: blur radius (px) of the mask's edge when the result is pasted back
    loras: tuple[LoraRef, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple(
            ref if isinstance(ref, LoraRef) else LoraRef(**ref) for ref in values.get("loras") or ()
        )
        return cls(**values)

    @property
    def seeds(self) -> list[int]:
        return image_seeds(self.seed, self.num_images)


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int


@dataclass
class GenerationOutput:
    images: list[GeneratedImage]
    backend: str  # "local" | "remote"
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # What shaped the images beyond the parameters (library versions, the weights' hashes,
    # token counts): recorded with the generation so it can be made again and a changed
    # file noticed.
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchMember:
    """One job of a micro-batch: its parameters, its input images, and its own callbacks.

    Every member of one batch shares model, kind, size, steps, scheduler, guidance, strength
    and LoRA set (see ``batch_key``); prompts, seeds, image counts and inputs are its own.
    """

    params: GenerationParams
    init_image: Any = None
    mask_image: Any = None
    on_progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None
    on_preview: PreviewFn | None = None


def batch_key(params: GenerationParams) -> tuple[Any, ...]:
    """Jobs with equal keys can run as one pipeline call: everything that is one value per call.

    Prompts, negative prompts, seeds, the number of images and the input images are per image;
    the rest is here. LoRAs count with their weights and file hashes: they are weights of the
    shared modules. Embeddings are not in the key: each is a new token of its own, loaded for
    any member that names it, and changes nothing for a prompt that doesn't.
    """
    return (
        params.model_id,
        params.kind,
        params.width,
        params.height,
        params.steps,
        params.scheduler,
        float(params.guidance_scale),
        None if params.strength is None else float(params.strength),
        tuple((ref.name, float(ref.weight), ref.sha256) for ref in params.loras),
    )
