"""``POST /sdapi/v1/png-info``: read the generation parameters back out of a PNG.

A1111's ``parse_generation_parameters``, for what this server (and A1111) write: the prompt,
a ``Negative prompt:`` line, then ``Key: value`` pairs, values with commas in JSON quotes.
Values stay strings, and ``Size: WxH`` becomes ``Size-1`` / ``Size-2``, as A1111 answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# What Pillow puts in ``info`` that is not a text chunk of the file's author.
_NOT_ITEMS = {"parameters", "exif", "jfif", "jfif_version", "jfif_density", "jfif_unit", "dpi", "icc_profile"}


def parse_infotext(text: str) -> dict[str, Any]:
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip() if not negative else line)
        else:
            prompt.append(line)
    result: dict[str, Any] = {}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    return result


def png_info(info: dict[str, Any]) -> dict[str, Any]:
    """The PNGInfoResponse for an image's ``info`` dict (Pillow's text chunks and the like)."""
    geninfo = info.get("parameters")
    geninfo = geninfo if isinstance(geninfo, str) else ""
    items = {k: v for k, v in info.items() if k not in _NOT_ITEMS and isinstance(v, str)}
    return {"info": geninfo, "items": items, "parameters": parse_infotext(geninfo) if geninfo else {}}
