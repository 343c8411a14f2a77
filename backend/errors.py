"""Errors the engine raises. Each carries a machine ``code`` and a message for a person."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: ``code`` is a stable machine word, ``str(exc)`` a sentence for a person."""

    code = "engine_error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class UnknownModel(EngineError):
    code = "unknown_model"
    http_status = 400


class ModelUnavailable(EngineError):
    """The model can't be loaded: not in the cache and the hub can't be reached, or broken files."""

    code = "model_unavailable"
    http_status = 503


class InvalidParams(EngineError):
    code = "invalid_params"
    http_status = 400


class GenerationCancelled(EngineError):
    """Raised from the step callback to stop a pipeline at once (no VAE decode)."""

    code = "cancelled"
    http_status = 409


class GenerationFailed(EngineError):
    code = "generation_failed"
    http_status = 500


class OutOfMemory(EngineError):
    code = "out_of_memory"
    http_status = 503
