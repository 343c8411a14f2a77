"""The one mapping of A1111's ``txt2img`` / ``img2img`` fields onto the native request fields.

Keys this server has no use for (``alwayson_scripts``, ``enable_hr``, ``restore_faces``,
``save_images``, ``clip_skip``, SillyTavern's ``url``/``auth``, ...) are ignored, as A1111
clients send many of them by default. A known key with a bad value is refused, named in A1111's
terms. docs/compat.md lists every field and what happens to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageOps

from api.serializers import limits
from api.services.requests import image_decode

from ..common import Problem
from .protocol import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES, Sampler, Schedule, sampler_find, schedule_find
from .state import checkpoint_lookup, title_of

# Native field name -> the A1111 field a client sent it as (the ``loc`` of a 422).
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "negative_prompt": ("negative_prompt",),
    "model_id": ("override_settings", "sd_model_checkpoint"),
    "width": ("width",),
    "height": ("height",),
    "steps": ("steps",),
    "guidance_scale": ("cfg_scale",),
    "seed": ("seed",),
    "num_images": ("batch_size",),
    "scheduler": ("sampler_name",),
    "image": ("init_images",),
    "strength": ("denoising_strength",),
    "mask": ("mask",),
    "mask_blur": ("mask_blur",),
}
# The fields of A1111's own request models (StableDiffusionProcessing and its txt2img / img2img
# subclasses, and the API's additions): the only keys ``parameters`` echoes. A1111's models drop
# anything else, and so does the echo here: SillyTavern, for one, sends its connection's
# ``url`` and ``auth`` (user:password, here the API key) in the body.
ECHOED_FIELDS = frozenset(
    (
        "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
        "seed_resize_from_w", "seed_enable_extras", "sampler_name", "sampler_index", "scheduler", "batch_size",
        "n_iter", "steps", "cfg_scale", "distilled_cfg_scale", "width", "height", "restore_faces", "tiling",
        "do_not_save_samples", "do_not_save_grid", "eta", "denoising_strength", "s_min_uncond", "s_churn",
        "s_tmax", "s_tmin", "s_noise", "override_settings", "override_settings_restore_afterwards",
        "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks", "firstpass_image", "comments",
        "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
        "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
        "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg", "init_images", "resize_mode", "image_cfg_scale",
        "mask", "mask_blur_x", "mask_blur_y", "mask_blur", "mask_round", "inpainting_fill", "inpaint_full_res",
        "inpaint_full_res_padding", "inpainting_mask_invert", "initial_noise_multiplier", "latent_mask",
        "include_init_images", "script_name", "script_args", "send_images", "save_images", "alwayson_scripts",
        "force_task_id", "infotext", "clip_skip",
    )
)  # fmt: skip


def echoed(body: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` of a txt2img / img2img answer: the request's A1111 fields, as sent."""
    return {key: value for key, value in body.items() if key in ECHOED_FIELDS}


# Native names that appear inside native messages, rewritten so the message names A1111's field.
_RENAMES = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size x n_iter",
    "model_id": "sd_model_checkpoint",
    "strength": "denoising_strength",
}
_RENAME_RE = re.compile(r"(?<![\w.])(" + "|".join(_RENAMES) + r")\b")


class A1111Invalid(Problem):
    """A refusal whose ``fields`` are already A1111's names (dotted for nested ones)."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        first = next(iter(fields.values()))[0]
        super().__init__(422, "invalid_request", first, fields=fields)


def a1111_message(message: str) -> str:
    return _RENAME_RE.sub(lambda m: _RENAMES[m.group(1)], message)


def _refuse(name: str, message: str) -> A1111Invalid:
    return A1111Invalid({name: [message]})


def _count(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _refuse(name, f"{name} must be an integer of at least 1, got {str(value)[:30]!r}")
    try:
        number = float(value)
    except ValueError:
        raise _refuse(name, f"{name} must be an integer of at least 1, got {str(value)[:30]!r}") from None
    if not number.is_integer() or number < 1:
        raise _refuse(name, f"{name} must be an integer of at least 1, got {str(value)[:30]!r}")
    return int(number)


def num_images(body: Mapping[str, Any]) -> tuple[int, int]:
    """``batch_size`` x ``n_iter`` is how many images one request makes here (one batch)."""
    batch_size, n_iter = _count(body, "batch_size"), _count(body, "n_iter")
    cap = limits()["MAX_NUM_IMAGES"]
    if batch_size * n_iter > cap:
        message = f"batch_size x n_iter must be at most {cap}, got {batch_size} x {n_iter} = {batch_size * n_iter}"
        raise A1111Invalid({"batch_size": [message], "n_iter": [message]})
    return batch_size, n_iter


def _split_schedule(name: str) -> tuple[Sampler, Schedule] | None:
    """A sampler name that ends in a schedule type, as before A1111 1.9 ("DPM++ SDE Karras",
    "Euler a Karras"): A1111 strips the schedule's name, label or alias off the end, and it
    wins over the ``scheduler`` field."""
    words = name.split()
    for cut in range(len(words) - 1, 0, -1):
        sampler, schedule = sampler_find(" ".join(words[:cut])), schedule_find(" ".join(words[cut:]))
        if sampler is not None and schedule is not None:
            return sampler, schedule
    return None


def scheduler_of(body: Mapping[str, Any]) -> str:
    """The native scheduler for ``sampler_name`` (or the older ``sampler_index``) + ``scheduler``."""
    field = "sampler_name" if body.get("sampler_name") not in (None, "") else "sampler_index"
    name = body.get(field) or DEFAULT_SAMPLER
    sampler = sampler_find(name) if isinstance(name, str) else None
    schedule: Schedule | None = None
    if sampler is None and isinstance(name, str) and (split := _split_schedule(name)) is not None:
        sampler, schedule = split
    if sampler is None:
        valid = ", ".join(s.name for s in SAMPLERS)
        raise _refuse(
            field,
            f"{field} must be one of {valid} (or an A1111 alias), optionally followed by a schedule type such as "
            f"Karras, got {str(name)[:50]!r}",
        )
    if schedule is None:
        schedule_name = body.get("scheduler")
        if schedule_name in (None, ""):
            return sampler.native
        schedule = schedule_find(schedule_name) if isinstance(schedule_name, str) else None
        if schedule is None:
            valid = ", ".join(c.name for c in SCHEDULES)
            raise _refuse("scheduler", f"scheduler must be one of {valid}, got {str(schedule_name)[:50]!r}")
    if schedule.name == "karras" and sampler.karras:
        return sampler.karras
    return sampler.native


def checkpoint_of(value: Any, *, field: str) -> str:
    """A catalogue id for a checkpoint title / model name / hash, or a refusal naming ``field``."""
    model_id = checkpoint_lookup(value) if isinstance(value, str) else None
    if model_id is None:
        from api.selectors import model_catalog

        titles = ", ".join(title_of(m) for m in sorted(model_catalog()))
        raise _refuse(
            field, f"{field} must be one of {titles} (a title, or the name before the hash), got {str(value)[:100]!r}"
        )
    return model_id


def _mask(body: Mapping[str, Any]) -> Image.Image:
    mask = image_decode(body["mask"], field="mask").convert("L")
    invert = body.get("inpainting_mask_invert", 0)
    if invert not in (0, 1, None) or isinstance(invert, float):
        raise _refuse("inpainting_mask_invert", f"inpainting_mask_invert must be 0 or 1, got {str(invert)[:30]!r}")
    # A1111 masks are white = repaint, as natively; 1 means the client painted what to keep.
    return ImageOps.invert(mask) if invert else mask


def to_native(body: Mapping[str, Any], *, endpoint: str, caller_model: str) -> tuple[str, dict[str, Any]]:
    """(kind, native fields) for an A1111 request to ``endpoint`` (txt2img or img2img)."""
    prompt = body.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        # Natively a prompt is required; A1111 would run an unconditioned generation.
        raise _refuse("prompt", "prompt must not be empty: this server generates from a prompt")
    fields: dict[str, Any] = {"prompt": prompt}
    for a1111, native in (
        ("negative_prompt", "negative_prompt"),
        ("width", "width"),
        ("height", "height"),
        ("steps", "steps"),
        ("cfg_scale", "guidance_scale"),
        ("seed", "seed"),
    ):
        if body.get(a1111) is not None:
            fields[native] = body[a1111]
    lim = limits()
    lo, hi = lim["MIN_SIZE"], lim["MAX_SIZE"]
    for side in ("width", "height"):
        value = fields.get(side)
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value - value % 8 <= hi:
            # A1111 takes any size; its latent is size // 8, so the image comes out rounded down.
            # A size out of bounds goes on as sent, to be refused naming the value the client sent.
            fields[side] = value - value % 8
    batch_size, n_iter = num_images(body)
    fields["num_images"] = batch_size * n_iter
    fields["scheduler"] = scheduler_of(body)

    overrides = body.get("override_settings")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise _refuse("override_settings", "override_settings must be an object of setting names and values")
    checkpoint = (overrides or {}).get("sd_model_checkpoint")
    if checkpoint in (None, ""):
        fields["model_id"] = caller_model
    else:
        fields["model_id"] = checkpoint_of(checkpoint, field="override_settings.sd_model_checkpoint")

    if endpoint == "txt2img":
        # denoising_strength in txt2img is for the hires pass, which this server doesn't run.
        return "txt2img", fields

    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise _refuse("init_images", "init_images must be a list holding at least one image (base64 or a data URL)")
    if not isinstance(images[0], str):
        raise _refuse("init_images", "init_images[0] must be a base64 string or a data URL")
    fields["image"] = images[0]
    if body.get("denoising_strength") is not None:
        fields["strength"] = body["denoising_strength"]
    if body.get("mask") in (None, ""):
        return "img2img", fields
    fields["mask"] = _mask(body)
    if body.get("mask_blur") is not None:
        fields["mask_blur"] = body["mask_blur"]
    return "inpaint", fields
