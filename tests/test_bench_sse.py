"""bench/sse.py at a small scale, run as the operator runs it: a real gunicorn, open event
streams that follow the jobs being generated, and a table whose figures come from the events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(settings.BASE_DIR)


@pytest.mark.slow
@pytest.mark.own_database
def test_streams_follow_each_job_once_and_every_figure_is_measured(tiny_model_dirs, tmp_path):
    out = tmp_path / "sse.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SSE_", "GUNICORN_"))}
    env |= {"ENV_FILE": "none", "TINY_MODELS_DIR": str(settings.ENGINE.tiny_models_dir)}
    args = ["--streams", "6", "--clients", "2", "--requests", "4", "--steps", "6", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, "bench/sse.py", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
