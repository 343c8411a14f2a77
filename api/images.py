"""Reading uploaded images safely, and writing generated ones."""

from __future__ import annotations

import base64
import binascii
import io
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


def parameters_text(params: dict[str, Any], seed: int) -> str:
    """An A1111-style ``parameters`` chunk, so the PNG records how to remake it."""
    parts = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        parts.append(f"Negative prompt: {params['negative_prompt']}")
    parts.append(
        f"Steps: {params.get('steps')}, Sampler: {params.get('scheduler') or 'default'}, "
        f"CFG scale: {params.get('guidance_scale')}, Seed: {seed}, "
        f"Size: {params.get('width')}x{params.get('height')}, Model: {params.get('model_id')}"
    )
    return "\n".join(parts)
