"""SSE fan-out benchmark: N open event streams while M clients generate, against a real server.

    .venv/bin/python bench/sse.py                      # 200 streams, 4 generating clients, QUEUE=thread
    .venv/bin/python bench/sse.py --streams 50 --clients 2 --requests 8 --steps 8

Each round runs the same generation load twice, once with no stream open and once with
``--streams`` streams open (each follows the newest job to its end, then the next new one,
as a page follows the job it started; never a finished job's stream again), and reports:

- event latency: from the step's end on the worker (``progress.at``) to the client reading the
  ``progress`` event (same machine, same clock), p50/p95/max;
- generation latency (synchronous POST) p50/p95, with and without the streams;
- read latency (GET /api/results/?page_size=5) p50/p95 while the load runs, with and without.

The server is the same gunicorn (QUEUE=thread) that bench/load.py starts; each stream holds one
of its threads (SSE_MAX_STREAMS), so reads and generation requests keep their own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import selectors
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import Stack, percentile  # noqa: E402


def _conn(port: int, timeout: float = 120) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def post(port: int, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    conn = _conn(port, 900)
    started = time.perf_counter()
    conn.request("POST", "/api/txt2img/", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status not in (200, 202):
        raise SystemExit(f"generation request failed: {response.status} {data}")
    return time.perf_counter() - started, data


def read(port: int) -> float:
    conn = _conn(port)
    started = time.perf_counter()
    conn.request("GET", "/api/results/?page_size=5")
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"read failed: {response.status}")
    return time.perf_counter() - started


class _Stream:
    """One SSE client's state: the jobs it followed, and its open socket while it follows one."""

    def __init__(self) -> None:
        self.followed: set[str] = set()
        self.sock: socket.socket | None = None
        self.buf = b""
        self.head = True
        self.event: dict[str, str] = {}


class Listeners(threading.Thread):
    """``n`` SSE clients on one thread, over non-blocking sockets under one selector, so the
    clients cost the machine (which the server shares here) as little CPU as they can. Each
    follows the newest job to its end, then the next new one: never a finished job again."""

    def __init__(
        self, port: int, n: int, jobs: list[str], lock: threading.Lock, latencies: list[float], stop: threading.Event
    ):
        super().__init__(daemon=True)
        self.port, self.jobs, self.lock, self.latencies, self.stop = port, jobs, lock, latencies, stop
        self.streams = [_Stream() for _ in range(n)]
        self.errors = 0
        self.opened = 0
        self.selector = selectors.DefaultSelector()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    newest = self.jobs[-1] if self.jobs else None
                if newest is not None:
                    for stream in self.streams:
                        if stream.sock is None and newest not in stream.followed:
                            self._open(stream, newest)
                for key, _ in self.selector.select(timeout=0.01):
                    self._read(key.data)
        finally:
            for stream in self.streams:
                self._close(stream)

    def _open(self, stream: _Stream, job: str) -> None:
        stream.followed.add(job)
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            # HTTP/1.0: the server sends the stream as it is and closes it at the end (no chunks).
            sock.sendall(f"GET /api/results/{job}/events/ HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n".encode())
            sock.setblocking(False)
        except OSError:
            self.errors += 1
            return
        stream.sock, stream.buf, stream.head, stream.event = sock, b"", True, {}
        self.selector.register(sock, selectors.EVENT_READ, stream)

    def _close(self, stream: _Stream) -> None:
        if stream.sock is not None:
            self.selector.unregister(stream.sock)
            stream.sock.close()
            stream.sock = None

    def _read(self, stream: _Stream) -> None:
        assert stream.sock is not None
        try:
            data = stream.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.errors += 1
            self._close(stream)
            return
        if not data:
            self._close(stream)
            return
        stream.buf += data
        if stream.head:
            head, sep, rest = stream.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                self.errors += 1
                self._close(stream)
                return
            self.opened += 1
            stream.head, stream.buf = False, rest
        *lines, stream.buf = stream.buf.split(b"\n")
        for raw in lines:
            line = raw.decode().rstrip("\r")
            if line:
                name, _, value = line.partition(": ")
                stream.event[name] = value
                continue
            event, stream.event = stream.event, {}
            if event.get("event") == "progress":
                at = json.loads(event["data"]).get("at")
                if at is not None:
                    with self.lock:
                        self.latencies.append(time.time() - float(at))
            if event.get("event") in ("completed", "failed", "cancelled"):
                self._close(stream)
                return


def run_load(port: int, args: argparse.Namespace, streams: int) -> dict[str, Any]:
    jobs: list[str] = []
    lock = threading.Lock()
    latencies: list[float] = []
    stop = threading.Event()
    listeners = [Listeners(port, streams, jobs, lock, latencies, stop)] if streams else []
    for listener in listeners:
        listener.start()
    reads: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            reads.append(read(port))
            time.sleep(0.05)

    def client(n: int) -> float:
        body = {
            "prompt": f"sse bench {n}",
            "seed": 1000 + n,
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "model_id": args.model,
            "async": True,
        }
        started = time.perf_counter()
        _, queued = post(port, body)
        with lock:
            jobs.append(queued["id"])
        # Then wait for it as a synchronous client would, through its resource.
        while True:
            conn = _conn(port)
            conn.request("GET", f"/api/results/{queued['id']}/")
            response = conn.getresponse()
            data = json.loads(response.read())
            conn.close()
            if data["status"] in ("succeeded", "failed", "cancelled"):
                if data["status"] != "succeeded":
                    raise SystemExit(f"a job ended {data['status']}: {data.get('error')}")
                return time.perf_counter() - started
            time.sleep(0.02)

    if streams:
        # Let the streams connect (to the first job) before the load starts.
        deadline = time.monotonic() + 60
        _, first = post(port, {"prompt": "warm", "steps": 1, "width": args.size, "height": args.size, "async": True})
        with lock:
            jobs.append(first["id"])
        while sum(listener.opened for listener in listeners) < streams and time.monotonic() < deadline:
            time.sleep(0.05)
    read_thread = threading.Thread(target=reader, daemon=True)
    read_thread.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        generation = list(pool.map(client, range(args.requests)))
    wall = time.perf_counter() - started
    done.set()
    read_thread.join(10)
    stop.set()
    return {
        "streams": streams,
        "opened": sum(listener.opened for listener in listeners),
        "stream_errors": sum(listener.errors for listener in listeners),
        "wall_s": wall,
        "generation_p50_s": statistics.median(generation),
        "generation_p95_s": percentile(generation, 95),
        "read_p50_s": statistics.median(reads) if reads else None,
        "read_p95_s": percentile(reads, 95) if reads else None,
        "event_latency_p50_s": statistics.median(latencies) if latencies else None,
        "event_latency_p95_s": percentile(latencies, 95) if latencies else None,
        "event_latency_max_s": max(latencies) if latencies else None,
        "events": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # bench.load's Stack reads these names.
    args.concurrency = args.clients
    args.redis = "redis://127.0.0.1:6379/15"
    args.web_processes = 1
    args.batch_max = 1
    results: list[dict[str, Any]] = []
    stack = Stack("thread", args)
    stack.env["SSE_MAX_STREAMS"] = str(max(args.streams + 8, 16))
    stack.env["RATE_LIMIT_READ"] = ""
    with stack:
        port = stack.port
        post(port, {"prompt": "warm-up", "steps": 1, "width": args.size, "height": args.size})
        for round_no in range(args.rounds):
            for streams in (0, args.streams):
                result = run_load(port, args, streams)
                result["round"] = round_no + 1
                results.append(result)
                print(
                    f"  round {round_no + 1}: {streams:>4} streams  gen p50 {result['generation_p50_s']:.3f}s  "
                    f"read p95 {result['read_p95_s'] or 0:.3f}s  events {result['events']}",
                    flush=True,
                )

    def med(streams: int, key: str) -> float | None:
        values = [r[key] for r in results if r["streams"] == streams and r[key] is not None]
        return statistics.median(values) if values else None

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    print(f"\nmedian over {args.rounds} rounds; {args.clients} clients x {args.requests} jobs, {args.steps} steps")
    header = f"{'streams':>8} {'gen p50':>10} {'gen p95':>10} {'read p50':>10} {'read p95':>10} {'event p50':>10} {'event p95':>10} {'event max':>10}"
    print(header)
    for streams in (0, args.streams):
        print(
            f"{streams:>8} {show(med(streams, 'generation_p50_s')):>10} {show(med(streams, 'generation_p95_s')):>10} "
            f"{show(med(streams, 'read_p50_s')):>10} {show(med(streams, 'read_p95_s')):>10} "
            f"{show(med(streams, 'event_latency_p50_s')):>10} {show(med(streams, 'event_latency_p95_s')):>10} "
            f"{show(med(streams, 'event_latency_max_s')):>10}"
        )
    errors = sum(r["stream_errors"] for r in results)
    print(f"stream errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
