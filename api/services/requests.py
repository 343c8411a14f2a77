"""The one validation of a generation request, for every protocol.

Each protocol maps its own field names onto the native ones (``prompt``, ``width``,
``steps``, ``guidance_scale``, ...) and calls :func:`generation_request_validate`. The limits,
defaults and messages are the native API's, so a request means the same and is refused for
the same reasons whichever protocol it came through. A refusal lists the native field names;
the protocol names them back in its own terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from backend.params import GenerationParams

from ..exceptions import _fields
from ..images import ImageInputError, decode_base64_image, open_image
from ..serializers import (
    Img2ImgRequestSerializer,
    InpaintRequestSerializer,
    Txt2ImgRequestSerializer,
    limits,
)

_SERIALIZERS = {
    "txt2img": Txt2ImgRequestSerializer,
    "img2img": Img2ImgRequestSerializer,
    "inpaint": InpaintRequestSerializer,
}


class RequestInvalid(Exception):
    """The request was refused; ``fields`` maps native field names to messages."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self.fields = fields
        first = next(iter(fields.items()), ("request", ["invalid request"]))
        super().__init__(first[1][0] if first[1] else "invalid request")

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class GenerationRequest:
    params: GenerationParams
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    response_format: str = "url"


def generation_request_validate(*, kind: str, data: Mapping[str, Any]) -> GenerationRequest:
    """Validate native-named fields completely; raises :class:`RequestInvalid`."""
    serializer = _SERIALIZERS[kind](data=dict(data))
    if not serializer.is_valid():
        raise RequestInvalid(_fields(serializer.errors))
    valid = serializer.validated_data
    return GenerationRequest(
        params=valid["resolved"],
        init_image=valid.get("image"),
        mask_image=valid.get("mask"),
        response_format=valid.get("response_format", "url"),
    )


def image_fit_size(*, image: Image.Image, longest: int) -> tuple[int, int]:
    """A size for an input image with no size asked for: its aspect ratio, its longer side at
    ``longest`` (the model's default size), in multiples of 8 within the size limits."""
    lim = limits()
    lo, hi = lim["MIN_SIZE"] + (-lim["MIN_SIZE"] % 8), lim["MAX_SIZE"] - lim["MAX_SIZE"] % 8
    scale = min(longest, hi) / max(image.size)
    width, height = (min(hi, max(lo, round(side * scale / 8) * 8)) for side in image.size)
    return width, height


def image_decode(data: Any, *, field: str) -> Image.Image:
    """An uploaded file, base64 string or data URL as an image, under the upload limits.

    For protocols that must look inside an image before mapping it (OpenAI's alpha masks).
    """
    lim = limits()
    try:
        if hasattr(data, "read"):
            raw = data.read(lim["MAX_UPLOAD_BYTES"] + 1)
        elif isinstance(data, str) and data.strip():
            raw = decode_base64_image(data, max_bytes=lim["MAX_UPLOAD_BYTES"])
        else:
            raise ImageInputError(f"{field} must be an image file or a base64 string")
        return open_image(raw, max_bytes=lim["MAX_UPLOAD_BYTES"], max_pixels=lim["MAX_UPLOAD_PIXELS"])
    except ImageInputError as exc:
        raise RequestInvalid({field: [str(exc)]}) from None
