"""The OpenAPI description of the API: bodies only the schema needs, the key scheme, limits.

Nothing here runs on a request. The serializers that validate and render live in
``serializers.py``; this module says what they accept and return, in OpenAPI terms, with
the limits of the running configuration filled in.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema_field
from rest_framework import serializers

from backend.params import SEED_MAX
from backend.schedulers import SCHEDULER_NAMES

from .selectors import model_catalog
from .serializers import Img2ImgRequestSerializer, InpaintRequestSerializer

# --- authentication ---------------------------------------------------------------------------


# Where the described protocols live: the native API, OpenAI Images, A1111 (with its
# /internal/ping) and the HF task route. Admin, the playground, media and /metrics are not API.
DESCRIBED_PREFIXES = ("/api/", "/v1/", "/sdapi/v1/", "/internal/ping", "/models/")


def described_endpoints(endpoints: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Every protocol's endpoints, the foreign ones at the paths their clients send.

    A catch-all route (a ``.*`` pattern that answers "not found" in its protocol's shape) is
    no operation. The foreign protocols' routes accept an optional trailing slash; their
    clients send none, so neither does the schema.
    """
    described = []
    for path, path_regex, method, callback in endpoints:
        if not path.startswith(DESCRIBED_PREFIXES) or ".*" in path_regex:
            continue
        if not path.startswith("/api/") and path_regex.endswith("/?$"):
            path = path.rstrip("/")
        described.append((path, path_regex, method, callback))
    return described


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """``Authorization: Bearer <key>``; optional while the server runs with AUTH_REQUIRED off."""

    target_class = "api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        scheme = build_bearer_security_scheme_object(header_name="Authorization", token_prefix="Bearer")
        scheme["description"] = (
            "An API key from `manage.py create_api_key NAME`, sent as `Authorization: Bearer <key>`. "
            "Required on every endpoint but /api/health/ when the server runs with AUTH_REQUIRED=true."
        )
        return scheme

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        # {} is OpenAPI's "no credentials needed": a key is optional while auth is off.
        return [{self.name: []}] if settings.AUTH_REQUIRED else [{self.name: []}, {}]


class ClientKeyScheme(OpenApiAuthenticationExtension):
    """The foreign protocols' clients: the key as a Bearer token (the ApiKey scheme), or as
    the password of Basic auth (Open WebUI, SillyTavern); with AUTH_REQUIRED off, an unknown
    key is anonymous."""

    target_class = "api.auth.ClientCompatibleAuthentication"
    # Its own name only for Basic: a scheme name belongs to one authentication class, and
    # ApiKey is defined by the native API's, which every schema includes.
    name = "ApiKeyBasic"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "basic",
            "description": "The API key as the password of Basic auth; the user name is ignored.",
        }

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        required = [{ApiKeyScheme.name: []}, {self.name: []}]
        return required if settings.AUTH_REQUIRED else [*required, {}]


# --- errors -------------------------------------------------------------------------------------


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="A stable machine word, e.g. invalid_request, not_found, rate_limited.")
    message = serializers.CharField(help_text="One sentence for a person.")

    class Meta:
        ref_name = "ErrorDetail"

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # "fields" would shadow Serializer.fields as a class attribute.
        fields["fields"] = serializers.DictField(
            child=serializers.ListField(child=serializers.CharField()),
            required=False,
            help_text="Validation errors only: field name -> messages (non_field_errors for whole-request rules).",
        )
        return fields


class ErrorResponseSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()

    class Meta:
        ref_name = "ErrorResponse"


_ERROR_DESCRIPTIONS = {
    400: "Invalid input, refused before anything was queued (`invalid_request`, with `fields`).",
    401: "No API key, or one that is unknown or revoked (`not_authenticated`, `authentication_failed`).",
    404: "No such generation, or one another key owns (`not_found`).",
    409: "The generation already finished (`already_finished`).",
    413: "The request body is over the size limit; it was refused unparsed (`request_too_large`).",
    415: "The body's Content-Type is not one this endpoint reads (`unsupported_media_type`).",
    422: "This Idempotency-Key was already used with different parameters (`idempotency_key_reused`).",
    429: "Over the rate limit (`rate_limited`); see Retry-After.",
    500: "The server hit an unexpected error.",
    502: "The remote inference service answered with an error.",
    503: "The queue, the model or the device is unavailable, or the server is full (`queue_unavailable`, `queue_full`, `model_unavailable`, ...); see Retry-After.",
    504: "The remote inference service timed out.",
}

# A synchronous generation that fails answers with the generation resource itself, under the
# status its error maps to. Its ``error`` carries the same {code, message}, so the body
# matches ErrorResponse as well.
_FAILED_GENERATION = " Also: a synchronous generation that failed this way, as the generation resource, whose `error` has the same shape."
_GENERATION_FAILURE_STATUSES = (400, 429, 500, 502, 503, 504)


def error_responses(
    *statuses: int, generation: bool = False, why: dict[int, str] | None = None
) -> dict[int, OpenApiResponse]:
    """The error responses an operation can give, each in the one error shape.

    ``why`` replaces the usual description of a status where this operation differs.
    """
    out = {}
    for code in statuses:
        description = (why or {}).get(code) or _ERROR_DESCRIPTIONS[code]
        if generation and code in _GENERATION_FAILURE_STATUSES:
            description += _FAILED_GENERATION
        out[code] = OpenApiResponse(ErrorResponseSerializer, description=description)
    return out


# How the generation endpoints differ from the usual descriptions above.
GENERATION_ERRORS = {
    429: "Over the rate limit (`rate_limited`), or this key's queued plus running jobs are at their cap "
    "(`too_many_active_jobs`); see Retry-After.",
}
PAGE_ERRORS = {404: "No such page (`not_found`)."}


# --- the generation resource -------------------------------------------------------------------


class ImageDocSerializer(serializers.Serializer):
    url = serializers.CharField(help_text="Absolute URL of the PNG.")
    seed = serializers.IntegerField(min_value=0, max_value=SEED_MAX, help_text="Reproduces this image alone.")
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    index = serializers.IntegerField(min_value=0)
    b64_json = serializers.CharField(
        required=False, help_text='The PNG as base64; only with response_format "b64_json".'
    )

    class Meta:
        ref_name = "Image"


class GenerationErrorDocSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()

    class Meta:
        ref_name = "GenerationError"


class ProgressDocSerializer(serializers.Serializer):
    step = serializers.IntegerField(required=False)
    total_steps = serializers.IntegerField(required=False)
    fraction = serializers.FloatField(required=False, min_value=0, max_value=1)
    queue_position = serializers.IntegerField(required=False, help_text="While queued: 1 for the next job to run.")

    class Meta:
        ref_name = "Progress"


class ParamsDocSerializer(serializers.Serializer):
    """The resolved parameters: the request with every default filled in."""

    kind = serializers.ChoiceField(choices=["txt2img", "img2img", "inpaint"])
    model_id = serializers.CharField()
    prompt = serializers.CharField()
    negative_prompt = serializers.CharField(allow_blank=True)
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    steps = serializers.IntegerField()
    guidance_scale = serializers.FloatField()
    seed = serializers.IntegerField(min_value=0, max_value=SEED_MAX)
    num_images = serializers.IntegerField()
    scheduler = serializers.CharField(allow_null=True)
    strength = serializers.FloatField(allow_null=True, help_text="img2img and inpaint only.")
    mask_blur = serializers.IntegerField(allow_null=True, help_text="inpaint only.")
    loras = serializers.ListField(
        child=serializers.DictField(), help_text="The LoRAs applied: name, weight, and the sha256 of the file."
    )
    versions = serializers.DictField(
        child=serializers.CharField(), required=False, help_text="Library versions that shaped the image."
    )
    prompt_tokens = serializers.IntegerField(required=False, help_text="CLIP tokens of the prompt, once finished.")

    class Meta:
        ref_name = "GenerationParams"


class WebhookDeliveryDocSerializer(serializers.Serializer):
    event = serializers.ChoiceField(choices=["completed", "failed", "cancelled"])
    id = serializers.CharField(help_text="The webhook-id header: the same on every retry of this message.")
    state = serializers.ChoiceField(choices=["pending", "delivered", "failed"])
    attempts = serializers.IntegerField(min_value=0)
    last_status_code = serializers.IntegerField(allow_null=True)
    last_error = serializers.CharField(allow_null=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    delivered_at = serializers.DateTimeField(allow_null=True)


class WebhookDocSerializer(serializers.Serializer):
    url = serializers.CharField()
    events = serializers.ListField(child=serializers.ChoiceField(choices=["completed", "failed", "cancelled"]))
    deliveries = WebhookDeliveryDocSerializer(many=True)


class GenerationDocSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=["queued", "running", "succeeded", "failed", "cancelled"])
    kind = serializers.ChoiceField(choices=["txt2img", "img2img", "inpaint"])
    model_id = serializers.CharField()
    params = ParamsDocSerializer()
    images = ImageDocSerializer(many=True)
    seed = serializers.IntegerField(
        min_value=0, max_value=SEED_MAX, help_text="The seed of image 0; image i used seed + i."
    )
    error = GenerationErrorDocSerializer(allow_null=True)
    warnings = serializers.ListField(child=serializers.CharField(), help_text="E.g. that the prompt was truncated.")
    progress = ProgressDocSerializer(allow_null=True)
    backend = serializers.CharField(allow_blank=True, help_text='"local" or "remote"; empty until it ran.')
    attempts = serializers.IntegerField(min_value=0)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    timings = serializers.DictField(child=serializers.FloatField(), help_text="Seconds per stage.")
    webhook = WebhookDocSerializer(
        allow_null=True, help_text="The webhook the request asked for and its deliveries; null without one."
    )


class GenerationSchema(OpenApiSerializerExtension):
    """The generation resource as its serializer renders it (its fields are JSON and methods)."""

    target_class = "api.serializers.GenerationSerializer"

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return auto_schema._map_serializer(GenerationDocSerializer, direction)


# --- requests -----------------------------------------------------------------------------------


def _number(schema: dict[str, Any], **bounds: Any) -> None:
    schema.update({k: v for k, v in bounds.items() if v is not None})


class GenerationRequestSchema(OpenApiSerializerExtension):
    """The request serializers, with the limits of the running configuration as bounds."""

    target_class = "api.serializers.Txt2ImgRequestSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        props = schema["properties"]
        lim = settings.GENERATION_LIMITS
        props["prompt"].update(minLength=1, maxLength=lim["MAX_PROMPT_CHARS"])
        props["negative_prompt"]["maxLength"] = lim["MAX_PROMPT_CHARS"]
        props["model_id"].update(
            enum=sorted(model_catalog()),
            description="An id from GET /api/models/; default: the server's DEFAULT_MODEL.",
        )
        for name in ("width", "height"):
            _number(props[name], minimum=lim["MIN_SIZE"], maximum=lim["MAX_SIZE"], multipleOf=8)
            props[name]["description"] = "Default: the model's default_size."
        _number(props["steps"], minimum=1, maximum=lim["MAX_STEPS"])
        props["steps"]["description"] = "Default: the model's default_steps."
        _number(props["num_images"], minimum=1, maximum=lim["MAX_NUM_IMAGES"])
        _number(props["guidance_scale"], minimum=lim["MIN_GUIDANCE"], maximum=lim["MAX_GUIDANCE"])
        _number(props["seed"], minimum=-1, maximum=SEED_MAX)
        props["seed"]["description"] = "Omitted, null or -1: the server picks one and returns it."
        props["scheduler"].update(
            enum=[*SCHEDULER_NAMES, "default", "", None],
            description="Omitted, null, empty or default: the model's own scheduler.",
        )
        props["async"]["description"] = (
            "true (or the header Prefer: respond-async): answer 202 at once with the queued generation."
        )
        if "strength" in props:
            _number(props["strength"], minimum=0, exclusiveMinimum=True, maximum=1)
            props["strength"]["description"] = (
                "How far to move from the image, in (0, 1]; steps x strength must be at least 1."
            )
        if "mask_blur" in props:
            _number(props["mask_blur"], minimum=0, maximum=64)
            props["mask_blur"]["description"] = (
                "Pixels of blur on the mask's edge where the result is pasted over the original."
            )
        if isinstance(self.target, Img2ImgUploadRequestSerializer | InpaintUploadRequestSerializer):
            # A form field is always a string: "null" there is not JSON's null.
            for prop in props.values():
                prop.pop("nullable", None)
            props["scheduler"]["enum"].remove(None)
        schema["additionalProperties"] = False
        schema["description"] = (
            f"width x height x num_images x steps must be at most {lim['MAX_TOTAL_WORK']}. Unknown fields are refused."
        )
        return schema


@extend_schema_field(OpenApiTypes.BINARY)
class _UploadField(serializers.FileField):
    """A file part (FileField alone reads as a URL in a schema without split request components)."""


class Img2ImgUploadRequestSerializer(Img2ImgRequestSerializer):
    """img2img as multipart/form-data: the image as a file part, the other fields as in JSON."""

    image = _UploadField(help_text="PNG, JPEG or WebP, checked by content, not by name.")

    class Meta:
        ref_name = "Img2ImgUploadRequest"


class InpaintUploadRequestSerializer(InpaintRequestSerializer):
    """inpaint as multipart/form-data: the image and the mask as file parts."""

    image = _UploadField(help_text="PNG, JPEG or WebP, checked by content, not by name.")
    mask = _UploadField(help_text="White repaints, black keeps; resized to the image when its size differs.")

    class Meta:
        ref_name = "InpaintUploadRequest"


# --- headers ------------------------------------------------------------------------------------

GENERATION_HEADERS = [
    OpenApiParameter(
        "Idempotency-Key",
        {"type": "string", "maxLength": 255},
        OpenApiParameter.HEADER,
        description="A retried request with the same key (and the same body) returns the first generation; "
        "the same key with another body gets 422.",
    ),
    OpenApiParameter(
        "Prefer",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="respond-async: answer 202 at once, like `async: true`.",
    ),
]


# --- request examples ---------------------------------------------------------------------------

# A 64x64 blue PNG: small enough for any upload limit.
_EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAUUlEQVR42u3PMQ0AMAgAMJhMlCARWVPBQdI6aFZPXPbiOAEB"
    "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAYF9H4hVAhoavLyNAAAAAElFTkSuQmCC"
)

TXT2IMG_EXAMPLES = [
    OpenApiExample(
        "A prompt, the model's defaults",
        value={"prompt": "a watercolor fox in the snow", "negative_prompt": "blurry", "seed": 42},
        request_only=True,
    ),
    OpenApiExample(
        "Queued, answered at once",
        value={"prompt": "a lighthouse at dusk", "num_images": 2, "response_format": "b64_json", "async": True},
        request_only=True,
    ),
]

IMG2IMG_EXAMPLES = [
    OpenApiExample(
        "A base64 image",
        value={"prompt": "the same scene at night", "image": _EXAMPLE_PNG_B64, "strength": 0.75, "seed": 7},
        request_only=True,
        media_type="application/json",
    ),
]


INPAINT_EXAMPLES = [
    OpenApiExample(
        "A base64 image and mask",
        value={"prompt": "a red door", "image": _EXAMPLE_PNG_B64, "mask": _EXAMPLE_PNG_B64, "strength": 0.9},
        request_only=True,
        media_type="application/json",
    ),
]


# --- the other endpoints ------------------------------------------------------------------------


class LoraDocSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The key a request names it by (the file name without .safetensors).")
    family = serializers.ChoiceField(
        choices=["sd15", "sd2", "sdxl"], allow_null=True, help_text="Detected from its keys; null when they don't say."
    )
    key_format = serializers.ChoiceField(choices=["kohya", "diffusers", "peft"])
    size = serializers.IntegerField(help_text="Bytes.")
    sha256 = serializers.CharField()
    trigger_words = serializers.ListField(child=serializers.CharField())

    class Meta:
        ref_name = "Lora"


class EmbeddingDocSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The token a prompt uses it by.")
    family = serializers.ChoiceField(choices=["sd15", "sd2", "sdxl"], allow_null=True)
    vectors = serializers.IntegerField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()

    class Meta:
        ref_name = "Embedding"


class ModelDocSerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    family = serializers.ChoiceField(choices=["sd15", "sd2", "sdxl"])
    default_size = serializers.IntegerField()
    default_steps = serializers.IntegerField()
    default_guidance_scale = serializers.FloatField()
    source = serializers.ChoiceField(choices=["hub", "local", "builtin"])
    repo = serializers.CharField(allow_null=True)
    revision = serializers.CharField(allow_null=True)
    variant = serializers.CharField(allow_null=True)
    prediction_type = serializers.CharField(allow_null=True)
    description = serializers.CharField(allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField())
    location = serializers.CharField(help_text="hf://owner/name, builtin://id, or local.")
    pipelines = serializers.DictField(child=serializers.CharField(), help_text="diffusers pipeline class per kind.")
    loaded = serializers.BooleanField(
        help_text="Whether it is loaded: in the web process (QUEUE=thread), or on any live worker (QUEUE=celery)."
    )
    loaded_on = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="QUEUE=celery only: the names of the live workers that hold it loaded.",
    )
    # A plain string: the same choice set as Status.mode would need a second enum name.
    runs_on = serializers.CharField(help_text='Where it runs: "local" or "remote", as mode in /api/status/.')
    default = serializers.BooleanField(help_text="Whether this is the server's DEFAULT_MODEL.")

    class Meta:
        ref_name = "Model"


class DeviceInfoDocSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    name = serializers.CharField()
    capability = serializers.CharField()
    total_memory_mb = serializers.IntegerField()
    free_memory_mb = serializers.IntegerField(
        allow_null=True, help_text="Null for a GPU this process hasn't used (asking would open a CUDA context on it)."
    )
    allocated_memory_mb = serializers.IntegerField()
    reserved_memory_mb = serializers.IntegerField()
    worker = serializers.CharField(
        required=False,
        help_text="QUEUE=celery, in the top-level system_info only: the worker that has this GPU "
        "(index is the index that worker sees).",
    )

    class Meta:
        ref_name = "DeviceInfo"


class SystemInfoDocSerializer(serializers.Serializer):
    python_version = serializers.CharField()
    pytorch_version = serializers.CharField()
    cuda_available = serializers.BooleanField()
    cuda_version = serializers.CharField(allow_null=True)
    cudnn_version = serializers.IntegerField(allow_null=True)
    device_count = serializers.IntegerField()
    devices = DeviceInfoDocSerializer(many=True)
    platform = serializers.CharField()
    devices_from = serializers.ChoiceField(
        choices=["web", "workers"],
        required=False,
        help_text="QUEUE=celery only. workers: cuda_available, cuda_version, cudnn_version, device_count "
        "and devices describe the GPUs of the live workers (some worker has one); the other fields, "
        "and all of them with web, describe the web process.",
    )

    class Meta:
        ref_name = "SystemInfo"


class QueueCountsDocSerializer(serializers.Serializer):
    queued = serializers.IntegerField()
    running = serializers.IntegerField()

    class Meta:
        ref_name = "QueueCounts"


class DevicePlanDocSerializer(serializers.Serializer):
    device = serializers.CharField()
    dtype = serializers.CharField()
    attention_slicing = serializers.BooleanField()
    vae_slicing = serializers.BooleanField()
    vae_tiling = serializers.BooleanField()
    cpu_offload = serializers.ChoiceField(choices=["off", "model", "sequential"])
    # Not required: a worker of an older release reports its plan without them (a rolling upgrade).
    channels_last = serializers.BooleanField(required=False)
    fuse_qkv = serializers.BooleanField(required=False)
    compile = serializers.ChoiceField(choices=["off", "default", "reduce-overhead", "max-autotune"], required=False)
    compile_shapes = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="WxHxbatch buckets warmed at load."
    )
    notes = serializers.ListField(child=serializers.CharField())

    class Meta:
        ref_name = "DevicePlan"


class WorkerDocSerializer(serializers.Serializer):
    """A live Celery worker process, as it last reported itself."""

    name = serializers.CharField(
        help_text="kind@host:pid/space, as a job's worker: the process that runs jobs (a prefork child)."
    )
    node = serializers.CharField(allow_null=True, help_text="The Celery node name (-n), e.g. gpu0@host.")
    hostname = serializers.CharField(allow_blank=True)
    pid = serializers.IntegerField(allow_null=True)
    queues = serializers.ListField(child=serializers.CharField(), help_text="The queues it consumes (-Q).")
    # A plain string: the same choice set as Status.mode would need a second enum name.
    mode = serializers.CharField(allow_null=True, help_text='"local" or "remote", as mode in /api/status/.')
    loaded_models = serializers.ListField(child=serializers.CharField(), help_text="Least recently used first.")
    device = DevicePlanDocSerializer(allow_null=True, help_text="How it runs inference; null in remote mode.")
    device_error = serializers.CharField(required=False, help_text="Why it has no device plan.")
    system_info = SystemInfoDocSerializer(help_text="Its own torch, CUDA and GPU facts.")
    current_job = serializers.CharField(allow_null=True, help_text="The id of the generation it is running.")
    started_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField(
        allow_null=True, help_text="Its last report; it reports every JOB_HEARTBEAT_INTERVAL seconds."
    )

    class Meta:
        ref_name = "Worker"


class StatusDocSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "degraded"])
    inference_available = serializers.BooleanField(
        help_text="QUEUE=celery: whether a live worker is there to run jobs (and, in remote mode, a token or URL)."
    )
    mode = serializers.ChoiceField(choices=["local", "remote"])
    queue_backend = serializers.ChoiceField(choices=["thread", "celery"])
    default_model = serializers.CharField()
    loaded_models = serializers.ListField(
        child=serializers.CharField(), help_text="QUEUE=celery: every model that some live worker holds."
    )
    queue = QueueCountsDocSerializer()
    system_info = SystemInfoDocSerializer(
        help_text="The web process; with QUEUE=celery its GPU fields may describe the workers (see devices_from)."
    )
    device = DevicePlanDocSerializer(
        allow_null=True,
        help_text="How local inference runs; null in remote mode, and with QUEUE=celery (see workers[].device).",
    )
    workers = WorkerDocSerializer(
        many=True, required=False, help_text="QUEUE=celery only: the live workers, by name; empty when none is seen."
    )
    detail = serializers.CharField(required=False, help_text="Why the status is degraded.")

    class Meta:
        ref_name = "Status"


class HealthDocSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok"])

    class Meta:
        ref_name = "Health"
