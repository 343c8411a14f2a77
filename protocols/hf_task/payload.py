"""The one mapping: an HF task request body onto native generation fields.

InferenceClient sends ``{"inputs": <prompt>, "parameters": {...}}`` for text-to-image and
``{"inputs": <base64 image>, "parameters": {"prompt": ..., "target_size": {...}, ...}}`` for
image-to-image; with no parameters at all, ``image_to_image`` posts the raw image bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from api.selectors import model_catalog
from api.services.requests import image_decode, image_fit_size
from protocols.common import Problem

from .schedulers import accepted_names, scheduler_native

# HF parameter -> native field; anything else in ``parameters`` is refused by name.
_PARAMS = {
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "scheduler": "scheduler",
    "loras": "loras",
}
_IMG2IMG_ONLY = frozenset({"prompt", "strength"})
_BOTH = frozenset(_PARAMS) | {"target_size"}

# The shortest real PNG is ~90 base64 characters; a prompt this long with no space in its
# first 32 characters that also decodes to an image signature is not a prompt.
_MIN_B64_IMAGE_CHARS = 64
_HEAD_CHARS = 32


def _default_size(model_id: str) -> int:
    return model_catalog()[model_id].default_size


def is_image_bytes(data: bytes) -> bool:
    """PNG, JPEG or WebP by signature: the formats the native API decodes."""
    return (
        data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith(b"\xff\xd8\xff")
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


def is_base64_image(text: str) -> bool:
    """Whether ``inputs`` is an image rather than a prompt. A short prompt such as "abcd" is
    valid base64 too, so only a long string whose first bytes are an image signature counts."""
    text = text.strip()
    if text.startswith("data:image/"):
        return True
    if len(text) < _MIN_B64_IMAGE_CHARS:
        return False
    try:
        head = base64.b64decode(text[:_HEAD_CHARS], validate=True)
    except (binascii.Error, ValueError):
        return False
    return is_image_bytes(head)


@dataclass
class TaskRequest:
    kind: str  # txt2img | img2img
    fields: dict[str, Any]  # native names, for generation_request_validate
    names: dict[str, str] = field(default_factory=dict)  # native field -> the HF name to report
    notes: dict[str, str] = field(default_factory=dict)  # native field -> why its value was chosen


INVALID_PARAMETER = "invalid_parameter"


def invalid(name: str, message: str) -> Problem:
    """A refusal already in HF terms: ``name`` is the HF field, ``message`` is shown as is."""
    return Problem(400, INVALID_PARAMETER, message, fields={name: [message]})


def body_parts(body: bytes, content_type: str) -> tuple[Any, dict[str, Any], bytes | None]:
    """(inputs, parameters, raw image) from the request body, whatever shape the client used."""
    mime = content_type.split(";", 1)[0].strip().lower()
    stripped = body.lstrip()
    if mime == "application/json" or (not mime.startswith("image/") and stripped[:1] in (b"{", b'"')):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, a number past Python's digit limit
            raise invalid("inputs", "the request body is not valid JSON") from None
        if isinstance(data, str):
            return data, {}, None  # a JSON string is the prompt, as on HF
        if not isinstance(data, dict):
            raise invalid("inputs", 'the request body must be a JSON object {"inputs": ..., "parameters": {...}}')
        inputs = data.get("inputs", data.get("image"))
        if inputs is None:
            raise invalid("inputs", "inputs is required: the prompt, or a base64 image for image-to-image")
        parameters = data.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise invalid("parameters", f"parameters must be a JSON object, got {type(parameters).__name__}")
        return inputs, parameters, None
    if is_image_bytes(body) or mime.startswith("image/"):
        return None, {}, body
    if not body:
        raise invalid("inputs", 'the request body is empty; send {"inputs": <prompt>, "parameters": {...}}')
    try:
        return body.decode("utf-8"), {}, None  # a plain-text body is the prompt
    except UnicodeDecodeError:
        raise invalid("inputs", "the request body is neither JSON, a UTF-8 prompt, nor a PNG/JPEG/WebP image") from None


def task_request(*, model_id: str, inputs: Any, parameters: Mapping[str, Any], raw_image: bytes | None) -> TaskRequest:
    """Native fields for one image; raises Problem naming the HF field."""
    params = {k: v for k, v in parameters.items() if v is not None}
    if raw_image is not None:
        image_source: Any = io.BytesIO(raw_image)
        kind = "img2img"
    elif isinstance(inputs, str):
        kind = "img2img" if is_base64_image(inputs) else "txt2img"
        image_source = inputs
    else:
        raise invalid("inputs", f"inputs must be a string (a prompt, or a base64 image), got {type(inputs).__name__}")

    allowed = _BOTH | (_IMG2IMG_ONLY if kind == "img2img" else frozenset())
    unknown = sorted(set(params) - allowed)
    if unknown:
        task = "image-to-image" if kind == "img2img" else "text-to-image"
        raise invalid(
            unknown[0],
            f"unknown parameter(s) {', '.join(unknown)} for {task}; accepted: {', '.join(sorted(allowed))}",
        )

    req = TaskRequest(kind=kind, fields={"model_id": model_id, "num_images": 1})
    for hf_name, native in _PARAMS.items():
        if hf_name in params:
            req.fields[native] = params[hf_name]
            req.names[native] = hf_name
    _apply_target_size(req, params)
    _apply_scheduler(req, params)

    if kind == "txt2img":
        req.fields["prompt"] = inputs
        req.names["prompt"] = "inputs"
        return req

    prompt = params.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        how = (
            'a raw image body carries no prompt: send JSON {"inputs": <base64 image>, "parameters": {"prompt": "..."}}'
            if raw_image is not None
            else "send it in parameters.prompt"
        )
        raise invalid("prompt", f"prompt is required for image-to-image on this server; {how}")
    req.fields["prompt"] = prompt
    req.names["prompt"] = "prompt"
    if "strength" in params:
        req.fields["strength"] = params["strength"]
    image = image_decode(image_source, field="image")
    req.fields["image"] = image
    req.names["image"] = "inputs"
    fitted = dict(zip(("width", "height"), image_fit_size(image=image, longest=_default_size(model_id)), strict=True))
    for axis in ("width", "height"):
        if axis not in req.fields:
            # No target size: the input's aspect ratio at the model's size (a phone photo's own
            # 4032 px would be far past both the limits and what the model was trained on).
            req.fields[axis] = fitted[axis]
            req.names[axis] = f"target_size.{axis}"
            req.notes[axis] = (
                f"fitted to the model from the input image ({image.width}x{image.height}); send target_size"
            )
    return req


def _apply_target_size(req: TaskRequest, params: Mapping[str, Any]) -> None:
    target = params.get("target_size")
    if target is None:
        return
    if not isinstance(target, dict) or not set(target) <= {"width", "height"}:
        raise invalid("target_size", f'target_size must be {{"width": int, "height": int}}, got {str(target)[:80]}')
    for axis in ("width", "height"):
        value = target.get(axis)
        if value is None:
            continue
        if axis in req.fields and req.fields[axis] != value:
            raise invalid(
                "target_size",
                f"target_size.{axis} ({value}) contradicts parameters.{axis} ({req.fields[axis]}); send one of them",
            )
        req.fields[axis] = value
        req.names[axis] = f"target_size.{axis}"


def _apply_scheduler(req: TaskRequest, params: Mapping[str, Any]) -> None:
    if "scheduler" not in params:
        return
    value = params["scheduler"]
    native = scheduler_native(value) if isinstance(value, str) else None
    if native is None:
        raise invalid(
            "scheduler",
            f"scheduler must be a diffusers scheduler class name ({accepted_names()}) or a native name, "
            f"got {str(value)[:50]!r}",
        )
    req.fields["scheduler"] = native
