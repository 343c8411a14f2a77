"""Whether the worker holding a running job is still alive: names, heartbeats, the orphan test.

A job row records who claimed it in ``worker`` as ``kind@host:pid/space``. ``space`` names a
pid space (one kernel boot, one pid namespace): two processes with the same ``space`` can
ask the kernel whether the other's pid still exists, which finds a dead worker at once.
Anything else (another machine, another container) is judged by its heartbeat alone: a
running job whose ``heartbeat_at`` is older than ``JOB_STALE_AFTER`` has lost its worker.

A Celery worker also says that it is alive, with no job at all: ``Beacon`` publishes its
status on the same cadence (see ``celery_executor.WorkerStatus``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

from django.db import close_old_connections, connection
from django.utils import timezone

from ..models import Generation, Status

log = logging.getLogger("api.liveness")


@cache
def pid_space() -> str:
    parts: list[str] = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""  # no /proc: pids can't be checked, heartbeats still can
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


@cache
def _hostname() -> str:
    return socket.gethostname()[:64]


def worker_identity(kind: str) -> str:
    """This process's name for the ``worker`` column; the pid is read now (pool children differ)."""
    return f"{kind}@{_hostname()}:{os.getpid()}/{pid_space()}"


@dataclass(frozen=True)
class WorkerRef:
    pid: int
    space: str


def parse_worker(worker: str) -> WorkerRef | None:
    _, _, rest = worker.rpartition(":")
    pid, sep, space = rest.partition("/")
    if not sep or not pid.isdigit():
        return None
    return WorkerRef(pid=int(pid), space=space)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A killed process its parent hasn't reaped yet is a zombie: dead for our purpose.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class OrphanTest:
    """Says whether a running job's worker is gone.

    ``startup``: this process has just started and runs nothing yet, so a row that carries
    its own name was left by an earlier process that had the same name (a restarted container).
    """

    def __init__(self, *, me: str, stale_after: float, startup: bool = False) -> None:
        self.me = me
        self.mine = parse_worker(me)
        self.stale_after = stale_after
        self.startup = startup

    def __call__(self, generation: Generation) -> bool:
        heartbeat = generation.heartbeat_at or generation.started_at
        if heartbeat is None or heartbeat < timezone.now() - timedelta(seconds=self.stale_after):
            return True
        if generation.worker == self.me:
            return self.startup
        ref = parse_worker(generation.worker)
        if ref is None or self.mine is None or not ref.space or ref.space != self.mine.space:
            return False
        return not pid_alive(ref.pid)


class Heartbeat:
    """Stamps ``heartbeat_at`` from a side thread while a job runs, model loading included."""

    def __init__(self, generation_id: Any, lease: dict[str, Any], interval: float) -> None:
        self.generation_id = generation_id
        self.lease = lease
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{generation_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    Generation.objects.filter(pk=self.generation_id, status=Status.RUNNING, **self.lease).update(
                        heartbeat_at=timezone.now()
                    )
                except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage reads as death
                    log.warning("heartbeat for generation %s failed", self.generation_id, exc_info=True)
                    close_old_connections()
        finally:
            connection.close()


class Beacon:
    """Calls ``publish`` from a side thread at once, then every ``interval`` seconds, and again
    as soon as ``poke`` is called. A call that fails is logged and tried again at the next beat.
    """

    def __init__(self, publish: Callable[[], None], interval: float, *, name: str = "beacon") -> None:
        self.publish = publish
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Beacon:
        self._thread.start()
        return self

    def poke(self) -> None:
        """Publish now, not at the next beat."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage reads as death
                # Once per outage, not every beat.
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "%s: publishing failed",
                    self._thread.name,
                    exc_info=True,
                )
                failing = True
            else:
                if failing:
                    log.info("%s: publishing again", self._thread.name)
                failing = False
            self._wake.wait(self.interval)
