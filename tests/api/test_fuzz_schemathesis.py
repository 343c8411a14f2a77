"""schemathesis against the running app: no 5xx, and every response as the schema says.

The app serves on pytest-django's live server (real HTTP, the in-process worker, the tiny
models), and the schemathesis CLI reads the schema from /api/schema/ and fuzzes its
operations: the native API in one run, the foreign protocols (OpenAI Images, A1111, the HF
task route) in another. Limits are cut down so that each generation it asks for is small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

# Per operation. The coverage phase adds its own boundary and negative cases on top.
MAX_EXAMPLES = 20
# The foreign protocols have 36 operations, most of them fixed listings; their valid
# requests are fuzzed with this many each.
PROTOCOL_MAX_EXAMPLES = 5

# Every check but these two, each of which fails on behaviour that is meant:
EXCLUDED_CHECKS = [
    # "Schema-valid data is accepted": acceptance also rests on rules a JSON Schema can't
    # state, which the schema describes in words: steps x strength >= 1 for img2img, an image
    # that really decodes as PNG/JPEG/WebP, the total work cap, and an Idempotency-Key
    # already used with another body (422).
    "positive_data_acceptance",
    # "Schema-invalid data is rejected": the API reads leniently where DRF does: numbers
    # as numeric strings ("512", as every multipart field is), DRF's boolean spellings
    # (0, "yes"), and a page_size that isn't a number (ignored, default page size). Every
    # limit is still enforced. The foreign protocols read as their clients write: A1111
    # ignores the fields it has no use for, whatever their values, as A1111 does.
    "negative_data_rejection",
]

NATIVE_PATHS = "^/api/"
PROTOCOL_PATHS = "^/(v1|sdapi/v1|internal|models)/"


@pytest.fixture
def fuzz_key(live_server, live_db, settings, monkeypatch, tiny_model_dirs) -> str:
    """A live server with small limits, keys required, and the tiny models warm; the key."""
    from api.auth import api_key_create
    from backend.manager import get_manager

    # Only the models that run here: the hub models can't be fetched offline, and a
    # request for one rightly fails with 503 model_unavailable.
    manager = get_manager()
    monkeypatch.setattr(manager, "catalog", {k: v for k, v in manager.catalog.items() if k in tiny_model_dirs})
    # Each accepted request is at most 96x96 x 2 images x 2 steps: well under a second on
    # two CPU cores. The coverage phase alone sends about a hundred that succeed.
    settings.GENERATION_LIMITS = {
        **settings.GENERATION_LIMITS,
        "MIN_SIZE": 64,
        "MAX_SIZE": 96,
        "MAX_STEPS": 2,
        "MAX_NUM_IMAGES": 2,
        "MAX_TOTAL_WORK": 96 * 96 * 2 * 2,
        "MAX_PROMPT_CHARS": 300,
        "MAX_UPLOAD_BYTES": 64 * 1024,
        "MAX_UPLOAD_PIXELS": 96 * 96,
    }
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 128 * 1024
    # With keys required the schema marks every operation but health (and A1111's ping) as
    # secured, so the auth checks (a request without the key gets 401) have something to verify.
    settings.AUTH_REQUIRED = True
    settings.MAX_ACTIVE_JOBS_PER_KEY = 4
    _, key = api_key_create(name="fuzz", is_staff=False)
    _warm_up(tiny_model_dirs)
    return key


def run_schemathesis(
    url: str,
    key: str,
    tmp_path: Path,
    *,
    paths: str,
    max_examples: int,
    options: Iterable[str] = (),
    config: str = "",
) -> dict[str, Any]:
    """The JSON report of one run over the operations whose path matches ``paths``;
    ``options`` go to the CLI as they are, ``config`` is a schemathesis.toml."""
    runs = len(list(tmp_path.glob("report-*.json")))
    report = tmp_path / f"report-{runs}.json"
    config_file = tmp_path / f"schemathesis-{runs}.toml"
    config_file.write_text(config)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config_file),
        "run",
        f"{url}/api/schema/?format=json",
        "--include-path-regex",
        paths,
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED_CHECKS),
        "--header",
        f"Authorization: Bearer {key}",
        "--max-examples",
        str(max_examples),
        "--seed",
        "20240601",
        # One worker: Hypothesis' lambda descriptions call ast.parse, which isn't
        # thread-safe on Python 3.11 ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--request-timeout",
        "60",
        # The response-time check stays, with room for a slow shared CI machine.
        "--max-response-time",
        "30",
        "--no-color",
        "--generation-database",
        "none",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output[-6000:]
    summary = json.loads(report.read_text())
    assert summary["test_cases"]["with_failures"] == 0 and not summary["failures"] and not summary["errors"]
    return summary


def test_schemathesis_finds_no_server_error_or_schema_violation(live_server, fuzz_key, tmp_path: Path) -> None:
    summary = run_schemathesis(live_server.url, fuzz_key, tmp_path, paths=NATIVE_PATHS, max_examples=MAX_EXAMPLES)
    assert summary["operations"]["tested"] == summary["operations"]["selected"] == 13
    assert summary["test_cases"]["generated"] > 100


def test_schemathesis_finds_no_server_error_or_schema_violation_in_the_foreign_protocols(
    live_server, fuzz_key, settings, tmp_path: Path
) -> None:
    # One 64x64 image a request: every valid request the fuzzer sends runs.
    settings.GENERATION_LIMITS = {
        **settings.GENERATION_LIMITS,
        "MAX_SIZE": 64,
        "MAX_NUM_IMAGES": 1,
        "MAX_TOTAL_WORK": 64 * 64 * 2,
    }
    # First every field's wrong types, bounds and missing parts, one by one (the coverage
    # phase): each is refused before anything is queued, so a thousand cases take about a
    # minute. The coverage phase's valid cases would run hundreds of generations, so they
    # come second, as the documented examples and a few random requests per operation: every
    # answer is checked against its schema. The 405 answer is the same for every method, so
    # one unexpected method an operation is enough.
    refused = run_schemathesis(
        live_server.url,
        fuzz_key,
        tmp_path,
        paths=PROTOCOL_PATHS,
        max_examples=PROTOCOL_MAX_EXAMPLES,
        options=["--mode", "negative", "--phases", "coverage"],
        config='[phases.coverage]\nunexpected-methods = ["PATCH"]\n',
    )
    accepted = run_schemathesis(
        live_server.url,
        fuzz_key,
        tmp_path,
        paths=PROTOCOL_PATHS,
        max_examples=PROTOCOL_MAX_EXAMPLES,
        options=["--mode", "positive", "--phases", "examples,fuzzing"],
    )
    for summary in (refused, accepted):
        # OpenAI 5, A1111 30 (its ping included), HF 1.
        assert summary["operations"]["tested"] == summary["operations"]["selected"] == 36
    assert refused["test_cases"]["generated"] > 800
    assert accepted["test_cases"]["generated"] > 100


def _warm_up(model_ids: Iterable[str]) -> None:
    """Load each model and run it once, so torch's first-call cost isn't a response time."""
    from backend.params import GenerationParams
    from backend.router import get_backend

    for model_id in model_ids:
        params = GenerationParams(
            kind="txt2img",
            model_id=model_id,
            prompt="warm-up",
            width=64,
            height=64,
            steps=1,
            guidance_scale=5.0,
            seed=0,
        )
        get_backend().generate(params)
