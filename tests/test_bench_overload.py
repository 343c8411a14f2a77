"""bench/overload.py at a tiny scale, run as the operator runs it: a real gunicorn, four times
its capacity of generate requests at once, and the table and the JSON agree on what came back."""

from __future__ import annotations

import json

import pytest

from bench.overload import summarise
from tests.benches import run_bench


@pytest.mark.own_database
@pytest.mark.slow
def test_four_times_the_capacity_is_answered_with_backpressure_and_no_5xx(tiny_model_dirs, tmp_path):
    out = tmp_path / "overload.json"
    args = ["--capacity", "2", "--steps", "6", "--reads", "20", "--json", str(out)]
    proc = run_bench("overload.py", *args, drop=("MAX_", "GUNICORN_"), timeout=900)
    result = json.loads(out.read_text())
    assert result["requests"] == 8
    answered = sum(sum(kinds.values()) for kinds in result["by_status"].values())
    assert answered == 8 and "0" not in result["by_status"]
    assert set(result["by_status"]) <= {"200", "202", "503"}, result["by_status"]
    # 8 at once on a queue of 2 and one place to wait: some are turned away, all with Retry-After.
    assert result["refused"] >= 1 and result["refused_without_retry_after"] == 0
    assert set(result["codes"]) <= {"queue_full", "too_many_sync_requests"}
    assert result["server_errors"] == 0 and result["read_failures"] == [] and result["problems"] == []
    assert result["reads_idle"]["n"] == 20 and result["reads_overload"]["n"] >= 1
    assert result["generate_200"]["n"] + result["generate_202"]["n"] + result["refused"] == 8
    assert "5xx other than 503 + Retry-After (must be 0): 0" in proc.stdout
    assert f"429/503 with Retry-After: {result['refused']}/{result['refused']}" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK: no 5xx, every refusal with Retry-After")


def test_the_summary_counts_what_must_not_happen():
    answers = [
        {"kind": "native sync", "status": 200, "seconds": 1.0},
        {"kind": "native async", "status": 503, "seconds": 0.1, "retry_after": "4", "code": "queue_full"},
        {"kind": "openai", "status": 503, "seconds": 0.1, "retry_after": None, "code": "queue_full"},
        {"kind": "openai", "status": 500, "seconds": 0.1, "code": "internal_error"},
        {"kind": "native sync", "status": 0, "error": "ConnectionResetError()"},
    ]
    summary = summarise(answers, [0.01], [0.02, 0.03], ["/api/health/: 502"])
    assert summary["server_errors"] == 2  # the 500, and the request that got no answer
    assert summary["refused"] == 2 and summary["refused_without_retry_after"] == 1
    assert summary["by_status"]["503"] == {"native async": 1, "openai": 1}
    assert summary["reads_overload"]["n"] == 2 and summary["reads_overload"]["max_s"] == 0.03
    assert summary["generate_200"]["p50_s"] == 1.0
