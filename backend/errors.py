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


# --- Remote inference (Hugging Face Inference API) --------------------------------------------


class RemoteError(EngineError):
    """The remote inference service failed in a way none of the subclasses below describes."""

    code = "remote_error"
    http_status = 502


class RemoteNotConfigured(RemoteError):
    code = "remote_not_configured"
    http_status = 503


class RemoteAuthFailed(RemoteError):
    """The service refused HF_TOKEN (401/403). The server's credentials, not the client's: 502."""

    code = "remote_auth_failed"
    http_status = 502


class RemoteModelUnavailable(RemoteError):
    """Not found, not served by the provider, or still loading after every retry."""

    code = "remote_model_unavailable"
    http_status = 503


class RemoteRateLimited(RemoteError):
    code = "remote_rate_limited"
    http_status = 429


class RemoteTimeout(RemoteError):
    code = "remote_timeout"
    http_status = 504


class RemoteBadResponse(RemoteError):
    """The service answered 200 with something that isn't an image."""

    code = "remote_bad_response"
    http_status = 502


class RemoteRejected(RemoteError):
    """The service refused the parameters (400/422), e.g. a size the model doesn't support."""

    code = "remote_rejected"
    http_status = 400


class RemoteUnreachable(RemoteError):
    """No connection: DNS, refused, reset, or HF_HUB_OFFLINE blocking every request."""

    code = "remote_unreachable"
    http_status = 503
