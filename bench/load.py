"""Load benchmark: N concurrent txt2img requests against a real server, next to the same work
done as direct pipeline calls in one process. The ratio between the two is the server's overhead
(HTTP, the database, the queue, waiting) on top of the inference itself.

    .venv/bin/python bench/load.py                        # both QUEUE modes, 16 requests, 4 at once
    .venv/bin/python bench/load.py --mode celery -n 32 -c 8 --steps 8 --size 128 --rounds 7

These machines are noisy (a single direct run swings by ±25%), so the two sides run
interleaved: each round does the direct batch, then each server's batch, with every process
started and warmed once. The table reports medians over the rounds with their spread (min-max),
the server/direct ratio per round, and the worker's busy fraction: the time inside pipeline
calls (each answer's ``timings.inference_s``) over the batch's wall time.

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
import shutil
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
from contextlib import ExitStack
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


class Direct:
    """N generations called one after another in this process (one device, one job at a time,
    as the server's single worker runs them), warmed up once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run = _direct_runner(args)
        self.run(0)

    def batch(self) -> dict[str, float]:
        """The batch's wall time, and its time inside pipeline calls (``timings.inference_s``)."""
        inference = 0.0
        started = time.perf_counter()
        for i in range(self.args.requests):
            inference += float(self.run(1000 + i).timings.get("inference_s", 0.0))
        wall = time.perf_counter() - started
        return {"wall_s": wall, "inference_s": inference, "busy": inference / wall}


def _direct_runner(args: argparse.Namespace) -> Any:
    from backend.config import EngineConfig, set_config
    from backend.local import LocalBackend
    from backend.params import GenerationParams
    from backend.tiny import ensure_tiny_model

    if args.device_threads:
        import torch

        torch.set_num_threads(args.device_threads)
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

    return lambda seed: backend.generate(params(seed))


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
            # Off by default: the direct side runs one job per call, so this compares like with like.
            "BATCH_MAX_IMAGES": str(args.batch_max),
        }
        # The other benches' servers (bench/sse.py, bench/overload.py, bench/gpu.py) keep torch's default.
        if getattr(args, "device_threads", 0):
            self.env["OMP_NUM_THREADS"] = str(args.device_threads)
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

    def __exit__(self, exc_type: object, *_: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if exc_type is None:
            shutil.rmtree(self.tmp, ignore_errors=True)  # kept after a failure: its logs say why

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generate(self, seed: int) -> tuple[float, float]:
        """(latency, the answer's share of pipeline time) of one synchronous request: a call
        shared by several jobs counts once, split between them."""
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
        timings = answer.get("timings") or {}
        share = float(timings.get("inference_s", 0.0)) / max(1, int(timings.get("batch_jobs", 1)))
        return time.perf_counter() - started, share

    def batch(self) -> dict[str, Any]:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.args.concurrency) as pool:
            answers = list(pool.map(self.generate, range(1000, 1000 + self.args.requests)))
        wall = time.perf_counter() - started
        latencies = [latency for latency, _ in answers]
        inference = sum(share for _, share in answers)
        return {
            "wall_s": wall,
            "inference_s": inference,
            "busy": inference / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 95),
        }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are over these")
    parser.add_argument(
        "--batch-max", type=int, default=1, help="the server's BATCH_MAX_IMAGES (default 1: micro-batching off)"
    )
    parser.add_argument(
        "--device-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads for the pipeline on both sides (default: all CPUs but one, so the server's HTTP, "
        "database and PNG work has a core of its own, as a GPU box's host has; 0: torch's own default, every CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64 and 1 <= args.rounds <= 50):
        parser.error("-n must be 1..1000, -c 1..64 and --rounds 1..50")
    if args.device_threads < 0:
        parser.error(f"--device-threads must be 0 or more, got {args.device_threads}")

    os.environ.setdefault("ENV_FILE", "none")
    print(
        f"{args.requests} txt2img requests, {args.concurrency} at once, {args.model} {args.size}x{args.size}, "
        f"{args.steps} steps, {args.rounds} interleaved rounds"
    )
    modes = ("thread", "celery") if args.mode == "both" else (args.mode,)
    direct = Direct(args)
    rounds: list[dict[str, Any]] = []
    with ExitStack() as stacks:
        servers = {mode: stacks.enter_context(Stack(mode, args)) for mode in modes}
        for server in servers.values():
            server.generate(0)  # warm-up: the model loads in the worker
        for number in range(1, args.rounds + 1):
            row: dict[str, Any] = {"round": number, "direct": direct.batch()}
            for mode, server in servers.items():
                side = row[mode] = server.batch()
                side["ratio"] = side["wall_s"] / row["direct"]["wall_s"]
                # ratio = pipeline x idle: how much slower the pipeline calls themselves ran in
                # the server (sharing the CPU with its HTTP, database and PNG work; nothing on a
                # GPU) times how much more of the wall the device spent out of them.
                side["pipeline"] = side["inference_s"] / row["direct"]["inference_s"]
                side["idle"] = row["direct"]["busy"] / side["busy"]
            rounds.append(row)
            print(
                f"  round {number}: direct {row['direct']['wall_s']:.2f}s  "
                + "  ".join(f"{m} {row[m]['wall_s']:.2f}s ({row[m]['ratio']:.2f}x)" for m in modes)
            )

    direct_s = spread([r["direct"]["wall_s"] for r in rounds])
    direct_busy = spread([r["direct"]["busy"] for r in rounds])
    threads = (
        f"{args.device_threads} torch thread(s) for the pipeline" if args.device_threads else "torch's own threads"
    )
    print(f"\nmedian (min-max) over {args.rounds} rounds; {threads}, on {os.cpu_count()} CPUs")
    print(
        f"{'side':<14} {'wall s':>18} {'images/s':>9} {'server/direct':>19} {'= pipeline':>19} {'x idle':>19} "
        f"{'busy':>19} {'p50 s':>7} {'p95 s':>7}"
    )
    print(
        f"{'direct':<14} {fmt(direct_s):>18} {args.requests / direct_s['median']:>9.2f} {'':>19} {'':>19} {'':>19} "
        f"{fmt(direct_busy, '', 3):>19}"
    )
    summary: dict[str, Any] = {
        "args": vars(args) | {"json": str(args.json or "")},
        "cpus": os.cpu_count(),
        "direct": {"wall_s": direct_s, "busy": direct_busy},
        "rounds": rounds,
    }
    for mode in modes:
        figures = {
            key: spread([r[mode][key] for r in rounds]) for key in ("wall_s", "ratio", "pipeline", "idle", "busy")
        }
        p50 = statistics.median(r[mode]["p50_s"] for r in rounds)
        p95 = statistics.median(r[mode]["p95_s"] for r in rounds)
        summary[mode] = {**figures, "p50_s": p50, "p95_s": p95}
        print(
            f"{'QUEUE=' + mode:<14} {fmt(figures['wall_s']):>18} {args.requests / figures['wall_s']['median']:>9.2f} "
            f"{fmt(figures['ratio'], 'x'):>19} {fmt(figures['pipeline'], 'x'):>19} {fmt(figures['idle'], 'x'):>19} "
            f"{fmt(figures['busy'], '', 3):>19} {p50:>7.3f} {p95:>7.3f}"
        )
    print(
        "\nserver/direct = pipeline x idle. pipeline: the server's time inside pipeline calls over the direct "
        "side's (the pipeline slowed by the server's own CPU work; a GPU doesn't share it). idle: the direct "
        "side's busy fraction over the server's (the device waiting for the server)."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
