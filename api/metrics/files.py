"""The folder of metric files that the processes of one server share (prometheus_client's
multiprocess mode), and the name each process writes under. No Django here: gunicorn's master
process uses it before any app is loaded.

Every process that records metrics writes its own files into PROMETHEUS_MULTIPROC_DIR, and a
scrape adds them up. Files are named ``<type>_<tag>.<host>.<pid>.db`` rather than by the pid
alone: web and worker containers that share the folder through a volume have pid namespaces
of their own, and two processes writing one file would corrupt it. ``<tag>`` says which kind
of process wrote it (``web``, or ``celery-<node>``).

A server starts by *preparing* the folder (gunicorn's master, a Celery worker's main process,
or a lone server process): it removes the files that processes of this host left behind and
that are no longer running, so counts from an earlier run don't add to this one. Files of
live processes (a worker beside a restarting web server) and of other hosts are kept. Without
PROMETHEUS_MULTIPROC_DIR, the preparing process makes a folder of its own for this run and
removes it when it exits.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by the process that prepared the folder: its children (gunicorn's workers, Celery's pool)
# use the folder as it is, and a process whose parent didn't prepare it prepares it itself.
PREPARED_ENV = "SDAPI_METRICS_PREPARED_BY"
# A folder made for one run, in the temporary folder: this prefix, then the pid that made it.
RUN_FOLDER_PREFIX = "sdapi-metrics-"

_tag = "web"
_made_by: tuple[int, str] | None = None  # (pid, folder): a folder made for this run, removed at exit


def slug(text: str) -> str:
    # Dots separate the parts of a file name's identifier, and "_" separates the parts of the
    # name prometheus_client reads back: neither may appear inside a part.
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:63] or "x"


_host: str | None = None


def host() -> str:
    # Asked on every metric update (prometheus_client checks the name for a fork): kept.
    global _host
    if _host is None:
        _host = slug(socket.gethostname())
    return _host


def directory() -> Path | None:
    raw = os.environ.get(DIR_ENV, "").strip()
    return Path(raw) if raw else None


def set_tag(tag: str) -> None:
    """What kind of process this is; set before it records anything (default ``web``)."""
    global _tag
    _tag = slug(tag)


def tag() -> str:
    return _tag


def identifier(pid: int | None = None) -> str:
    """The name this process's files carry (``pid``: another process of this kind and host)."""
    return f"{_tag}.{host()}.{os.getpid() if pid is None else pid}"


def prepare() -> Path:
    """Choose the folder (PROMETHEUS_MULTIPROC_DIR, or a new one for this run) and remove the
    files of this host's processes that are gone. Children started after this inherit it."""
    global _made_by
    folder = directory()
    if folder is None:
        _remove_dead_run_folders()
        folder = Path(tempfile.mkdtemp(prefix=f"{RUN_FOLDER_PREFIX}{os.getpid()}-"))
        os.environ[DIR_ENV] = str(folder)
        _made_by = (os.getpid(), str(folder))
        atexit.register(cleanup)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead(folder)
    os.environ[PREPARED_ENV] = str(os.getpid())
    return folder


def ensure_prepared() -> Path:
    """The folder, prepared by this process or its parent; prepared now if neither did."""
    folder = directory()
    if folder is not None and os.environ.get(PREPARED_ENV) in (str(os.getpid()), str(os.getppid())):
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return prepare()


def remove_dead(folder: Path) -> list[str]:
    """Remove the files of processes of this host that no longer run; returns their names."""
    removed = []
    me = host()
    for path in glob.glob(os.path.join(folder, "*.db")):
        name = os.path.basename(path)[: -len(".db")]
        ident = name.rsplit("_", 1)[-1]
        parts = ident.split(".")
        if len(parts) != 3 or parts[1] != me or not parts[2].isdigit():
            continue  # another host's file (its own start cleans it), or not one of ours
        pid = int(parts[2])
        if pid != os.getpid() and not _alive(pid):
            try:
                os.remove(path)
                removed.append(os.path.basename(path))
            except FileNotFoundError:
                pass
    return removed


def _remove_dead_run_folders() -> None:
    # A server stopped by a signal that skips exit handlers (runserver on SIGTERM) leaves its
    # folder behind: the next start removes those whose process is gone.
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{RUN_FOLDER_PREFIX}*-*")):
        pid = os.path.basename(path)[len(RUN_FOLDER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def mark_dead(pid: int | None = None) -> None:
    """A process has ended: its live gauges (models loaded, busy ratio, GPU memory) go; its
    counters stay, so totals never go down while the server runs."""
    folder = directory()
    if folder is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(identifier(pid), str(folder))


def cleanup() -> None:
    """At exit: remove the folder this process made for its run (not its children's doing)."""
    if _made_by is not None and _made_by[0] == os.getpid():
        shutil.rmtree(_made_by[1], ignore_errors=True)
