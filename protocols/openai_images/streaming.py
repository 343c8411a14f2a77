"""A running job as OpenAI image stream events.

The job is created without waiting; this generator polls its row, sends up to
``partial_images`` previews while it runs, then one ``completed`` event per image (or one
``error`` event). A client that hangs up cancels the job, as closing the generator tells.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from api.models import Generation
from api.selectors import generation_preview
from api.services import jobs
from protocols.common import Problem, generation_problem, problem_from, sse

from .encoding import encode_b64
from .errors import error_body
from .fields import ImagesRequest

log = logging.getLogger("protocols.openai_images")

POLL_S = 0.1
# A comment now and then: a proxy keeps the stream open, and a gone client is noticed
# (the server only learns of a hang-up when a write fails).
KEEPALIVE_S = 1.0

# Token counts are a GPT-image notion; the SDK's event type requires the object.
ZERO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def image_events(*, generation_id: Any, prefix: str, req: ImagesRequest) -> Iterator[bytes]:
    """``prefix`` is ``image_generation`` or ``image_edit``."""
    done = False
    try:
        # Inside the try: a client gone before the first event still has its job cancelled.
        yield b": stream open\n\n"
        row = Generation.objects.get(pk=generation_id)
        params = row.params or {}
        width, height = int(params.get("width", 0)), int(params.get("height", 0))
        common = {
            "background": "opaque",
            "output_format": req.output_format,
            "quality": req.quality,
            "size": f"{width}x{height}",
        }
        deadline = time.monotonic() + settings.SYNC_TIMEOUT
        sent, last_preview, last_write = 0, "", time.monotonic()
        while not row.is_finished and time.monotonic() < deadline:
            preview = generation_preview(generation_id=generation_id) if sent < req.partial_images else ""
            if preview and preview != last_preview:
                last_preview = preview
                b64 = encode_b64(
                    base64.b64decode(preview),
                    output_format=req.output_format,
                    compression=req.compression,
                    size=(width, height),
                )
                event = {"type": f"{prefix}.partial_image", "b64_json": b64, "created_at": int(time.time()), **common}
                yield sse({**event, "partial_image_index": sent}, event=event["type"])
                sent += 1
                last_write = time.monotonic()
            elif time.monotonic() - last_write >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_write = time.monotonic()
            time.sleep(POLL_S)
            try:
                row.refresh_from_db()
            except Generation.DoesNotExist:
                done = True
                raise Problem(404, "not_found", f"generation {generation_id} was deleted while it ran") from None
        problem = generation_problem(row)
        if problem is not None:
            # Unfinished past SYNC_TIMEOUT: like a synchronous request, the job goes on.
            done = True
            yield sse(error_body(problem), event="error")
            return
        for image in row.images.order_by("index"):
            b64 = encode_b64(jobs.image_bytes(image), output_format=req.output_format, compression=req.compression)
            created = int(row.finished_at.timestamp() if row.finished_at else time.time())
            event_type = f"{prefix}.completed"
            yield sse(
                {"type": event_type, "b64_json": b64, "created_at": created, **common, "usage": ZERO_USAGE},
                event=event_type,
            )
        done = True
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - becomes an error event; unknown ones are logged
        problem = exc if isinstance(exc, Problem) else problem_from(exc)
        yield sse(error_body(problem), event="error")
    finally:
        if not done:
            _cancel(generation_id)
        close_old_connections()


def _cancel(generation_id: Any) -> None:
    """The client went away (or the stream broke): stop the job it was waiting for."""
    try:
        row = Generation.objects.filter(pk=generation_id).first()
        if row is not None and not row.is_finished:
            jobs.generation_cancel(generation=row)
    except Exception:  # noqa: BLE001 - nobody is left to tell; keep the server quiet
        log.warning("could not cancel generation %s after its stream closed", generation_id, exc_info=True)
