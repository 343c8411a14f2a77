"""Failures in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``param`` is the OpenAI field a message is about. Native refusals name native fields, so
they are named back here (``width`` -> ``size``, ``num_images`` -> ``n``, ...).
"""

from __future__ import annotations

from rest_framework.response import Response

from protocols.common import Problem

# Native field -> the OpenAI request field a client wrote. Names not listed are the same on
# both sides (prompt, image, mask, seed, steps, ...) or are already OpenAI names.
PARAM_OF_NATIVE: dict[str, str | None] = {
    "width": "size",
    "height": "size",
    "num_images": "n",
    "model_id": "model",
    "non_field_errors": None,
    "request": None,
}

# Native problem codes -> the codes OpenAI uses for the same situation.
_CODE_OF: dict[str, str | None] = {
    "invalid_request": "invalid_value",
    "parse_error": "invalid_json",
    "not_authenticated": "invalid_api_key",
    "authentication_failed": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "not_found": None,
}


def error_type(status: int) -> str:
    # OpenAI answers 401 and 404 with invalid_request_error too; 429 with "requests".
    if status == 429:
        return "requests"
    return "invalid_request_error" if status < 500 else "server_error"


def error_param(problem: Problem) -> str | None:
    name = next(iter(problem.fields), None)
    if name is None:
        return None
    return PARAM_OF_NATIVE.get(name, name)


def error_body(problem: Problem) -> dict[str, dict[str, str | None]]:
    return {
        "error": {
            "message": problem.message,
            "type": error_type(problem.status),
            "param": error_param(problem),
            "code": _CODE_OF.get(problem.code, problem.code),
        }
    }


def error_response(problem: Problem) -> Response:
    response = Response(error_body(problem), status=problem.status)
    # The SDK retries 408/409/429/5xx; a refused request fails the same way again, and a
    # timed-out one is still running (a retry would start a second job).
    if 400 <= problem.status < 500 or problem.status == 504:
        response["x-should-retry"] = "false"
    if problem.status in (429, 503) and "Retry-After" not in problem.headers:
        response["Retry-After"] = "30"
    return response
