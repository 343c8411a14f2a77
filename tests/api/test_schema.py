"""The OpenAPI schema: valid with no warnings, and covering the REST contract of DESIGN.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# method, path: the REST contract's table.
CONTRACT = [
    ("post", "/api/txt2img/"),
    ("post", "/api/img2img/"),
    ("get", "/api/results/"),
    ("get", "/api/results/{id}/"),
    ("delete", "/api/results/{id}/"),
    ("post", "/api/results/{id}/cancel/"),
    ("get", "/api/models/"),
    ("get", "/api/status/"),
    ("get", "/api/health/"),
]

# The errors each operation must document, beyond what every keyed operation has (401, 429).
EXPECTED_ERRORS = {
    ("post", "/api/txt2img/"): {400, 413, 415, 422, 503},
    ("post", "/api/img2img/"): {400, 413, 415, 422, 503},
    ("get", "/api/results/"): {404},
    ("get", "/api/results/{id}/"): {404},
    ("delete", "/api/results/{id}/"): {404},
    ("post", "/api/results/{id}/cancel/"): {404, 409},
    ("get", "/api/models/"): set(),
    ("get", "/api/status/"): set(),
}

ERROR_REF = "#/components/schemas/ErrorResponse"


def build_schema() -> dict[str, Any]:
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


def test_spectacular_validates_the_schema_with_no_warning(tmp_path: Path) -> None:
    env = {**os.environ, "ENV_FILE": "none", "DJANGO_SETTINGS_MODULE": "config.settings_test"}
    out = tmp_path / "schema.yaml"
    result = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn", "--file", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert out.read_text().startswith("openapi: 3.")


def test_every_contract_operation_has_its_bodies_and_errors() -> None:
    schema = build_schema()
    paths = schema["paths"]
    for method, path in CONTRACT:
        assert method in paths.get(path, {}), f"{method.upper()} {path} is missing from the schema"
        operation = paths[path][method]
        responses = operation["responses"]
        successes = {int(code) for code in responses if code.startswith("2")}
        assert successes, f"{method.upper()} {path} documents no success"
        for code in successes:
            if code == 204:
                assert "content" not in responses[str(code)]
            else:
                assert "application/json" in responses[str(code)]["content"], (method, path, code)
        errors = {int(code) for code in responses if code[0] in "45"}
        for code in errors:
            body = responses[str(code)]["content"]["application/json"]["schema"]
            assert body == {"$ref": ERROR_REF}, f"{method.upper()} {path} {code} isn't the error shape"
            assert responses[str(code)]["description"]
        if path == "/api/health/":
            assert not errors and "security" not in operation
            continue
        expected = EXPECTED_ERRORS[(method, path)] | {401, 429}
        assert expected <= errors, f"{method.upper()} {path} lacks {sorted(expected - errors)}"


def test_the_error_shape_is_code_message_and_optional_fields() -> None:
    components = build_schema()["components"]["schemas"]
    assert components["ErrorResponse"]["required"] == ["error"]
    detail = components["ErrorDetail"]
    assert set(detail["properties"]) == {"code", "message", "fields"}
    assert sorted(detail["required"]) == ["code", "message"]
    assert detail["properties"]["fields"]["additionalProperties"]["items"]["type"] == "string"


def test_the_generation_resource_matches_its_serializer() -> None:
    from api.serializers import GenerationSerializer

    components = build_schema()["components"]["schemas"]
    generation = components["Generation"]
    assert set(generation["properties"]) == set(GenerationSerializer().fields)
    assert set(generation["required"]) == set(GenerationSerializer().fields)
    for name in ("error", "progress"):
        assert generation["properties"][name]["nullable"] is True, name
    assert generation["properties"]["images"]["items"] == {"$ref": "#/components/schemas/Image"}
    image = components["Image"]
    assert "b64_json" in image["properties"] and "b64_json" not in image["required"]
    assert {"url", "seed", "width", "height"} <= set(image["required"])
    assert components["GenerationStatusEnum"]["enum"] == ["queued", "running", "succeeded", "failed", "cancelled"]


def test_request_bodies_carry_every_field_and_the_content_types() -> None:
    from api.selectors import model_catalog

    schema = build_schema()
    components = schema["components"]["schemas"]
    txt2img = schema["paths"]["/api/txt2img/"]["post"]["requestBody"]["content"]
    assert set(txt2img) == {"application/json"}
    img2img = schema["paths"]["/api/img2img/"]["post"]["requestBody"]["content"]
    assert set(img2img) == {"application/json", "multipart/form-data"}

    request = components["Txt2ImgRequest"]
    assert request["required"] == ["prompt"]
    assert {
        "prompt",
        "negative_prompt",
        "model_id",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "num_images",
        "scheduler",
        "response_format",
        "async",
        "loras",
        "webhook_url",
        "webhook_events",
    } == set(request["properties"])
    assert request["properties"]["async"]["type"] == "boolean"
    for name in ("Img2ImgRequest", "Img2ImgUploadRequest"):
        assert set(components[name]["properties"]) == set(request["properties"]) | {"image", "strength"}
        assert sorted(components[name]["required"]) == ["image", "prompt"]
        assert components[name]["additionalProperties"] is False  # unknown fields get a 400
    assert request["additionalProperties"] is False
    assert components["ModelIdEnum"]["enum"] == sorted(model_catalog())
    assert components["Img2ImgRequest"]["properties"]["image"]["type"] == "string"
    assert components["Img2ImgUploadRequest"]["properties"]["image"]["format"] == "binary"
    headers = {p["name"] for p in schema["paths"]["/api/txt2img/"]["post"]["parameters"] if p["in"] == "header"}
    assert headers == {"Idempotency-Key", "Prefer"}


def test_request_bounds_follow_the_limits_in_force(settings) -> None:
    settings.GENERATION_LIMITS = {
        **settings.GENERATION_LIMITS,
        "MIN_SIZE": 64,
        "MAX_SIZE": 96,
        "MAX_STEPS": 3,
        "MAX_NUM_IMAGES": 2,
        "MAX_PROMPT_CHARS": 50,
    }
    props = build_schema()["components"]["schemas"]["Img2ImgRequest"]["properties"]
    assert (props["width"]["minimum"], props["width"]["maximum"], props["width"]["multipleOf"]) == (64, 96, 8)
    assert props["steps"]["maximum"] == 3
    assert props["num_images"]["maximum"] == 2
    assert props["prompt"]["maxLength"] == 50
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (-1, 2**32 - 1)
    assert props["strength"]["exclusiveMinimum"] is True and props["strength"]["maximum"] == 1


@pytest.mark.parametrize("required", [True, False])
def test_security_says_whether_a_key_is_required(settings, required: bool) -> None:
    settings.AUTH_REQUIRED = required
    schema = build_schema()
    assert schema["components"]["securitySchemes"]["ApiKey"]["type"] == "http"
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    security = schema["paths"]["/api/results/"]["get"]["security"]
    assert security == ([{"ApiKey": []}] if required else [{"ApiKey": []}, {}])


def test_schema_and_docs_are_served(client) -> None:
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
    assert client.get("/api/docs/").status_code == 200


def test_an_unrouted_api_path_answers_in_the_error_shape(client) -> None:
    response = client.get("/api/results/not-an-id/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": {"code": "not_found", "message": "Not found."}}
    assert client.get("/api/no-such-endpoint/").json()["error"]["code"] == "not_found"
    # Outside /api/, Django's own page stays.
    assert "application/json" not in client.get("/no-such-page/")["Content-Type"]


def test_an_error_outside_a_view_answers_in_the_error_shape(rf) -> None:
    from api.exceptions import server_error_view

    response = server_error_view(rf.get("/api/txt2img/"))
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert b"internal_error" in response.content
    assert "application/json" not in server_error_view(rf.get("/admin/"))["Content-Type"]


# method, path, tag: every operation of the foreign protocols (docs/compat.md), at the paths
# their clients send.
A1111_LISTINGS = (
    "sd-models samplers schedulers upscalers latent-upscale-modes sd-vae sd-modules loras hypernetworks "
    "face-restorers realesrgan-models prompt-styles extensions script-info embeddings scripts cmd-flags memory"
).split()
FOREIGN_OPERATIONS = [
    ("post", "/v1/images/generations", "OpenAI Images"),
    ("post", "/v1/images/edits", "OpenAI Images"),
    ("post", "/v1/images/variations", "OpenAI Images"),
    ("get", "/v1/models", "OpenAI Images"),
    ("get", "/v1/models/{model_id}", "OpenAI Images"),
    ("post", "/sdapi/v1/txt2img", "AUTOMATIC1111"),
    ("post", "/sdapi/v1/img2img", "AUTOMATIC1111"),
    ("get", "/sdapi/v1/options", "AUTOMATIC1111"),
    ("post", "/sdapi/v1/options", "AUTOMATIC1111"),
    ("get", "/sdapi/v1/progress", "AUTOMATIC1111"),
    ("post", "/sdapi/v1/interrupt", "AUTOMATIC1111"),
    ("post", "/sdapi/v1/skip", "AUTOMATIC1111"),
    ("post", "/sdapi/v1/png-info", "AUTOMATIC1111"),
    *[("post", f"/sdapi/v1/refresh-{what}", "AUTOMATIC1111") for what in ("checkpoints", "loras", "embeddings")],
    *[("get", f"/sdapi/v1/{name}", "AUTOMATIC1111") for name in A1111_LISTINGS],
    ("get", "/internal/ping", "AUTOMATIC1111"),
    ("post", "/models/{model_id}", "Hugging Face task"),
]
# Each protocol's own error shape.
FOREIGN_ERRORS = {
    "OpenAI Images": {"#/components/schemas/OpenAIError"},
    "AUTOMATIC1111": {"#/components/schemas/A1111HTTPError", "#/components/schemas/A1111ValidationError"},
    "Hugging Face task": {"#/components/schemas/HFError"},
}


def test_the_schema_describes_every_protocol_and_nothing_else() -> None:
    schema = build_schema()
    paths = schema["paths"]
    described = {(method, path) for path, operations in paths.items() for method in operations}
    foreign = {(method, path) for method, path, _ in FOREIGN_OPERATIONS}
    assert foreign <= described, sorted(foreign - described)
    native = {(method, path) for method, path in described if path.startswith("/api/")}
    assert set(CONTRACT) <= native
    # No admin, playground, media, /metrics, nor the catch-all routes that answer 404.
    assert described == native | foreign, sorted(described - native - foreign)
    ids = [op["operationId"] for operations in paths.values() for op in operations.values()]
    assert len(ids) == len(set(ids))

    for method, path, tag in FOREIGN_OPERATIONS:
        operation = paths[path][method]
        assert operation["tags"] == [tag], (method, path)
        responses = operation["responses"]
        assert "200" in responses, (method, path)
        errors = {code for code in responses if code[0] in "45"}
        assert errors, (method, path)
        for code in errors:
            ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
            assert ref in FOREIGN_ERRORS[tag], (method, path, code, ref)
            assert responses[code]["description"]
        if path != "/internal/ping":
            assert {"401", "429"} <= errors, (method, path)
            assert {"ApiKeyBasic": []} in operation["security"] and {"ApiKey": []} in operation["security"]
        else:
            assert "security" not in operation  # A1111 answers it without credentials

    a1111_422 = paths["/sdapi/v1/txt2img"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert a1111_422 == {"$ref": "#/components/schemas/A1111ValidationError"}


def test_the_foreign_bodies_are_the_ones_each_protocol_reads_and_answers(settings) -> None:
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_STEPS": 3, "MAX_NUM_IMAGES": 2}
    schema = build_schema()
    paths, components = schema["paths"], schema["components"]["schemas"]

    def body(path: str) -> dict[str, Any]:
        return paths[path]["post"]["requestBody"]["content"]

    assert set(body("/v1/images/generations")) == {"application/json"}
    assert set(body("/v1/images/edits")) == {"application/json", "multipart/form-data"}
    assert set(body("/v1/images/variations")) == {"application/json", "multipart/form-data"}
    assert set(body("/sdapi/v1/txt2img")) == {"application/json"}
    assert set(body("/models/{model_id}")) == {"application/json", "text/plain"}

    generation = components["OpenAIImageGenerationRequest"]
    assert generation["required"] == ["prompt"] and generation["additionalProperties"] is False
    assert generation["properties"]["n"]["maximum"] == 2
    edit = components["OpenAIImageEditRequest"]["properties"]
    assert edit["image"]["format"] == edit["mask"]["format"] == "binary"
    assert edit["image[]"]["items"]["format"] == "binary"
    streamed = paths["/v1/images/generations"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    assert set(components["OpenAIError"]["properties"]["error"]["required"]) == {"message", "type", "param", "code"}

    a1111 = components["A1111Txt2ImgRequest"]
    assert a1111["required"] == ["prompt"] and "additionalProperties" not in a1111  # the rest is ignored
    assert a1111["properties"]["steps"]["maximum"] == 3
    assert sorted(components["A1111Img2ImgRequest"]["required"]) == ["init_images", "prompt"]
    assert components["A1111GenerationResponse"]["required"] == ["images", "parameters", "info"]

    hf = paths["/models/{model_id}"]["post"]
    answer = hf["responses"]["200"]
    assert set(answer["content"]) == {"image/png", "image/jpeg", "image/webp"}
    assert {"X-Generation-Id", "X-Seed"} <= set(answer["headers"])
    assert components["HFParameters"]["additionalProperties"] is False
    assert components["HFParameters"]["properties"]["num_inference_steps"]["maximum"] == 3
    assert components["HFError"]["required"] == ["error"]
