"""bench/load.py at a small scale, run as the operator runs it: the same requests as direct
pipeline calls and through a real gunicorn (and a real Celery worker on Redis), interleaved,
with the server/direct ratio split into what slowed the pipeline and what left it idle."""

from __future__ import annotations

import json
import math

import pytest

from tests.api.test_celery_worker import redis_reachable
from tests.benches import run_bench
from tests.conftest import require_service


@pytest.mark.own_database
@pytest.mark.slow
@pytest.mark.redis
def test_both_queues_are_measured_against_direct_calls_and_the_ratio_is_split(tiny_model_dirs, tmp_path):
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    out = tmp_path / "load.json"
    args = ["--mode", "both", "-n", "4", "-c", "2", "--rounds", "2", "--steps", "2", "--device-threads", "1"]
    proc = run_bench("load.py", *args, "--json", str(out), drop=("DATABASE_URL", "SQLITE_PATH", "QUEUE", "BATCH_"))
    summary = json.loads(out.read_text())
    assert summary["args"]["device_threads"] == 1
    assert len(summary["rounds"]) == 2
    for row in summary["rounds"]:
        direct = row["direct"]
        assert 0 < direct["inference_s"] <= direct["wall_s"]
        for mode in ("thread", "celery"):
            side = row[mode]
            # One worker runs one call at a time, all of it within the batch's wall time.
            assert 0 < side["inference_s"] <= side["wall_s"], (mode, side)
            assert side["busy"] == pytest.approx(side["inference_s"] / side["wall_s"])
            assert side["ratio"] == pytest.approx(side["wall_s"] / direct["wall_s"])
            # The split is exact: wall = inference / busy on both sides.
            assert math.isclose(side["ratio"], side["pipeline"] * side["idle"], rel_tol=1e-9), (mode, side)
            assert 0 < side["p50_s"] <= side["p95_s"]
    for mode in ("thread", "celery"):
        for key in ("wall_s", "ratio", "pipeline", "idle", "busy"):
            figure = summary[mode][key]
            assert figure["min"] <= figure["median"] <= figure["max"], (mode, key, figure)
    assert "1 torch thread(s) for the pipeline" in proc.stdout
    assert "QUEUE=thread" in proc.stdout and "QUEUE=celery" in proc.stdout
    assert "server/direct = pipeline x idle" in proc.stdout
