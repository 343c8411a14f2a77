"""Reading uploaded images safely, and writing generated ones."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)?(?P<params>(;[\w=.+-]+)*?);base64,(?P<data>.*)$", re.DOTALL)


class ImageInputError(ValueError):
    pass


def decode_base64_image(text: str, *, max_bytes: int) -> bytes:
    """Strict base64 (alphabet and padding checked), plain or as a ``data:`` URL."""
    text = text.strip()
    match = _DATA_URL.match(text)
    if match:
        text = match.group("data")
    elif text.startswith("data:"):
        raise ImageInputError("a data URL must look like data:image/png;base64,<data>")
    text = "".join(text.split())  # line breaks from MIME-wrapped base64 are fine
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ImageInputError(f"the image must be at most {max_bytes} bytes, got about {len(text) * 3 // 4}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("the image is not valid base64 (standard alphabet, with padding)") from None


def open_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode PNG, JPEG or WebP, checked by content; refuse bombs before decoding pixels."""
    if len(data) > max_bytes:
        raise ImageInputError(f"the image must be at most {max_bytes} bytes, got {len(data)}")
    if not data:
        raise ImageInputError("the image is empty")
    try:
        # open() reads only the header: size and format are known before any pixel is decoded.
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.UnidentifiedImageError:
        raise ImageInputError("the image is not a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"the image must have at most {max_pixels} pixels; its header claims far more") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"the image could not be read ({type(exc).__name__})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageInputError(
            f"the image must have at most {max_pixels} pixels, got {width}x{height} = {width * height}"
        )
    if width < 1 or height < 1:
        raise ImageInputError(f"the image has no pixels ({width}x{height})")
    try:
        img.load()
        # Phone photos store "rotate me" in EXIF; apply it so portraits stay upright.
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"the image is broken or truncated ({type(exc).__name__})") from None
    return img


def png_bytes(img: Image.Image, *, text: dict[str, str] | None = None) -> bytes:
    """PNG with optional text chunks; no timestamps, so equal pixels give equal bytes."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_atomic(root: Path, relative: str, data: bytes) -> Path:
    """Write under ``root`` via a temporary file and rename: a reader never sees half a file."""
    target = (root / relative).resolve()
    if root.resolve() not in target.parents:
        raise ValueError("refusing to write outside MEDIA_ROOT")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# The A1111 sampler each native scheduler is (and its "Schedule type" where it has one), so
# the ``parameters`` text reads as A1111's infotext and tools that parse it understand it.
INFOTEXT_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "ddim": ("DDIM", None),
    "ddpm": ("DDPM", None),
    "pndm": ("PLMS", None),
    "lms": ("LMS", None),
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "heun": ("Heun", None),
    "dpmpp_2m": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "dpmpp_2s": ("DPM++ 2S", None),
    "unipc": ("UniPC", None),
}


def model_sha256(model_id: str) -> str:
    """A stable hash of a catalogue id, where A1111 puts a checkpoint file's sha256."""
    return hashlib.sha256(model_id.encode()).hexdigest()


def model_hash(model_id: str) -> str:
    """The short form (A1111's "Model hash"): the first 10 hex digits of :func:`model_sha256`."""
    return model_sha256(model_id)[:10]


def _infotext_value(value: Any) -> str:
    # A1111's infotext_utils.quote: a value with a comma, colon or newline goes in JSON quotes.
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(params: dict[str, Any], seed: int) -> str:
    """The PNG ``parameters`` chunk in A1111's infotext format, so the PNG records how to remake
    it and A1111 tools (PNG Info, image browsers) read it: the prompt, a ``Negative prompt:``
    line when there is one, then ``Key: value`` pairs in A1111's order."""
    sampler, schedule = INFOTEXT_SAMPLERS.get(params.get("scheduler") or "", (None, None))
    guidance = params.get("guidance_scale")
    model_id = str(params.get("model_id") or "")
    pairs: dict[str, Any] = {
        "Steps": params.get("steps"),
        "Sampler": sampler,
        # A1111 always writes the schedule type; "Automatic" is the sampler's own.
        "Schedule type": (schedule or "Automatic") if sampler else None,
        # str(float): A1111's API writes "CFG scale: 7.0".
        "CFG scale": float(guidance) if isinstance(guidance, int | float) else guidance,
        "Seed": seed,
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model hash": model_hash(model_id) if model_id else None,
        "Model": model_id or None,
        "Denoising strength": params.get("strength") if params.get("kind") in ("img2img", "inpaint") else None,
        "Mask blur": params.get("mask_blur") if params.get("kind") == "inpaint" else None,
    }
    loras = [lora for lora in params.get("loras") or () if isinstance(lora, dict) and lora.get("name")]
    if loras:
        # A1111's own record of the LoRAs a prompt's tags applied: "name: short hash, ...".
        pairs["Lora hashes"] = ", ".join(f"{lora['name']}: {str(lora.get('sha256', ''))[:12]}" for lora in loras)
    settings_line = ", ".join(f"{key}: {_infotext_value(value)}" for key, value in pairs.items() if value is not None)
    # The prompt as A1111 would have it: the LoRAs as tags, so pasting it back applies them.
    prompt = str(params.get("prompt", "")) + "".join(
        f" <lora:{lora['name']}:{lora.get('weight', 1.0):g}>" for lora in loras
    )
    negative = params.get("negative_prompt") or ""
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{settings_line}".strip()


THUMBNAIL_MAX_SIDE = 256
THUMBNAIL_SUFFIX = ".thumb.webp"


def thumbnail_name(image_name: str) -> str:
    """Where an image's thumbnail is kept: beside it, ``0-42.png`` -> ``0-42.thumb.webp``."""
    stem = image_name[: -len(".png")] if image_name.endswith(".png") else image_name
    return stem + THUMBNAIL_SUFFIX


def thumbnail_bytes(img: Image.Image, *, max_side: int = THUMBNAIL_MAX_SIDE) -> bytes:
    """A small WebP of ``img`` for history grids: its longer side at most ``max_side`` pixels
    (never enlarged), the aspect ratio kept, no metadata; a few kB where the PNG is hundreds."""
    thumb = img.copy()
    if thumb.mode not in ("RGB", "RGBA"):
        thumb = thumb.convert("RGBA" if "transparency" in thumb.info or thumb.mode in ("LA", "PA") else "RGB")
    # reducing_gap: a cheap integer reduce first, then a high-quality resample of what's left.
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    thumb.save(buf, format="WEBP", quality=80, method=4)
    return buf.getvalue()
