"""bench/sse.py at a small scale, run as the operator runs it: a real gunicorn, open event
streams that follow the jobs being generated, and a table whose figures come from the events."""

from __future__ import annotations

import json

import pytest

from tests.benches import run_bench


@pytest.mark.slow
@pytest.mark.own_database
def test_streams_follow_each_job_once_and_every_figure_is_measured(tiny_model_dirs, tmp_path):
    out = tmp_path / "sse.json"
    args = ["--streams", "6", "--clients", "2", "--requests", "4", "--steps", "6", "--rounds", "1"]
    proc = run_bench("sse.py", *args, "--json", str(out), drop=("SSE_", "GUNICORN_"))
    quiet, loaded = json.loads(out.read_text())
    assert (quiet["streams"], loaded["streams"]) == (0, 6)
    assert quiet["events"] == 0 and quiet["opened"] == 0
    assert loaded["stream_errors"] == 0
    # Each stream follows each new job at most once: 6 streams, 4 jobs and the warm-up job.
    assert 6 <= loaded["opened"] <= 6 * 5, loaded
    assert loaded["events"] >= 1 and 0 <= loaded["event_latency_p50_s"] <= loaded["event_latency_max_s"] < 60
    for r in (quiet, loaded):
        assert 0 < r["generation_p50_s"] <= r["generation_p95_s"] and r["read_p50_s"] > 0
    assert "stream errors: 0" in proc.stdout
