"""What the foreign protocols' OpenAPI descriptions share: shapes written as JSON Schema.

The bodies of the OpenAI, A1111 and HF protocols are not DRF serializers: each protocol
parses them by hand (``fields``, ``mapping``, ``payload``). Their descriptions are written
as JSON Schema instead, as :class:`Shape` subclasses that drf-spectacular lists as named
components. Each protocol's ``schema`` module attaches them to its views with an
``OpenApiViewExtension``, so the views themselves carry no schema code. Nothing here runs
on a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import get_class
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers
from rest_framework.views import APIView

Ref = Callable[[type["Shape"]], dict[str, Any]]


class Shape(serializers.Serializer):
    """A wire shape, described as JSON Schema; the class name is the component's name.

    ``json_schema(ref)`` is called while a schema is built, so it may read the limits in
    force; ``ref(OtherShape)`` links another named shape.
    """

    @classmethod
    def json_schema(cls, ref: Ref) -> dict[str, Any]:  # pragma: no cover - every shape overrides it
        raise NotImplementedError


class ShapeSchema(OpenApiSerializerExtension):
    target_class = "protocols.schema.Shape"
    match_subclasses = True

    def get_name(self, auto_schema: Any, direction: Any) -> str:
        return get_class(self.target).__name__

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        def ref(shape: type[Shape]) -> dict[str, Any]:
            return auto_schema.resolve_serializer(shape(), direction).ref

        return get_class(self.target).json_schema(ref)


class ProtocolAutoSchema(AutoSchema):
    """No descriptions from docstrings: a view's is written for the code's readers, and
    ``extend_schema(description=...)`` says what a client needs."""

    def get_description(self) -> str:
        return ""


def described(
    view: type[APIView], *, tag: str, schema: AutoSchema | None = None, **methods: dict[str, Any]
) -> type[APIView]:
    """``view`` subclassed for the schema only: each HTTP method (``post=dict(...)``) gets
    ``extend_schema(**kwargs)`` and the protocol's ``tag``; ``schema`` (a ProtocolAutoSchema
    by default) replaces the view's AutoSchema."""
    attrs = {"__module__": view.__module__, "schema": schema or ProtocolAutoSchema()}
    replacement = extend_schema_view(**{name: extend_schema(**kwargs) for name, kwargs in methods.items()})(
        type(view.__name__, (view,), attrs)
    )
    # On the class, after the methods: drf-spectacular then re-parents the methods'
    # annotations onto the class's, so they build on ``schema``.
    return extend_schema(tags=[tag])(replacement)


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also takes null, which these protocols read as "omitted"."""
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def size_bounds(lim: dict[str, Any]) -> dict[str, Any]:
    return {"type": "integer", "minimum": lim["MIN_SIZE"], "maximum": lim["MAX_SIZE"], "multipleOf": 8}


LORAS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "weight": {"type": "number"}},
        "required": ["name"],
    },
    "description": 'LoRAs to apply, [{"name": "x", "weight": 0.8}]; <lora:name:weight> tags in the prompt work too.',
}
