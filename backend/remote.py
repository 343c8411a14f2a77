"""Run generations on the Hugging Face Inference API through ``huggingface_hub.InferenceClient``.

Where a request goes:

- ``HF_INFERENCE_URL`` set: every request goes to exactly that URL (a dedicated Inference
  Endpoint, or any server speaking the same protocol).
- otherwise the client routes it itself: the hub repository comes from ``HF_REMOTE_MODEL_MAP``
  or the catalogue entry's ``repo``, the provider from ``HF_INFERENCE_PROVIDER`` (empty: the
  account's preferred provider for that model).

One call per image with that image's seed, so image i of a batch can be made again alone.
503 (model loading) and 429 (rate limited) are retried a bounded number of times, honouring
``Retry-After``; every other failure becomes an ``EngineError`` with its own code. The token
is sent only in the ``Authorization`` header: no message or log line built here contains it.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from .catalog import ModelSpec, load_catalog
from .config import EngineConfig, get_config, parse_model_map
from .errors import (
    EngineError,
    GenerationCancelled,
    InvalidParams,
    RemoteAuthFailed,
    RemoteBadResponse,
    RemoteError,
    RemoteModelUnavailable,
    RemoteNotConfigured,
    RemoteRateLimited,
    RemoteRejected,
    RemoteTimeout,
    RemoteUnreachable,
    UnknownModel,
)
from .params import CancelFn, GeneratedImage, GenerationOutput, GenerationParams, ProgressFn
from .schedulers import SCHEDULERS

log = logging.getLogger("backend.remote")


RETRY_STATUSES = frozenset({429, 503})
# A cancel is noticed within this long while waiting between retries.
_SLEEP_SLICE_S = 0.1
_DETAIL_CHARS = 200
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{6,}")
_BEARER_RE = re.compile(r"(?i)bearer\s+[^\s\"',;]+")


def redact(text: str, token: str = "") -> str:
    """``text`` with the token, anything shaped like an HF token and any bearer credential masked."""
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    text = _BEARER_RE.sub("Bearer ***", text)
    return _HF_TOKEN_RE.sub("hf_***", text)


def public_url(url: str) -> str:
    """scheme://host/path: no user info, query or fragment, which may carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RemoteTarget:
    """What the client is pointed at: a hub repository plus provider, or a URL."""

    model: str
    provider: str | None = None

    @property
    def is_url(self) -> bool:
        return self.model.startswith(("http://", "https://"))

    def describe(self) -> str:
        """For messages a client sees: an endpoint's address is the operator's business."""
        if self.is_url:
            return "the inference endpoint"
        return f"model {self.model} (provider {self.provider or 'auto'})"

    def log_name(self) -> str:
        return public_url(self.model) if self.is_url else self.describe()


class RemoteBackend:
    name = "remote"

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        catalog: dict[str, ModelSpec] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config or get_config()
        self._catalog = catalog
        self._sleep = sleep
        self.model_map = parse_model_map(self.config.hf_remote_model_map)

    @property
    def catalog(self) -> dict[str, ModelSpec]:
        if self._catalog is None:
            self._catalog = load_catalog(self.config.model_catalog_file or None)
        return self._catalog

    # -- where a request goes ----------------------------------------------------------------
    def target(self, model_id: str) -> RemoteTarget:
        c = self.config
        if c.hf_inference_url:
            return RemoteTarget(c.hf_inference_url)
        mapped = self.model_map.get(model_id)
        if mapped is None:
            spec = self.catalog.get(model_id)
            if spec is None:
                raise UnknownModel(
                    f"model_id {model_id!r} is not in the catalogue; valid ids: {', '.join(sorted(self.catalog))}"
                )
            if spec.source != "hub" or not spec.repo:
                raise RemoteModelUnavailable(
                    f"model {model_id} has no hub repository to run remotely; map one with "
                    f"HF_REMOTE_MODEL_MAP={model_id}=owner/repo, or set HF_INFERENCE_URL"
                )
            mapped = spec.repo
        if mapped.startswith(("http://", "https://")):
            return RemoteTarget(mapped)
        return RemoteTarget(mapped, c.hf_inference_provider or None)

    def client(self, target: RemoteTarget) -> Any:
        from huggingface_hub import InferenceClient

        token = self.config.hf_token or None
        timeout = self.config.remote_timeout_s
        if target.is_url:
            # An endpoint may need no token (a private network deployment). Without HF_TOKEN,
            # send no Authorization at all rather than the client's fallback (a token from the
            # environment or a `hf auth login` file) to an address the token wasn't meant for.
            headers = {} if token else {"authorization": None}
            return InferenceClient(base_url=target.model, api_key=token, timeout=timeout, headers=headers)
        if token is None:
            raise RemoteNotConfigured(
                "remote inference through the Hugging Face router needs HF_TOKEN; "
                "set it, or point HF_INFERENCE_URL at an endpoint"
            )
        return InferenceClient(model=target.model, provider=target.provider, api_key=token, timeout=timeout)

    # -- one generation ----------------------------------------------------------------------
    def generate(
        self,
        params: GenerationParams,
        *,
        init_image: Any = None,
        mask_image: Any = None,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
        on_preview: Any = None,
    ) -> GenerationOutput:
        from huggingface_hub import constants

        if params.loras:
            raise InvalidParams("LoRAs run on local models only: the Hugging Face Inference API takes no adapter files")
        if params.kind == "inpaint":
            # The Inference API's tasks have no mask input; previews don't exist remotely either.
            raise InvalidParams(
                "inpainting runs on local models only: the Hugging Face Inference API has no inpainting task"
            )
        if params.kind == "img2img" and init_image is None:
            raise InvalidParams("img2img needs an image")
        if constants.is_offline_mode():
            raise RemoteUnreachable(
                "HF_HUB_OFFLINE is set, which blocks every Hugging Face request including remote "
                "inference; unset it, or run local models (USE_LOCAL_MODELS=true)"
            )
        target = self.target(params.model_id)
        client = self.client(target)
        warnings: list[str] = []
        init_bytes = (
            _png_bytes(init_image.convert("RGB").resize((params.width, params.height)))
            if init_image is not None
            else None
        )
        scheduler = self._scheduler(params, warnings)

        stats = {"retry_wait_s": 0.0, "retries": 0}
        images: list[GeneratedImage] = []
        seeds = params.seeds
        t0 = time.perf_counter()
        for index, seed in enumerate(seeds):
            _check_cancel(should_cancel)
            t1 = time.perf_counter()

            def call(seed: int = seed) -> Any:
                return self._call_once(client, params, seed=seed, init_bytes=init_bytes, scheduler=scheduler)

            raw = self._with_retries(call, target, should_cancel, stats)
            # A call in flight can't be stopped; a cancel asked for meanwhile drops its image.
            _check_cancel(should_cancel)
            image = self._validated(raw, params, target, warnings)
            images.append(GeneratedImage(image=image, seed=seed))
            log.info(
                "remote %s image %d/%d (seed %d) from %s in %.2fs",
                params.kind,
                index + 1,
                len(seeds),
                seed,
                target.log_name(),
                time.perf_counter() - t1,
            )
            if on_progress is not None:
                on_progress(index + 1, len(seeds))
        if stats["retries"]:
            warnings.append(f"the inference service asked to wait and was retried {stats['retries']} time(s)")
        timings = {"inference_s": round(time.perf_counter() - t0, 4), "retry_wait_s": round(stats["retry_wait_s"], 4)}
        return GenerationOutput(images=images, backend=self.name, timings=timings, warnings=warnings)

    @staticmethod
    def _scheduler(params: GenerationParams, warnings: list[str]) -> str | None:
        if not params.scheduler:
            return None
        if params.scheduler not in SCHEDULERS:
            raise InvalidParams(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {params.scheduler!r}")
        if params.kind == "img2img":
            warnings.append(
                f"scheduler {params.scheduler} is not sent for remote img2img; the service's default is used"
            )
            return None
        class_name, extra = SCHEDULERS[params.scheduler]
        if extra:
            warnings.append(f"scheduler {params.scheduler} is sent as {class_name} without its options {sorted(extra)}")
        return class_name

    @staticmethod
    def _call_once(
        client: Any, params: GenerationParams, *, seed: int, init_bytes: bytes | None, scheduler: str | None
    ) -> Any:
        if params.kind == "img2img":
            from huggingface_hub import ImageToImageTargetSize

            return client.image_to_image(
                init_bytes,
                prompt=params.prompt,
                negative_prompt=params.negative_prompt or None,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                target_size=ImageToImageTargetSize(width=params.width, height=params.height),
                strength=params.strength,
                seed=seed,
            )
        return client.text_to_image(
            params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            scheduler=scheduler,
            seed=seed,
        )

    def _with_retries(
        self, call: Callable[[], Any], target: RemoteTarget, should_cancel: CancelFn | None, stats: dict[str, Any]
    ) -> Any:
        from huggingface_hub.errors import HfHubHTTPError

        max_retries = self.config.remote_max_retries
        attempt = 0
        while True:
            try:
                return call()
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status in RETRY_STATUSES and attempt < max_retries:
                    delay = self._retry_delay(exc.response, status, attempt)
                    attempt += 1
                    log.warning(
                        "%s answered HTTP %d; retry %d of %d in %.2fs",
                        target.log_name(),
                        status,
                        attempt,
                        max_retries,
                        delay,
                    )
                    self._pause(delay, should_cancel)
                    stats["retry_wait_s"] += delay
                    stats["retries"] += 1
                    continue
                # ``from None``: the cause holds the request, and with it the Authorization header.
                raise self._http_error(exc, status, target, attempts=attempt + 1) from None
            except EngineError:
                raise
            except Exception as exc:  # noqa: BLE001 - each known failure gets its own code below
                raise self._other_error(exc, target) from None

    def _retry_delay(self, response: Any, status: int, attempt: int) -> float:
        c = self.config
        delay = parse_retry_after(response.headers.get("retry-after"))
        if delay is None and status == 503:
            # The HF API's "model is loading" answer says how long loading should take.
            try:
                estimated = json.loads(response.content).get("estimated_time")
                delay = float(estimated) if estimated is not None else None
            except (ValueError, TypeError, AttributeError):
                delay = None
        if delay is None:
            delay = c.remote_backoff_s * (2**attempt)
        return max(0.0, min(delay, c.remote_max_backoff_s))

    def _pause(self, seconds: float, should_cancel: CancelFn | None) -> None:
        left = seconds
        while left > 0:
            _check_cancel(should_cancel)
            step = min(left, _SLEEP_SLICE_S)
            self._sleep(step)
            left -= step
        _check_cancel(should_cancel)

    def _detail(self, exc: Any) -> str:
        message = getattr(exc, "server_message", None) or ""
        message = redact(" ".join(str(message).split()), self.config.hf_token)
        if len(message) > _DETAIL_CHARS:
            message = message[:_DETAIL_CHARS] + "..."
        return f": {message}" if message else ""

    def _http_error(self, exc: Any, status: int, target: RemoteTarget, *, attempts: int) -> RemoteError:
        where = target.describe()
        log.info("%s answered HTTP %d%s", target.log_name(), status, self._detail(exc))
        if status == 401:
            return RemoteAuthFailed(
                f"{where} refused the token (HTTP 401): check that HF_TOKEN is a valid, unrevoked Hugging Face token"
            )
        if status == 403:
            return RemoteAuthFailed(
                f"{where} refused access with this token (HTTP 403): check the token's inference permission "
                "and, for a gated model, that its licence was accepted on the hub"
            )
        if status == 404:
            return RemoteModelUnavailable(f"{where} was not found on the inference service (HTTP 404)")
        if status == 503:
            return RemoteModelUnavailable(
                f"{where} is unavailable or still loading (HTTP 503) after {attempts} attempt(s); try again later"
            )
        if status == 429:
            return RemoteRateLimited(
                f"the inference service is rate limiting requests (HTTP 429) after {attempts} attempt(s); try again later"
            )
        if status in (408, 504):
            return RemoteTimeout(f"{where} timed out (HTTP {status})")
        if status in (400, 413, 422):
            return RemoteRejected(f"{where} refused the request (HTTP {status}){self._detail(exc)}")
        return RemoteError(f"{where} failed (HTTP {status}){self._detail(exc)}")

    def _other_error(self, exc: Exception, target: RemoteTarget) -> EngineError:
        import httpx2
        from huggingface_hub.errors import InferenceTimeoutError, OfflineModeIsEnabled

        where = target.describe()
        if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
            return RemoteTimeout(f"{where} did not answer within {self.config.remote_timeout_s:g}s (REMOTE_TIMEOUT)")
        if isinstance(exc, OfflineModeIsEnabled):
            return RemoteUnreachable(
                "HF_HUB_OFFLINE is set, which blocks every Hugging Face request including remote inference"
            )
        if isinstance(exc, httpx2.TransportError):
            return RemoteUnreachable(f"could not reach {where} ({type(exc).__name__})")
        if isinstance(exc, UnidentifiedImageError):
            return RemoteBadResponse(f"{where} answered 200 but the body is not an image")
        if isinstance(exc, json.JSONDecodeError | KeyError):
            return RemoteBadResponse(
                f"{where} answered with something that isn't the expected image ({type(exc).__name__})"
            )
        if isinstance(exc, ValueError):
            # The client refuses before sending: unknown provider, no provider serves the model, ...
            return RemoteModelUnavailable(
                f"{where} can't be used: {redact(str(exc), self.config.hf_token)[:_DETAIL_CHARS]}"
            )
        log.error("remote call to %s failed unexpectedly: %s", target.log_name(), type(exc).__name__)
        return RemoteError(f"the call to {where} failed unexpectedly ({type(exc).__name__})")

    @staticmethod
    def _validated(raw: Any, params: GenerationParams, target: RemoteTarget, warnings: list[str]) -> Image.Image:
        """A fully decoded RGB image of the requested size: a lazy or truncated answer fails here."""
        try:
            raw.load()
            image = raw.convert("RGB")
        except (OSError, SyntaxError, ValueError, AttributeError, Image.DecompressionBombError) as exc:
            raise RemoteBadResponse(
                f"{target.describe()} answered with a broken image ({type(exc).__name__})"
            ) from None
        wanted = (params.width, params.height)
        if image.size != wanted:
            note = f"the inference service returned {image.width}x{image.height}; resized to {wanted[0]}x{wanted[1]}"
            if note not in warnings:
                warnings.append(note)
            image = image.resize(wanted, Image.Resampling.LANCZOS)
        return image


def _check_cancel(should_cancel: CancelFn | None) -> None:
    if should_cancel is not None and should_cancel():
        raise GenerationCancelled("cancelled while running")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
