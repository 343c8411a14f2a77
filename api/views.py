"""Thin views: validate with a serializer, call one service, serialize the result."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .auth import GenerateRateThrottle, request_key
from .exceptions import ServiceUnavailable
from .models import FINISHED, Status
from .schema import (
    GENERATION_ERRORS,
    GENERATION_HEADERS,
    IMG2IMG_EXAMPLES,
    INPAINT_EXAMPLES,
    PAGE_ERRORS,
    TXT2IMG_EXAMPLES,
    EmbeddingDocSerializer,
    HealthDocSerializer,
    Img2ImgUploadRequestSerializer,
    InpaintUploadRequestSerializer,
    LoraDocSerializer,
    ModelDocSerializer,
    StatusDocSerializer,
    error_responses,
)
from .selectors import embedding_catalog, generation_get, generation_list, lora_catalog
from .serializers import (
    GenerationSerializer,
    Img2ImgRequestSerializer,
    InpaintRequestSerializer,
    Txt2ImgRequestSerializer,
)
from .services import backpressure, jobs, system, webhooks
from .services.events import EventStream, TooManyStreams, get_hub, parse_last_event_id


def _wants_async(request: Request, data: dict[str, Any]) -> bool:
    prefer = request.headers.get("Prefer", "")
    return bool(data.get("async")) or "respond-async" in [p.strip().lower() for p in prefer.split(",")]


def _generation_response(request: Request, generation: Any, *, http_status: int | None = None) -> Response:
    context = {"request": request, "b64_json": generation.response_format == "b64_json"}
    body = GenerationSerializer(generation, context=context).data
    headers = {}
    if generation.status not in FINISHED:
        headers["Location"] = request.build_absolute_uri(f"/api/results/{generation.id}/")
        return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)
    if http_status is None:
        http_status = 200
        if generation.status == Status.FAILED:
            http_status = int((generation.error or {}).get("http_status", 500))
            if http_status in (429, 503):
                headers["Retry-After"] = "30"
    return Response(body, status=http_status, headers=headers)


def _fingerprint(kind: str, data: dict[str, Any]) -> str:
    """What identifies a request for Idempotency-Key reuse: its inputs, before defaults."""
    material = {k: v for k, v in data.items() if k not in ("resolved", "image", "mask", "async")}
    digest = hashlib.sha256(json.dumps([kind, material], sort_keys=True, default=str).encode())
    for name in ("image", "mask"):
        if data.get(name) is not None:
            digest.update(name.encode() + data[name].tobytes())
    return digest.hexdigest()


class _GenerateView(APIView):
    serializer_class: type = Txt2ImgRequestSerializer
    throttle_classes = [GenerateRateThrottle]

    def post(self, request: Request) -> Response:
        idempotency_key = request.headers.get("Idempotency-Key", "").strip() or None
        if idempotency_key is not None and len(idempotency_key) > 255:
            raise ValidationError(
                {"Idempotency-Key": [f"Idempotency-Key must be at most 255 characters, got {len(idempotency_key)}"]}
            )
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        owner = request_key(request)
        webhook = None
        if data.get("webhook_url"):
            webhook = webhooks.webhook_request(
                url=data["webhook_url"],
                events=data.get("webhook_events"),
                owner=owner,
                base_url=request.build_absolute_uri("/"),
            )
        # Past MAX_SYNC_WAITERS a synchronous request gets no place to wait in: it is answered
        # like an async one (202 + Location) and its job runs all the same.
        slot = None if _wants_async(request, data) else backpressure.sync_slot_try()
        try:
            generation, _created = jobs.generation_create(
                params=data["resolved"],
                init_image=data.get("image"),
                mask_image=data.get("mask"),
                response_format=data.get("response_format", "url"),
                owner=owner,
                webhook=webhook,
                idempotency_key=idempotency_key,
                fingerprint=_fingerprint(serializer.kind, data) if idempotency_key else "",
            )
            if slot is not None and not generation.is_finished:
                generation = jobs.generation_wait(generation=generation, timeout=settings.SYNC_TIMEOUT)
        finally:
            if slot is not None:
                slot.release()
        return _generation_response(request, generation)


_GEN_RESPONSES = {
    200: OpenApiResponse(GenerationSerializer, description="The finished generation."),
    202: OpenApiResponse(
        GenerationSerializer,
        description="Queued (async, past SYNC_TIMEOUT, or past MAX_SYNC_WAITERS); Location names it.",
    ),
    **error_responses(400, 401, 413, 415, 422, 429, 500, 502, 503, 504, generation=True, why=GENERATION_ERRORS),
}


class Txt2ImgView(_GenerateView):
    serializer_class = Txt2ImgRequestSerializer

    @extend_schema(
        request={"application/json": Txt2ImgRequestSerializer},
        responses=_GEN_RESPONSES,
        parameters=GENERATION_HEADERS,
        examples=TXT2IMG_EXAMPLES,
        operation_id="txt2img",
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class Img2ImgView(_GenerateView):
    serializer_class = Img2ImgRequestSerializer

    @extend_schema(
        request={"application/json": Img2ImgRequestSerializer, "multipart/form-data": Img2ImgUploadRequestSerializer},
        responses=_GEN_RESPONSES,
        parameters=GENERATION_HEADERS,
        examples=IMG2IMG_EXAMPLES,
        operation_id="img2img",
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class InpaintView(_GenerateView):
    serializer_class = InpaintRequestSerializer

    @extend_schema(
        request={"application/json": InpaintRequestSerializer, "multipart/form-data": InpaintUploadRequestSerializer},
        responses=_GEN_RESPONSES,
        parameters=GENERATION_HEADERS,
        examples=INPAINT_EXAMPLES,
        operation_id="inpaint",
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


@extend_schema_view(
    list=extend_schema(
        responses={
            200: GenerationSerializer(many=True),
            **error_responses(
                400, 401, 404, 429, why={**PAGE_ERRORS, 400: "page_size is not a positive integer (`invalid_request`)."}
            ),
        }
    ),
    retrieve=extend_schema(responses={200: GenerationSerializer, **error_responses(401, 404, 429)}),
    destroy=extend_schema(
        responses={204: OpenApiResponse(description="Deleted, with its image files."), **error_responses(401, 404, 429)}
    ),
)
class ResultsViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    serializer_class = GenerationSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self):  # noqa: ANN201
        return generation_list(viewer=request_key(self.request))

    def get_object(self):  # noqa: ANN201
        from django.core.exceptions import ValidationError
        from django.http import Http404

        from .models import Generation

        try:
            return generation_get(generation_id=self.kwargs["pk"], viewer=request_key(self.request))
        except (Generation.DoesNotExist, ValidationError):
            raise Http404 from None

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        generation = self.get_object()
        context = {"request": request, "b64_json": generation.response_format == "b64_json"}
        return Response(GenerationSerializer(generation, context=context).data)

    def perform_destroy(self, instance: Any) -> None:
        jobs.generation_delete(generation=instance)

    @extend_schema(
        summary="Live events of one generation (server-sent events)",
        description=(
            "`text/event-stream`: `queued` (queue_position), `started`, `progress` (step, total_steps, "
            "fraction, eta_s, and `preview`, a base64 PNG of the latents, when a new one exists), then one of "
            "`completed` (the generation resource), `failed` or `cancelled`, after which the stream ends. "
            "Event ids grow with the job, so `Last-Event-ID` resumes; `: ping` comments keep it alive."
        ),
        responses={
            (200, "text/event-stream"): OpenApiResponse(description="The event stream."),
            **error_responses(401, 404, 429, 503),
        },
    )
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer])
    def events(self, request: Request, pk: str | None = None) -> Any:
        generation = self.get_object()  # 404 for another key's job, as for the resource
        hub = get_hub()
        try:
            watch = hub.watch(generation.pk)
        except TooManyStreams:
            raise ServiceUnavailable(
                f"this server already has {settings.SSE_MAX_STREAMS} event streams open (SSE_MAX_STREAMS); "
                "poll GET /api/results/<id>/ meanwhile, or try again shortly",
                code="too_many_streams",
                retry_after=5,
            ) from None

        def completed(generation_id: Any) -> dict[str, Any]:
            row = generation_get(generation_id=generation_id, viewer=request_key(request))
            context = {"request": request, "b64_json": row.response_format == "b64_json"}
            return GenerationSerializer(row, context=context).data

        # Streams of one job whose resource renders alike share the rendered events.
        completed.key = (request.scheme, request.get_host())  # type: ignore[attr-defined]

        last = parse_last_event_id(request.headers.get("Last-Event-ID") or request.query_params.get("last_event_id"))
        response = StreamingHttpResponse(
            EventStream(generation.pk, last_event_id=last, completed=completed, watch=watch, hub=hub),
            content_type="text/event-stream; charset=utf-8",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[Any, str]:
        if self.action == "events":
            # EventSource sends Accept: text/event-stream; errors still answer as JSON.
            return JSONRenderer(), JSONRenderer.media_type
        return super().perform_content_negotiation(request, force)

    @extend_schema(
        request=None,
        responses={
            200: OpenApiResponse(GenerationSerializer, description="Cancelled (or it finished meanwhile)."),
            202: OpenApiResponse(GenerationSerializer, description="Still running: it stops at its next step."),
            **error_responses(401, 404, 409, 429),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        generation = jobs.generation_cancel(generation=self.get_object())
        return _generation_response(request, generation, http_status=200 if generation.is_finished else None)


class ModelsView(APIView):
    @extend_schema(responses={200: ModelDocSerializer(many=True), **error_responses(401, 429)})
    def get(self, request: Request) -> Response:
        return Response(system.models_overview())


class LorasView(APIView):
    """The LoRAs in LORA_DIR (only ``*.safetensors``), scanned at each request."""

    @extend_schema(responses={200: LoraDocSerializer(many=True), **error_responses(401, 429)})
    def get(self, request: Request) -> Response:
        return Response([lora.public_dict() for _, lora in sorted(lora_catalog().items())])


class EmbeddingsView(APIView):
    """The textual-inversion embeddings in EMBEDDINGS_DIR; a prompt uses one by its name."""

    @extend_schema(responses={200: EmbeddingDocSerializer(many=True), **error_responses(401, 429)})
    def get(self, request: Request) -> Response:
        return Response([emb.public_dict() for _, emb in sorted(embedding_catalog().items())])


class StatusView(APIView):
    @extend_schema(responses={200: StatusDocSerializer, **error_responses(401, 429)})
    def get(self, request: Request) -> Response:
        return Response(system.status_overview())


class HealthView(APIView):
    """Cheap liveness: never loads a model or imports torch, and needs no key."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    throttle_classes: list[Any] = []

    @extend_schema(responses={200: HealthDocSerializer})
    def get(self, request: Request) -> Response:
        return Response({"status": "ok"})
