"""The crash soak (bench/faults.py) at a small N, run as the operator runs it: real gunicorn, a
real Celery worker on Redis, SIGKILL of whole process groups, restarts. Every job must end, with
exactly its images and no file left without a row; the bench's own exit status says so too.
"""

from __future__ import annotations

import json

import pytest

from tests.api.test_celery_worker import redis_reachable
from tests.benches import output, run_bench
from tests.conftest import require_service


@pytest.mark.own_database
@pytest.mark.slow
@pytest.mark.redis
def test_killed_workers_leave_no_stuck_job_no_duplicate_and_no_orphan_file(tiny_model_dirs, tmp_path):
    require_service(redis_reachable(), "Redis on 127.0.0.1:6379")
    out = tmp_path / "faults.json"
    args = ["-n", "3", "--kills", "2", "--steps", "40", "--moment-wait", "4", "--seed", "7"]
    args += ["--redis", "redis://127.0.0.1:6379/15", "--finish-timeout", "180"]
    proc = run_bench("faults.py", *args, "--json", str(out), drop=("DATABASE_URL", "SQLITE_PATH"), check=False)
    report = output(proc)
    assert out.exists(), report
    results = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"celery", "thread"}, report
    for mode, r in results.items():
        counts = r["counts"]
        # Something was killed, and restarted: the soak soaked.
        assert sum(r["kills"].values()) >= 1, (mode, report)
        assert r["starts"]["worker" if mode == "celery" else "web"] >= 2, (mode, report)
        assert r["jobs"] == 3
        assert counts.get("succeeded", 0) + counts.get("worker_lost", 0) == 3, (mode, counts, r["problems"])
        for goal in ("stuck", "duplicates", "missing", "orphans", "failed_other"):
            assert counts.get(goal, 0) == 0, (mode, goal, r["problems"])
    assert proc.returncode == 0, report
    assert "stuck" in proc.stdout and "orphans" in proc.stdout  # the table was printed
