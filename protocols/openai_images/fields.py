"""The one mapping of OpenAI Images request fields onto native generation fields.

Every field a request may carry is in one of four sets: mapped onto a native field,
honoured here (output encoding, streaming), accepted and ignored, or refused as
unsupported. Anything else is refused by name, as OpenAI does with an unknown parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from PIL import Image

from api.selectors import model_catalog
from api.services.requests import image_fit_size
from protocols.common import Problem

# quality -> multiple of the model's default_steps (rounded, at least 1, capped by MAX_STEPS).
QUALITY_STEPS: dict[str, float] = {
    "low": 0.5,
    "medium": 1.0,
    "standard": 1.0,
    "auto": 1.0,
    "high": 1.5,
    "hd": 1.5,
    "xhigh": 2.0,
    "max": 2.0,
}
# What a response reports for each quality (the SDK's newer literals).
QUALITY_LABEL = {"standard": "medium", "auto": "medium", "hd": "high"}

EDIT_STRENGTH = 0.75  # no mask: img2img keeps the composition, repaints the details
INPAINT_STRENGTH = 1.0  # mask: the transparent area is painted anew, as OpenAI does
VARIATION_STRENGTH = 0.6
VARIATION_PROMPT = "a variation of the image"

OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_COMPRESSION = 100
MAX_PARTIAL_IMAGES = 3

# Sent by the SDK or by OpenAI-shaped clients; nothing here changes for them.
IGNORED = frozenset({"style", "moderation", "user", "safety_identifier", "complexity", "input_fidelity"})
# Features of other image models that this server can't honour: refused when set.
UNSUPPORTED = frozenset({"frame_count", "frame_duration_ms", "svg", "markup"})
# Native fields clients may send through the SDK's extra_body, passed on as they are.
EXTRA_NATIVE = ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "loras")

COMMON = frozenset({"model", "n", "size", "response_format", "output_format", "output_compression", "quality"})
GENERATION_FIELDS = COMMON | {"prompt", "background", "stream", "partial_images"} | set(EXTRA_NATIVE)
EDIT_FIELDS = GENERATION_FIELDS | {"image", "image[]", "mask", "strength", "mask_blur"}
VARIATION_FIELDS = COMMON | {"image", "prompt", "strength"} | set(EXTRA_NATIVE)

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> Problem:
    return Problem(400, code, message, fields={param: [message]} if param else {})


@dataclass
class ImagesRequest:
    """An OpenAI request, translated: native ``fields`` plus what shapes the answer."""

    kind: str
    fields: dict[str, Any]
    quality: str = "medium"
    response_format: str = "b64_json"
    output_format: str = "png"
    compression: int = DEFAULT_COMPRESSION
    stream: bool = False
    partial_images: int = 0
    size: str | None = None  # as the client wrote it, for messages
    steps_given: bool = False
    notes: list[str] = field(default_factory=list)


def check_names(data: Mapping[str, Any], allowed: frozenset[str] | set[str]) -> None:
    for name in data:
        if name in IGNORED:
            continue
        if name in UNSUPPORTED:
            if _present(data.get(name)):
                raise invalid(name, f"{name} is not supported by this server", code="unsupported_parameter")
            continue
        if name not in allowed:
            raise invalid(name, f"Unknown parameter: {name[:100]!r}.", code="unknown_parameter")


def _present(value: Any) -> bool:
    return value not in (None, "")


def _get(data: Mapping[str, Any], name: str) -> Any:
    value = data.get(name)
    return None if value in (None, "") else value


def _int(data: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = _get(data, name)
    if value is None:
        return None
    if isinstance(value, bool) or not re.fullmatch(r"-?\d{1,9}", str(value).strip()):
        raise invalid(name, f"{name} must be an integer between {lo} and {hi}, got {str(value)[:30]!r}")
    number = int(str(value).strip())
    if not lo <= number <= hi:
        raise invalid(name, f"{name} must be between {lo} and {hi}, got {number}")
    return number


def _bool(data: Mapping[str, Any], name: str) -> bool:
    value = _get(data, name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise invalid(name, f"{name} must be true or false, got {str(value)[:30]!r}")


def _choice(data: Mapping[str, Any], name: str, choices: tuple[str, ...] | list[str], default: str) -> str:
    value = _get(data, name)
    if value is None:
        return default
    if value not in choices:
        raise invalid(name, f"{name} must be one of {', '.join(choices)}, got {str(value)[:50]!r}")
    return value


def model_resolve(name: Any) -> str:
    """A catalogue id, an alias from OPENAI_MODEL_ALIASES, or nothing (DEFAULT_MODEL)."""
    if name in (None, ""):
        return settings.DEFAULT_MODEL
    catalog = model_catalog()
    if isinstance(name, str):
        if name in catalog:
            return name
        if name in settings.OPENAI_MODEL_ALIASES:
            return settings.OPENAI_MODEL_ALIASES[name]
    aliases = ", ".join(sorted(settings.OPENAI_MODEL_ALIASES)) or "none"
    message = f"model {str(name)[:100]!r} does not exist; valid ids: {', '.join(sorted(catalog))} (aliases: {aliases})"
    raise invalid("model", message, code="model_not_found")


def size_parse(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """``WxH`` as two ints, or None for ``auto`` / absent (the server picks)."""
    value = _get(data, "size")
    if value is None or value == "auto":
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size", f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {str(value)[:30]!r}")
    return int(match[1]), int(match[2])


def _common(data: Mapping[str, Any], req: ImagesRequest) -> None:
    """The fields every endpoint shares, onto ``req``."""
    fields = req.fields
    model_id = model_resolve(data.get("model"))
    fields["model_id"] = model_id
    n = _get(data, "n")
    if n is not None:
        fields["num_images"] = n  # the native check names the limit; the message says "n"
    size = size_parse(data)
    req.size = _get(data, "size")
    if size is not None:
        fields["width"], fields["height"] = size
    fmt = _get(data, "output_format")
    # OpenAI answers dall-e-2 and dall-e-3 with URLs unless asked otherwise (its quickstart reads
    # data[0].url); the gpt-image models, and this server's own models, with base64.
    named = data.get("model")
    dall_e = isinstance(named, str) and named.startswith("dall-e") and fmt in (None, "", "png")
    req.response_format = _choice(data, "response_format", ("url", "b64_json"), "url" if dall_e else "b64_json")
    if fmt in ("gif", "svg"):
        raise invalid(
            "output_format", f"output_format {fmt!r} is not supported; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    req.output_format = _choice(data, "output_format", OUTPUT_FORMATS, "png")
    if req.output_format != "png" and req.response_format == "url":
        raise invalid(
            "output_format",
            f"output_format {req.output_format!r} needs response_format 'b64_json'; url responses link the stored PNG",
        )
    compression = _int(data, "output_compression", 0, 100)
    req.compression = DEFAULT_COMPRESSION if compression is None else compression
    quality = _choice(data, "quality", tuple(QUALITY_STEPS), "auto")
    req.quality = QUALITY_LABEL.get(quality, quality)
    for name in EXTRA_NATIVE:
        if name in data and data[name] is not None:
            fields[name] = data[name]
    if isinstance(fields.get("loras"), str):
        # A multipart form (edits, variations) carries the list as a JSON string.
        try:
            fields["loras"] = json.loads(fields["loras"])
        except (json.JSONDecodeError, RecursionError):
            raise invalid("loras", 'loras must be a JSON list like [{"name": "x", "weight": 0.8}]') from None
    req.steps_given = "steps" in fields
    if not req.steps_given:
        spec = model_catalog()[model_id]
        steps = max(1, round(spec.default_steps * QUALITY_STEPS[quality]))
        fields["steps"] = min(steps, settings.GENERATION_LIMITS["MAX_STEPS"])


def _streaming(data: Mapping[str, Any], req: ImagesRequest) -> None:
    req.stream = _bool(data, "stream")
    partial = _int(data, "partial_images", 0, MAX_PARTIAL_IMAGES)
    req.partial_images = partial or 0


def generation_request(data: Mapping[str, Any]) -> ImagesRequest:
    check_names(data, GENERATION_FIELDS)
    prompt = data.get("prompt")
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", code="missing_required_parameter")
    background = _get(data, "background")
    if background == "transparent":
        raise invalid("background", "background 'transparent' is not supported; use 'opaque' or 'auto'")
    _choice(data, "background", ("opaque", "auto"), "auto")
    req = ImagesRequest(kind="txt2img", fields={"prompt": prompt})
    _common(data, req)
    _streaming(data, req)
    return req


def edit_request(data: Mapping[str, Any], *, image: Image.Image, mask: Image.Image | None) -> ImagesRequest:
    """``mask`` is already native (white = repaint); see :func:`mask_from_alpha`."""
    check_names(data, EDIT_FIELDS)
    prompt = data.get("prompt")
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", code="missing_required_parameter")
    if _get(data, "background") == "transparent":
        raise invalid("background", "background 'transparent' is not supported; use 'opaque' or 'auto'")
    _choice(data, "background", ("opaque", "auto"), "auto")
    kind = "img2img" if mask is None else "inpaint"
    req = ImagesRequest(kind=kind, fields={"prompt": prompt, "image": image})
    _common(data, req)
    _streaming(data, req)
    _image_fields(data, req, image, default_strength=EDIT_STRENGTH if mask is None else INPAINT_STRENGTH)
    if mask is not None:
        req.fields["mask"] = mask
        if _get(data, "mask_blur") is not None:
            req.fields["mask_blur"] = data["mask_blur"]
    return req


def variation_request(data: Mapping[str, Any], *, image: Image.Image) -> ImagesRequest:
    check_names(data, VARIATION_FIELDS)
    prompt = _get(data, "prompt") or VARIATION_PROMPT
    req = ImagesRequest(kind="img2img", fields={"prompt": prompt, "image": image})
    _common(data, req)
    _image_fields(data, req, image, default_strength=VARIATION_STRENGTH)
    return req


def _image_fields(data: Mapping[str, Any], req: ImagesRequest, image: Image.Image, *, default_strength: float) -> None:
    strength = _get(data, "strength")
    req.fields["strength"] = default_strength if strength is None else strength
    if "width" not in req.fields:
        # size absent or "auto": the input's shape at the model's own resolution.
        spec = model_catalog()[req.fields["model_id"]]
        req.fields["width"], req.fields["height"] = image_fit_size(image=image, longest=spec.default_size)


def mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI marks the area to edit with fully transparent pixels; native masks are white there."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if "A" not in mask.getbands():
        raise invalid(
            "mask",
            f"mask must be a PNG with an alpha channel (fully transparent pixels mark the area to edit), "
            f"got a {mask.mode} image without one",
        )
    alpha = mask.getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0, mode="L")
