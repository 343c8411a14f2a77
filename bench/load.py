"""Load benchmark: N concurrent txt2img requests against a real server, next to the same work
done as direct pipeline calls in one process. The ratio between the two is the server's overhead
(HTTP, the database, the queue, waiting) on top of the inference itself.

    .venv/bin/python bench/load.py                        # both QUEUE modes, 16 requests, 4 at once
    .venv/bin/python bench/load.py --mode celery -n 32 -c 8 --steps 8 --size 128

QUEUE=thread serves with gunicorn (one process, threads) and its in-process worker;
QUEUE=celery adds one Celery worker (solo pool, concurrency 1) on a local Redis. Both use a
throwaway SQLite database and media folder, and the built-in tiny model, so this measures the
serving path, not a GPU: with a real model the per-request overhead stays about the same while
the inference time grows, so the ratio only gets closer to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def request_body(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "prompt": f"benchmark scene {seed}",
        "model_id": args.model,
        "seed": seed,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
    }


# --- the same work, as direct pipeline calls ------------------------------------------------


def direct_run(args: argparse.Namespace) -> float:
    """Seconds for N generations called one after another in this process (one device, one job
    at a time, as the server's single worker runs them), after one warm-up call."""
    from backend.config import EngineConfig, set_config
    from backend.local import LocalBackend
    from backend.params import GenerationParams
    from backend.tiny import ensure_tiny_model

    config = EngineConfig.from_env(os.environ, base_dir=ROOT)
    set_config(config)
    if args.model.startswith("tiny-"):
        ensure_tiny_model(args.model, config.tiny_models_dir)
    backend = LocalBackend()

    def params(seed: int) -> GenerationParams:
        b = request_body(args, seed)
        return GenerationParams(
            kind="txt2img",
            model_id=b["model_id"],
            prompt=b["prompt"],
            width=b["width"],
            height=b["height"],
            steps=b["steps"],
            guidance_scale=7.5,
            seed=seed,
        )

    backend.generate(params(0))
    started = time.perf_counter()
    for i in range(args.requests):
        backend.generate(params(1000 + i))
    return time.perf_counter() - started


# --- the server -------------------------------------------------------------------------------


class Stack:
    """gunicorn (and a Celery worker in celery mode) on a throwaway database and media folder."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sdapi-bench-{mode}-"))
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "ENV_FILE": "none",
            "DATABASE_URL": "",
            "SQLITE_PATH": str(self.tmp / "db.sqlite3"),
            "MEDIA_ROOT": str(self.tmp / "media"),
            "QUEUE": mode,
            "AUTH_REQUIRED": "false",
            "RATE_LIMIT_GENERATE": "",
            "RATE_LIMIT_READ": "",
            "MAX_STEPS": str(max(args.steps, 150)),
            "SYNC_TIMEOUT": "600",
            "LOG_LEVEL": "WARNING",
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_THREADS": str(max(args.concurrency * 2, 8)),
            "GUNICORN_LOG_LEVEL": "warning",
            "CELERY_BROKER_URL": args.redis,
            "CELERY_DEFAULT_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        }
        if mode == "celery":
            self.env["WEB_CONCURRENCY"] = str(args.web_processes)

    def __enter__(self) -> Stack:
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True)
        log = (self.tmp / "server.log").open("wb")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        if self.mode == "celery":
            worker_log = (self.tmp / "worker.log").open("wb")
            cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "--concurrency", "1"]
            cmd += [
                "-Q",
                self.env["CELERY_DEFAULT_QUEUE"],
                "-n",
                f"bench-{self.port}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ]
            self.procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=worker_log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/health/", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise SystemExit(f"the {self.mode} server did not start; see {self.tmp}") from None
                time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generate(self, seed: int) -> float:
        body = json.dumps(request_body(self.args, seed)).encode()
        req = urllib.request.Request(
            f"{self.url}/api/txt2img/", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=900) as resp:
                answer = json.loads(resp.read())
                status = resp.status
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"request failed with {exc.code}: {exc.read()[:300]!r}") from None
        if status != 200 or answer.get("status") != "succeeded":
            raise SystemExit(f"request did not succeed: {status} {answer.get('status')} {answer.get('error')}")
        return time.perf_counter() - started


def server_run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with Stack(mode, args) as stack:
        stack.generate(0)  # warm-up: the model loads in the worker
        latencies: list[float] = []
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            latencies = list(pool.map(stack.generate, range(1000, 1000 + args.requests)))
        wall = time.perf_counter() - started
    return {
        "mode": mode,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "wall_s": wall,
        "throughput_rps": args.requests / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("thread", "celery", "both"), default="both")
    parser.add_argument("-n", "--requests", type=int, default=16)
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker for --mode celery")
    parser.add_argument("--web-processes", type=int, default=2, help="gunicorn processes in celery mode")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64):
        parser.error("-n must be 1..1000 and -c 1..64")

    os.environ.setdefault("ENV_FILE", "none")
    print(
        f"{args.requests} txt2img requests, {args.concurrency} at once, {args.model} {args.size}x{args.size}, {args.steps} steps"
    )
    direct = direct_run(args)
    print(f"direct pipeline calls, one process: {direct:.2f}s ({args.requests / direct:.2f} images/s)")

    results = []
    for mode in ("thread", "celery") if args.mode == "both" else (args.mode,):
        result = server_run(mode, args)
        result["direct_s"] = direct
        result["overhead_ratio"] = result["wall_s"] / direct
        results.append(result)
        print(
            f"QUEUE={mode:<6} {result['wall_s']:.2f}s  throughput {result['throughput_rps']:.2f} req/s  "
            f"p50 {result['p50_s']:.3f}s  p95 {result['p95_s']:.3f}s  "
            f"server/direct {result['overhead_ratio']:.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
