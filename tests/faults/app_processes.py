"""The server's own processes, started for real against services of the test's choosing: the
web process under gunicorn (in QUEUE=thread it runs the jobs too) and a ``celery worker``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.api.test_celery_worker import ROOT, Worker, wait_for
from tests.faults.services import free_port

# One compute thread per process: on a small machine shared with other runs, the thread pools
# of several processes fight over the cores and a step takes ten times as long, which would
# make the moment a fault lands relative to a job a matter of luck.
COMPUTE_ENV = {"OMP_NUM_THREADS": "1"}


class EnvWorker(Worker):
    """A ``celery worker`` (see tests/api/test_celery_worker.py) with some of its environment
    replaced: another broker, another database, shorter recovery intervals."""

    def __init__(self, queue: str, log_dir: Path, **env: str) -> None:
        super().__init__(queue, log_dir)
        self.overrides = env

    def env(self) -> dict[str, str]:
        return {**super().env(), **COMPUTE_ENV, **self.overrides}

    def log_text(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log"), key=lambda p: p.name)
        )


class WebServer:
    """``gunicorn -c gunicorn.conf.py config.wsgi:application`` on a free port of 127.0.0.1."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "gunicorn.log"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "ENV_FILE": "none",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "4",
            "SSE_MAX_STREAMS": "1",
            "PYTHONUNBUFFERED": "1",
            **COMPUTE_ENV,
            **env,
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WebServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for("the web server to answer", self._up, timeout, 0.2)
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return self.request("GET", "/api/health/", timeout=2)[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - a local test server
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None
