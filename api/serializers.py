"""HTTP in and out. Requests are validated completely here, before anything is queued."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from drf_spectacular.utils import extend_schema_field
from PIL import Image
from rest_framework import serializers

from backend.catalog import ModelSpec
from backend.params import SEED_MAX, GenerationParams, LoraRef, random_seed
from backend.schedulers import SCHEDULER_NAMES

from .images import ImageInputError, decode_base64_image, open_image
from .models import GeneratedImage, Generation
from .selectors import model_catalog


def limits() -> dict[str, Any]:
    return settings.GENERATION_LIMITS


class StrictIntegerField(serializers.IntegerField):
    """Integers only: 512 or "512", but not 512.5, true or "5e2"."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or (isinstance(data, float) and not data.is_integer()):
            self.fail("invalid")
        return super().to_internal_value(data)


class FiniteFloatField(serializers.FloatField):
    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool):
            self.fail("invalid")
        try:
            finite = math.isfinite(float(data))
        except (TypeError, ValueError, OverflowError):
            finite = True  # not a number at all: the parent's message says so
        if not finite:
            raise serializers.ValidationError(f"{self.field_name} must be a finite number, got {str(data)[:30]!r}")
        return super().to_internal_value(data)


@extend_schema_field({"type": "string", "description": "base64, a data: URL, or a multipart file"})
class ImageInputField(serializers.Field):
    """A multipart file, or a JSON string holding base64 or a ``data:`` URL."""

    default_error_messages = {"required": "image is required for img2img (a multipart file or base64 string)"}

    def to_internal_value(self, data: Any) -> Any:
        lim = limits()
        if isinstance(data, Image.Image):
            # Already decoded (and checked) by a protocol that had to look inside it first;
            # a request body can't produce this type.
            return data
        try:
            if isinstance(data, UploadedFile):
                if data.size is not None and data.size > lim["MAX_UPLOAD_BYTES"]:
                    raise ImageInputError(f"the image must be at most {lim['MAX_UPLOAD_BYTES']} bytes, got {data.size}")
                raw = data.read(lim["MAX_UPLOAD_BYTES"] + 1)
            elif isinstance(data, str):
                if not data.strip():
                    raise ImageInputError("the image is empty")
                raw = decode_base64_image(data, max_bytes=lim["MAX_UPLOAD_BYTES"])
            else:
                raise ImageInputError("image must be a file upload or a base64 string")
            return open_image(raw, max_bytes=lim["MAX_UPLOAD_BYTES"], max_pixels=lim["MAX_UPLOAD_PIXELS"])
        except ImageInputError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def to_representation(self, value: Any) -> Any:  # pragma: no cover - write-only
        return None


class LoraRequestSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    weight = FiniteFloatField(required=False, default=1.0)


class Txt2ImgRequestSerializer(serializers.Serializer):
    kind = "txt2img"

    prompt = serializers.CharField(trim_whitespace=False, allow_blank=False)
    negative_prompt = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, default="")
    model_id = serializers.CharField(required=False)
    width = StrictIntegerField(required=False)
    height = StrictIntegerField(required=False)
    steps = StrictIntegerField(required=False)
    guidance_scale = FiniteFloatField(required=False)
    seed = StrictIntegerField(required=False, allow_null=True)
    num_images = StrictIntegerField(required=False, default=1)
    scheduler = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    response_format = serializers.ChoiceField(choices=["url", "b64_json"], required=False, default="url")
    loras = serializers.ListField(child=LoraRequestSerializer(), required=False, default=list, max_length=64)
    webhook_url = serializers.CharField(required=False, max_length=2048, allow_blank=False)
    webhook_events = serializers.ListField(
        child=serializers.ChoiceField(choices=["completed", "failed", "cancelled"]),
        required=False,
        allow_empty=False,
        max_length=3,
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # "async" is a Python keyword, so it can't be a class attribute.
        fields["async"] = serializers.BooleanField(required=False, default=False)
        return fields

    # -- whole-request checks ------------------------------------------------------------
    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if hasattr(data, "keys"):
            allowed = set(self.fields)
            unknown = sorted(set(data.keys()) - allowed)
            if unknown:
                raise serializers.ValidationError(
                    {
                        name: [f"unknown field {name!r}; allowed fields: {', '.join(sorted(allowed))}"]
                        for name in unknown
                    }
                )
        elif data is not None:
            raise serializers.ValidationError({"non_field_errors": ["the request body must be a JSON object"]})
        return super().to_internal_value(data)

    def validate_prompt(self, value: str) -> str:
        cap = limits()["MAX_PROMPT_CHARS"]
        if len(value) > cap:
            raise serializers.ValidationError(f"prompt must be at most {cap} characters, got {len(value)}")
        if not value.strip():
            raise serializers.ValidationError("prompt must not be blank")
        return value

    def validate_negative_prompt(self, value: str) -> str:
        cap = limits()["MAX_PROMPT_CHARS"]
        if len(value) > cap:
            raise serializers.ValidationError(f"negative_prompt must be at most {cap} characters, got {len(value)}")
        return value

    def validate_model_id(self, value: str) -> str:
        catalog = model_catalog()
        if value not in catalog:
            raise serializers.ValidationError(
                f"model_id must be one of {', '.join(sorted(catalog))}, got {value[:100]!r}"
            )
        return value

    def _size(self, name: str, value: int) -> int:
        lo, hi = limits()["MIN_SIZE"], limits()["MAX_SIZE"]
        if value % 8 or not lo <= value <= hi:
            raise serializers.ValidationError(f"{name} must be a multiple of 8 between {lo} and {hi}, got {value}")
        return value

    def validate_width(self, value: int) -> int:
        return self._size("width", value)

    def validate_height(self, value: int) -> int:
        return self._size("height", value)

    def validate_steps(self, value: int) -> int:
        cap = limits()["MAX_STEPS"]
        if not 1 <= value <= cap:
            raise serializers.ValidationError(f"steps must be between 1 and {cap}, got {value}")
        return value

    def validate_guidance_scale(self, value: float) -> float:
        lo, hi = limits()["MIN_GUIDANCE"], limits()["MAX_GUIDANCE"]
        if not lo <= value <= hi:
            raise serializers.ValidationError(f"guidance_scale must be between {lo} and {hi}, got {value}")
        return value

    def validate_seed(self, value: int | None) -> int | None:
        if value is not None and value != -1 and not 0 <= value <= SEED_MAX:
            raise serializers.ValidationError(f"seed must be between 0 and {SEED_MAX}, or -1 for random, got {value}")
        return value

    def validate_num_images(self, value: int) -> int:
        cap = limits()["MAX_NUM_IMAGES"]
        if not 1 <= value <= cap:
            raise serializers.ValidationError(f"num_images must be between 1 and {cap}, got {value}")
        return value

    def validate_scheduler(self, value: str | None) -> str | None:
        if value in (None, "", "default"):
            return None
        if value not in SCHEDULER_NAMES:
            raise serializers.ValidationError(
                f"scheduler must be one of {', '.join(SCHEDULER_NAMES)} (or omitted for the model's default), got {value[:50]!r}"
            )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        model_id = attrs.get("model_id") or settings.DEFAULT_MODEL
        catalog = model_catalog()
        if model_id not in catalog:
            raise serializers.ValidationError(
                {
                    "model_id": [
                        f"model_id must be one of {', '.join(sorted(catalog))}, got {model_id!r} (DEFAULT_MODEL)"
                    ]
                }
            )
        spec: ModelSpec = catalog[model_id]
        width = attrs.get("width") or spec.default_size
        height = attrs.get("height") or spec.default_size
        too_big: dict[str, list[str]] = {}
        for name, value in (("width", width), ("height", height)):
            if attrs.get(name) is None:
                # The model's default size obeys the operator's limits too (both sides named).
                try:
                    self._size(name, value)
                except serializers.ValidationError as exc:
                    too_big[name] = [f"{exc.detail[0]} (the default size of {model_id}); ask for a smaller {name}"]
        if too_big:
            raise serializers.ValidationError(too_big)
        steps = attrs.get("steps") or spec.default_steps
        steps = min(steps, limits()["MAX_STEPS"])
        num_images = attrs.get("num_images", 1)
        work = width * height * num_images * steps
        cap = limits()["MAX_TOTAL_WORK"]
        if work > cap:
            raise serializers.ValidationError(
                {
                    "non_field_errors": [
                        f"width x height x num_images x steps must be at most {cap}, got "
                        f"{width}x{height}x{num_images}x{steps} = {work}"
                    ]
                }
            )
        seed = attrs.get("seed")
        guidance = attrs.get("guidance_scale")
        prompt, loras = resolve_loras(attrs["prompt"], attrs.get("loras") or [], spec)
        check_prompt_syntax(prompt=prompt, negative_prompt=attrs.get("negative_prompt", ""))
        attrs["resolved"] = GenerationParams(
            kind=self.kind,
            model_id=model_id,
            prompt=prompt,
            negative_prompt=attrs.get("negative_prompt", ""),
            width=width,
            height=height,
            steps=steps,
            guidance_scale=spec.default_guidance_scale if guidance is None else guidance,
            seed=random_seed() if seed is None or seed == -1 else seed,
            num_images=num_images,
            scheduler=attrs.get("scheduler"),
            strength=attrs.get("strength"),
            mask_blur=attrs.get("mask_blur"),
            loras=loras,
        )
        return attrs


def check_prompt_syntax(*, prompt: str, negative_prompt: str) -> None:
    """A1111 weighting that can't be read (``(red:1.2.3)``), and ``<lora:>`` tags where they
    have no meaning (the negative prompt), are refused before anything is queued."""
    from backend.prompts import PromptSyntaxError, extract_lora_tags, parse_attention

    try:
        _, negative_tags = extract_lora_tags(negative_prompt)
    except PromptSyntaxError:
        negative_tags = [("", 0.0)]  # a malformed tag is still a tag
    if negative_tags:
        raise serializers.ValidationError(
            {"negative_prompt": ["<lora:...> tags apply LoRAs from the prompt only; remove them from negative_prompt"]}
        )
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        try:
            parse_attention(text)
        except PromptSyntaxError as exc:
            raise serializers.ValidationError({name: [str(exc)]}) from None


def resolve_loras(prompt: str, requested: list[dict[str, Any]], spec: ModelSpec) -> tuple[str, tuple[LoraRef, ...]]:
    """The ``loras`` field and the prompt's ``<lora:name:weight>`` tags (removed from the text)
    as one checked list: known names only (a name is a key of LORA_DIR's listing, never a
    path), bounded weights, at most MAX_LORAS, and made for the model's family."""
    from backend.loras import lora_incompatibility
    from backend.prompts import PromptSyntaxError, extract_lora_tags

    from .selectors import lora_catalog

    try:
        prompt, tags = extract_lora_tags(prompt)
    except PromptSyntaxError as exc:
        raise serializers.ValidationError({"prompt": [str(exc)]}) from None
    if not prompt.strip():
        raise serializers.ValidationError({"prompt": ["prompt must not be blank once its <lora:...> tags are removed"]})
    wanted = [(item["name"], item["weight"]) for item in requested] + tags
    lim = limits()
    if len(wanted) > lim["MAX_LORAS"]:
        raise serializers.ValidationError(
            {
                "loras": [
                    f"at most {lim['MAX_LORAS']} LoRAs per request (the loras field and <lora:> tags together), got {len(wanted)}"
                ]
            }
        )
    if wanted:
        from backend.router import current_mode

        if current_mode() == "remote":
            raise serializers.ValidationError(
                {
                    "loras": [
                        "LoRAs run on local models only (USE_LOCAL_MODELS=false sends work to the Hugging Face Inference API)"
                    ]
                }
            )
    available = lora_catalog() if wanted else {}
    refs: dict[str, LoraRef] = {}
    for name, weight in wanted:
        lo, hi = lim["MIN_LORA_WEIGHT"], lim["MAX_LORA_WEIGHT"]
        if not lo <= weight <= hi:
            raise serializers.ValidationError(
                {"loras": [f"the weight of LoRA {name[:100]!r} must be between {lo} and {hi}, got {weight}"]}
            )
        lora = available.get(name)
        if lora is None:
            names = ", ".join(sorted(available)[:50]) or "none (LORA_DIR is empty)"
            raise serializers.ValidationError({"loras": [f"unknown LoRA {name[:100]!r}; available: {names}"]})
        problem = lora_incompatibility(lora, family=spec.family, cross_attention_dim=None)
        if problem:
            raise serializers.ValidationError({"loras": [f"{problem} (model {spec.id!r} is {spec.family})"]})
        # The same LoRA twice (field and tag): the last weight wins, as A1111 does.
        refs[name] = LoraRef(name=name, weight=float(weight), sha256=lora.sha256)
    return prompt, tuple(refs.values())


class Img2ImgRequestSerializer(Txt2ImgRequestSerializer):
    kind = "img2img"

    image = ImageInputField()
    strength = FiniteFloatField(required=False, default=0.75)

    def validate_strength(self, value: float) -> float:
        if not 0 < value <= 1:
            raise serializers.ValidationError(f"strength must be in (0, 1], got {value}")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        params: GenerationParams = attrs["resolved"]
        effective = int(params.steps * params.strength)
        if effective < 1:
            raise serializers.ValidationError(
                {
                    "strength": [
                        f"steps x strength must be at least 1, got {params.steps} x {params.strength} = {params.steps * params.strength:g}"
                    ]
                }
            )
        return attrs


class MaskInputField(ImageInputField):
    default_error_messages = {
        "required": "mask is required for inpaint (white = repaint, black = keep; a multipart file or base64 string)"
    }


class InpaintRequestSerializer(Img2ImgRequestSerializer):
    """img2img plus a mask: white repaints, black keeps. A mask of another size is resized."""

    kind = "inpaint"

    mask = MaskInputField()
    mask_blur = StrictIntegerField(required=False, default=4)

    def validate_mask_blur(self, value: int) -> int:
        if not 0 <= value <= 64:
            raise serializers.ValidationError(f"mask_blur must be between 0 and 64 pixels, got {value}")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        from backend.router import current_mode

        # Refused here, before anything is stored or queued: the remote backend can't do it.
        if current_mode() == "remote":
            raise serializers.ValidationError(
                {
                    "mask": [
                        "inpainting runs on local models only (USE_LOCAL_MODELS=false sends work to the "
                        "Hugging Face Inference API, which has no inpainting task)"
                    ]
                }
            )
        return super().validate(attrs)


# --- responses ----------------------------------------------------------------------------


# Thumbnails known to exist in a bucket (MEDIA_STORAGE=s3), so a history page doesn't ask the
# bucket about each one every time; a name is never reused, and its row goes before its files.
_S3_THUMBNAILS_SEEN: set[str] = set()
_S3_THUMBNAILS_SEEN_MAX = 50_000


def _thumbnail_exists(name: str) -> bool:
    from . import storage

    if storage.is_local():
        return storage.exists(name)  # one stat
    if name in _S3_THUMBNAILS_SEEN:
        return True
    if not storage.exists(name):
        return False
    if len(_S3_THUMBNAILS_SEEN) >= _S3_THUMBNAILS_SEEN_MAX:
        _S3_THUMBNAILS_SEEN.clear()
    _S3_THUMBNAILS_SEEN.add(name)
    return True


class ImageSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()

    class Meta:
        model = GeneratedImage
        fields = ["url", "thumbnail_url", "seed", "width", "height", "index"]

    def get_url(self, obj: GeneratedImage) -> str:
        from . import storage

        # A webhook payload has no request: absolute against the address the job's request came through.
        return storage.url(obj.file, self.context.get("request"), self.context.get("base_url", ""))

    @extend_schema_field(
        {
            "type": "string",
            "format": "uri",
            "nullable": True,
            "description": "A WebP of at most 256 pixels a side, beside the PNG; null for images saved before thumbnails existed.",
        }
    )
    def get_thumbnail_url(self, obj: GeneratedImage) -> str | None:
        from . import storage
        from .images import thumbnail_name

        name = thumbnail_name(obj.file)
        if not _thumbnail_exists(name):
            return None
        return storage.url(name, self.context.get("request"), self.context.get("base_url", ""))


class GenerationSerializer(serializers.ModelSerializer):
    images = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    params = serializers.JSONField(read_only=True)
    error = serializers.SerializerMethodField()
    webhook = serializers.SerializerMethodField()

    class Meta:
        model = Generation
        fields = [
            "id",
            "status",
            "kind",
            "model_id",
            "params",
            "images",
            "seed",
            "error",
            "warnings",
            "progress",
            "backend",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
            "timings",
            "webhook",
        ]

    @extend_schema_field({"type": "object", "nullable": True})
    def get_webhook(self, obj: Generation) -> dict[str, Any] | None:
        """The webhook the request asked for, and each delivery's state and attempts."""
        if not obj.webhook_url:
            return None
        deliveries = [
            {
                "event": d.event,
                "id": d.msg_id,
                "state": d.state,
                "attempts": d.attempts,
                "last_status_code": d.last_status_code,
                "last_error": d.last_error or None,
                "next_attempt_at": d.next_attempt_at if d.state == "pending" else None,
                "delivered_at": d.delivered_at,
            }
            for d in obj.webhook_deliveries.all()
        ]
        return {"url": obj.webhook_url, "events": obj.webhook_events, "deliveries": deliveries}

    @extend_schema_field(ImageSerializer(many=True))
    def get_images(self, obj: Generation) -> list[dict[str, Any]]:
        images = ImageSerializer(obj.images.all(), many=True, context=self.context).data
        if self.context.get("b64_json") and images:
            from .services.jobs import image_b64

            for data, image in zip(images, obj.images.all(), strict=True):
                data["b64_json"] = image_b64(image)
        return images

    @extend_schema_field({"type": "object", "nullable": True})
    def get_error(self, obj: Generation) -> dict[str, Any] | None:
        # The row also keeps the HTTP status a sync request answers with; clients get code + message.
        if not isinstance(obj.error, dict):
            return obj.error
        return {k: v for k, v in obj.error.items() if k in ("code", "message")}

    def get_progress(self, obj: Generation) -> dict[str, Any] | None:
        progress = dict(obj.progress or {})
        progress.pop("at", None)  # when the step ended: for the event stream's latency, not the resource
        if obj.status == "queued":
            from .selectors import queue_position

            progress["queue_position"] = queue_position(generation=obj)
        return progress or None
