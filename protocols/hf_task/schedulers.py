"""HF names a scheduler by its diffusers class; this server by a short native name."""

from __future__ import annotations

from backend.schedulers import SCHEDULERS

# class name -> native name. A class with several native variants (DPMSolverMultistep plain
# and with Karras sigmas) maps onto the one without extra options: that is what the bare
# class name means in diffusers.
CLASS_TO_NATIVE: dict[str, str] = {}
for _native, (_class_name, _extra) in SCHEDULERS.items():
    if _class_name not in CLASS_TO_NATIVE or not _extra:
        CLASS_TO_NATIVE[_class_name] = _native

_LOOKUP: dict[str, str] = {}
for _class_name, _native in CLASS_TO_NATIVE.items():
    _LOOKUP[_class_name.lower()] = _native
    # "EulerAncestralDiscrete" for "EulerAncestralDiscreteScheduler": the suffix is noise.
    _LOOKUP[_class_name.lower().removesuffix("scheduler")] = _native
_LOOKUP.update({name: name for name in SCHEDULERS})


def scheduler_native(value: str) -> str | None:
    """The native scheduler name for a diffusers class name (or a native name), else None."""
    return _LOOKUP.get(value.strip().lower())


def accepted_names() -> str:
    return ", ".join(sorted(CLASS_TO_NATIVE))
