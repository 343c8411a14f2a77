"""Overload benchmark: four times the configured capacity of generate requests at once against
a real server, with reads going on, and what the server answered.

    .venv/bin/python bench/overload.py                        # capacity 8: 32 requests at once
    .venv/bin/python bench/overload.py --capacity 16 --rounds 3 --steps 8
    .venv/bin/python bench/overload.py --url http://127.0.0.1:8000 --capacity 256   # a running server

The capacity C is the server's MAX_QUEUED_JOBS. The server started here (gunicorn, QUEUE=thread
by default, as bench/load.py starts it) gets MAX_QUEUED_JOBS=C, GUNICORN_THREADS=C/2 and a
single spare thread for event streams: fewer threads than the queue holds jobs, as with the
defaults (256 and 16), so the synchronous requests alone could take every thread but for
MAX_SYNC_WAITERS (its default, GUNICORN_THREADS less a quarter; ``--sync-waiters 1000`` shows
the same overload without it). With --url the server is whatever runs there; say its
MAX_QUEUED_JOBS with --capacity.

Each round first reads alone (GET /api/results/?page_size=5 and /api/health/ in turn, one
started every --read-interval seconds whether the last was answered or not), then fires 4 x C
generate requests at once, in turn a native synchronous POST, a native async POST and an
OpenAI /v1/images/generations (synchronous by nature), while the same reads go on until the
last generate request is answered. The table gives the answers by status, the 5xx other than
a 503 with Retry-After (there must be none), whether every 429/503 carried Retry-After, and
p50/p99/max of the reads (idle and under the overload), of the accepted requests and of the
refusals. The exit status is 1 when a 5xx, a missing Retry-After or a failed read was seen.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import Stack, percentile  # noqa: E402

KINDS = ("native sync", "native async", "openai")
READS = ("/api/results/?page_size=5", "/api/health/")


class Target:
    def __init__(self, url: str) -> None:
        parts = urlparse(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 900
    ) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, seconds) of one request on a connection of its own."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        started = time.perf_counter()
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            content = response.read()
            return response.status, dict(response.getheaders()), content, time.perf_counter() - started
        finally:
            conn.close()


def generate_request(kind: str, n: int, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    prompt = f"overload {n}"
    if kind == "openai":
        size = f"{args.size}x{args.size}"
        return "/v1/images/generations", {"prompt": prompt, "model": args.model, "size": size, "steps": args.steps}
    body = {"prompt": prompt, "model_id": args.model, "steps": args.steps, "width": args.size, "height": args.size}
    return "/api/txt2img/", {**body, "async": kind == "native async"}


class Reader(threading.Thread):
    """Starts a read every ``interval`` seconds, each on a thread of its own, whether the last
    one was answered or not: a server that stalls shows as slow reads, not as fewer of them."""

    def __init__(self, target: Target, count: int | None = None, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.target, self.count, self.interval = target, count, interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._reads: list[threading.Thread] = []

    def read(self, path: str) -> None:
        try:
            status, _, _, seconds = self.target.call("GET", path, timeout=120)
        except (OSError, http.client.HTTPException) as exc:
            with self._lock:
                self.failures.append(f"{path}: {exc!r}")
            return
        with self._lock:
            if status == 200:
                self.latencies.append(seconds)
            else:
                self.failures.append(f"{path}: {status}")

    def run(self) -> None:
        n, next_at = 0, time.monotonic()
        while not self.stop.is_set() and (self.count is None or n < self.count):
            thread = threading.Thread(target=self.read, args=(READS[n % len(READS)],), daemon=True)
            thread.start()
            self._reads.append(thread)
            n += 1
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        for thread in self._reads:
            thread.join(180)


def burst(target: Target, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Reader]:
    """4 x capacity generate requests released together, reads going on meanwhile."""
    n = args.factor * args.capacity
    gate = threading.Barrier(n)
    answers: list[dict[str, Any]] = [{} for _ in range(n)]

    def send(i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        path, body = generate_request(kind, i, args)
        gate.wait()
        try:
            status, headers, content, seconds = target.call("POST", path, body)
        except (OSError, http.client.HTTPException) as exc:
            answers[i] = {"kind": kind, "status": 0, "error": repr(exc)}
            return
        answer: dict[str, Any] = {"kind": kind, "status": status, "seconds": seconds}
        retry = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        answer["retry_after"] = retry
        try:
            data = json.loads(content)
        except ValueError:
            data = {}
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            answer["code"] = error.get("code")
        answers[i] = answer

    reader = Reader(target, interval=args.read_interval)
    reader.start()
    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader.stop.set()
    reader.join(60)
    return answers, reader


def drain(target: Target, timeout: float = 900) -> None:
    """Until nothing is queued or running: each round starts on an idle server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, content, _ = target.call("GET", "/api/status/", timeout=60)
        if status == 200:
            queue = json.loads(content).get("queue") or {}
            if not queue.get("queued") and not queue.get("running"):
                return
        time.sleep(0.2)
    raise SystemExit("the queue did not drain")


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None, "max_s": None}
    return {
        "n": len(values),
        "p50_s": statistics.median(values),
        "p99_s": percentile(values, 99),
        "max_s": max(values),
    }


def summarise(answers: list[dict[str, Any]], idle: list[float], loaded: list[float], read_failures: list[str]):  # noqa: ANN201
    by_status: dict[int, Counter[str]] = {}
    for answer in answers:
        by_status.setdefault(answer["status"], Counter())[answer["kind"]] += 1
    refused = [a for a in answers if a["status"] in (429, 503)]
    without_retry = [a for a in refused if not str(a.get("retry_after") or "").isdigit()]
    # A 503 with Retry-After is backpressure; any other 5xx (or no answer at all) is a failure.
    server_errors = [a for a in answers if (a["status"] >= 500 and a["status"] != 503) or a["status"] == 0]
    return {
        "requests": len(answers),
        "by_status": {str(status): dict(kinds) for status, kinds in sorted(by_status.items())},
        "codes": dict(Counter(a.get("code") for a in refused)),
        "server_errors": len(server_errors),
        "refused": len(refused),
        "refused_without_retry_after": len(without_retry),
        "reads_idle": stats(idle),
        "reads_overload": stats(loaded),
        "read_failures": read_failures,
        "generate_200": stats([a["seconds"] for a in answers if a["status"] == 200]),
        "generate_202": stats([a["seconds"] for a in answers if a["status"] == 202]),
        "refusals": stats([a["seconds"] for a in refused]),
    }


def print_table(summary: dict[str, Any], header: str) -> None:
    print(f"\n{header}\n")
    print(f"{'answers':<10}" + "".join(f"{kind:>14}" for kind in KINDS) + f"{'total':>10}")
    for status, kinds in summary["by_status"].items():
        print(f"{status:<10}" + "".join(f"{kinds.get(kind, 0):>14}" for kind in KINDS) + f"{sum(kinds.values()):>10}")
    codes = ", ".join(f"{code} {count}" for code, count in summary["codes"].items()) or "-"
    print(f"\nrefusals by code: {codes}")
    print(f"5xx other than 503 + Retry-After (must be 0): {summary['server_errors']}")
    print(
        f"429/503 with Retry-After: {summary['refused'] - summary['refused_without_retry_after']}/{summary['refused']}"
    )
    print(f"failed reads: {len(summary['read_failures'])}\n")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    print(f"{'latency':<28}{'n':>6}{'p50':>11}{'p99':>11}{'max':>11}")
    rows = [
        ("reads, idle", "reads_idle"),
        ("reads, under the overload", "reads_overload"),
        ("generate 200 (finished)", "generate_200"),
        ("generate 202 (accepted)", "generate_202"),
        ("generate 429/503 (refused)", "refusals"),
    ]
    for label, key in rows:
        s = summary[key]
        print(f"{label:<28}{s['n']:>6}{ms(s['p50_s']):>11}{ms(s['p99_s']):>11}{ms(s['max_s']):>11}")


def run(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    status, _, content, _ = target.call("POST", "/api/txt2img/", generate_request("native sync", 0, args)[1])
    if status != 200:
        raise SystemExit(f"the warm-up request failed: {status} {content[:300]!r}")
    answers: list[dict[str, Any]] = []
    idle: list[float] = []
    loaded: list[float] = []
    failures: list[str] = []
    for number in range(1, args.rounds + 1):
        drain(target)
        alone = Reader(target, count=args.reads, interval=args.read_interval)
        alone.run()
        round_answers, reader = burst(target, args)
        answers += round_answers
        idle += alone.latencies
        loaded += reader.latencies
        failures += alone.failures + reader.failures
        counts = Counter(a["status"] for a in round_answers)
        print(f"  round {number}: " + "  ".join(f"{s}: {c}" for s, c in sorted(counts.items())), flush=True)
    drain(target)
    return summarise(answers, idle, loaded, failures)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capacity", type=int, default=8, help="the server's MAX_QUEUED_JOBS")
    parser.add_argument("--factor", type=int, default=4, help="requests fired at once = factor x capacity")
    parser.add_argument("--url", help="a running server to target instead of starting one")
    parser.add_argument("--mode", choices=("thread", "celery"), default="thread", help="QUEUE of the server started")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reads", type=int, default=100, help="reads of the idle phase, per round")
    parser.add_argument("--read-interval", type=float, default=0.05, help="seconds between the starts of two reads")
    parser.add_argument("--threads", type=int, help="the started server's GUNICORN_THREADS (default: capacity / 2)")
    parser.add_argument(
        "--sync-waiters",
        type=int,
        help="the started server's MAX_SYNC_WAITERS (default: its own default); a large one shows the overload without that cap",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker for --mode celery")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (1 <= args.capacity <= 1024 and 1 <= args.factor <= 16 and 1 <= args.rounds <= 20):
        parser.error("--capacity must be 1..1024, --factor 1..16 and --rounds 1..20")
    # bench.load's Stack reads these names.
    args.concurrency, args.batch_max, args.web_processes = args.capacity, 1, 2

    header = (
        f"{args.factor * args.capacity} generate requests at once = {args.factor} x capacity {args.capacity} "
        f"(MAX_QUEUED_JOBS), {args.model} {args.size}x{args.size}, {args.steps} steps, {args.rounds} round(s)"
    )
    print(header, flush=True)
    if args.url:
        summary = run(Target(args.url), args)
    else:
        stack = Stack(args.mode, args)
        threads = args.threads or max(2, args.capacity // 2)
        stack.env.update(
            {
                "MAX_QUEUED_JOBS": str(args.capacity),
                "GUNICORN_THREADS": str(threads),
                "SSE_MAX_STREAMS": "1",
            }
        )
        # The default (GUNICORN_THREADS less a quarter), unless --sync-waiters says otherwise.
        waiters = args.sync_waiters or max(1, threads - max(1, threads // 4))
        stack.env["MAX_SYNC_WAITERS"] = str(waiters)
        header += f"; server: {threads} + 1 threads, MAX_SYNC_WAITERS={waiters}, QUEUE={args.mode}"
        with stack:
            summary = run(Target(stack.url), args)
    summary["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print_table(summary, header)
    problems = []
    if summary["server_errors"]:
        problems.append(f"{summary['server_errors']} answers were 5xx other than 503 + Retry-After, or none")
    if summary["refused_without_retry_after"]:
        problems.append(f"{summary['refused_without_retry_after']} refusals had no Retry-After")
    if summary["read_failures"]:
        problems.append(f"{len(summary['read_failures'])} reads failed: {summary['read_failures'][:3]}")
    summary["problems"] = problems
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    print("\n" + ("FAIL: " + "; ".join(problems) if problems else "OK: no 5xx, every refusal with Retry-After"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
