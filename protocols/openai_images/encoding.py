"""The stored PNGs (and the running job's previews) in the format a client asked for."""

from __future__ import annotations

import base64
import io

from PIL import Image

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode(png: bytes, *, output_format: str, compression: int, size: tuple[int, int] | None = None) -> bytes:
    """``png`` re-encoded as ``output_format``; ``compression`` is the jpeg/webp quality (0-100).

    ``size`` scales the image first (previews are 1/8 of the final size).
    """
    if output_format == "png" and size is None:
        return png
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        out = img if size is None or img.size == size else img.resize(size, Image.Resampling.BILINEAR)
    if output_format != "png" and out.mode not in ("RGB", "L"):
        out = out.convert("RGB")
    buf = io.BytesIO()
    if output_format == "png":
        out.save(buf, format="PNG")
    else:
        out.save(buf, format=_PIL_FORMAT[output_format], quality=compression)
    return buf.getvalue()


def encode_b64(png: bytes, *, output_format: str, compression: int, size: tuple[int, int] | None = None) -> str:
    data = encode(png, output_format=output_format, compression=compression, size=size)
    return base64.b64encode(data).decode("ascii")
