"""Private Redis and PostgreSQL servers for tests that kill and restart them.

The machine's shared servers on 6379 and 5432 serve other test runs at the same time and are
never restarted: a test that breaks its services starts its own, on a free port of 127.0.0.1,
with its data in a folder of its own, and stops them when it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_program(found: object, what: str) -> None:
    """Skip when a server program is not installed, except under CI=true where it must be."""
    if found:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not installed")
    pytest.skip(f"{what} is not installed on this machine")


def _wait(what: str, check: Any, timeout: float, every: float = 0.05) -> None:
    # Not tests.api's wait_for: this module needs no Django, so a soak bench can use it too.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


# --- Redis ---------------------------------------------------------------------------------------


def redis_server_program() -> str | None:
    return shutil.which("redis-server")


class PrivateRedis:
    """A ``redis-server`` of the test's own. ``kill`` is a crash (SIGKILL); ``start`` again
    brings it back on the same port. Without ``appendonly`` it comes back empty, as a Redis
    without persistence does after a crash."""

    def __init__(self, folder: Path, *, port: int | None = None, appendonly: bool = False) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> PrivateRedis:
        program = redis_server_program()
        assert program, "redis-server is not installed"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        cmd = [program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.folder)]
        cmd += ["--logfile", str(self.folder / f"redis-{self.starts}.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(f"redis-server on port {self.port}", self._ready, timeout)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.folder / f"redis-{self.starts}.log"
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{_tail(log)}")
        return ping_redis(self.port)

    def kill(self) -> None:
        """A crash: no shutdown, no save; the port refuses connections at once."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ping_redis(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: PG_BIN, else on PATH, else the newest Debian install."""
    named = os.environ.get("PG_BIN", "").strip()
    if named:
        return Path(named) if (Path(named) / "pg_ctl").exists() else None
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    installs = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return installs[-1].parent if installs else None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own, with trust authentication on 127.0.0.1.

    initdb refuses to run as root: as root, the cluster belongs to the ``postgres`` user and
    its commands run as that user. ``restart`` uses immediate mode: the server stops at once,
    every client connection dies, and the next start replays the write-ahead log, as after a
    crash.
    """

    def __init__(self, *, port: int | None = None, os_user: str = "postgres") -> None:
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None, "PostgreSQL's server programs are not installed"
        self.bin = bin_dir
        self.port = port or free_port()
        self.as_root = os.geteuid() == 0
        self.os_user = os_user
        # Its own folder under /tmp, not pytest's (which only root can enter): the server runs
        # as another user when the tests run as root. Short, too: the socket's path is limited.
        self.folder = Path(tempfile.mkdtemp(prefix="sdapi-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        if self.as_root:
            shutil.chown(self.folder, user=os_user)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=3"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({done.returncode}): {done.stderr}{done.stdout}\n{_tail(self.log)}")
        return done

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self, timeout: float = 60.0) -> PrivatePostgres:
        # fsync off: a crash of the server (not of the machine) loses nothing the OS holds.
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", str(int(timeout)), "start"
        )
        return self

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop at once (every connection dies), then start: the crash a client sees."""
        self.stop("immediate")
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def connect(self) -> Any:
        """A new autocommit connection of the test's own (psycopg)."""
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """One statement on a short connection of its own; no session outlives a restart."""
        with self.connect() as conn:
            return conn.execute(sql, params or None).fetchall()

    def migrate(self, *, root: Path, python: str, env: dict[str, str] | None = None) -> None:
        """The project's schema: ``manage.py migrate`` against this cluster."""
        full = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "ENV_FILE": "none",
            **(env or {}),
            "DATABASE_URL": self.url,
        }
        done = subprocess.run(
            [python, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=root,
            env=full,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"migrate failed ({done.returncode}):\n{done.stderr[-3000:]}")

    def destroy(self) -> None:
        """Stop the server however it is, and remove its folder."""
        if self.running():
            try:
                self.stop("immediate")
            except (AssertionError, subprocess.TimeoutExpired):
                _kill_postmaster(self.data)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.init().start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _kill_postmaster(data: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
