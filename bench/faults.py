"""Crash soak: kill the process that runs the jobs at chosen moments of N jobs, restart it each
time, and count what the jobs became.

    .venv/bin/python bench/faults.py                       # both modes, 20 jobs, 6 kills each
    .venv/bin/python bench/faults.py --mode celery -n 40 --kills 10 --json faults.json

Each mode gets a throwaway SQLite database (or --database-url) and media folder, gunicorn on
loopback and the built-in tiny model. Jobs are sent as async POSTs to /api/txt2img/; most share
one batch key, so the worker runs them as micro-batches (BATCH_MAX_IMAGES); every fourth makes
four large images in two steps, so that saving is most of its time.

- ``celery``: the web process stays up; the Celery worker (its own process group) is killed
  with SIGKILL and started again. Its start-up pass finds the dead worker's jobs.
- ``thread``: the web process with its embedded worker (gunicorn's whole process group) is
  killed and started again; its start-up pass recovers what it left.

The kills cycle through four moments:

- ``random``: at a random time;
- ``running``: while a job is between denoising steps;
- ``batch``: while two or more jobs run as one micro-batch;
- ``saving``: after a job's last denoising step (its images being decoded, encoded and
  written) or once its first files exist, while its row is not yet final.

A moment that doesn't come within a few seconds is taken as ``random`` at that point. Once the
kills are done, every job gets time to end; then each job and the media folder are checked:

- ``stuck``: not finished (queued or running) when the time is up;
- ``duplicates``: more image rows or PNG files than the job asked for;
- ``missing``: a succeeded job with fewer images than asked, or an image row without its file;
- ``orphans``: files that no image row claims (a failed job's leftovers, a half-written PNG);
- ``failed (other)``: failures with a code other than ``worker_lost``.

A job killed MAX_ATTEMPTS times fails ``worker_lost``: that is the designed outcome, counted
apart. The goal is 0 stuck, 0 duplicates, 0 missing, 0 orphans, 0 other failures; the exit
status is 1 when it is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import free_port  # noqa: E402

MOMENTS = ("random", "running", "batch", "saving")
FINISHED = {"succeeded", "failed", "cancelled"}


class Soak:
    """One mode's stack: gunicorn (and in celery mode a worker), each in its own process group."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sdapi-faults-{mode}-"))
        self.media = self.tmp / "media"
        self.port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.starts = Counter[str]()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "ENV_FILE": "none",
            "DATABASE_URL": args.database_url,
            "SQLITE_PATH": str(self.tmp / "db.sqlite3"),
            "MEDIA_ROOT": str(self.media),
            "QUEUE": mode,
            "AUTH_REQUIRED": "false",
            "RATE_LIMIT_GENERATE": "",
            "RATE_LIMIT_READ": "",
            "MAX_ACTIVE_JOBS_PER_KEY": str(max(8, args.jobs)),
            "MAX_ATTEMPTS": str(args.max_attempts),
            "BATCH_MAX_IMAGES": str(args.batch_max),
            "JOB_HEARTBEAT_INTERVAL": "1",
            "JOB_STALE_AFTER": "5",
            "JOB_RECOVERY_INTERVAL": "1",
            "PROGRESS_MIN_INTERVAL": "0",
            "LOG_LEVEL": "WARNING",
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_LOG_LEVEL": "warning",
            "CELERY_BROKER_URL": args.redis,
            "CELERY_DEFAULT_QUEUE": f"faults-{uuid.uuid4().hex[:8]}",
            # One CPU thread per process: the soak measures what survives, not speed, and
            # several processes each spinning a core-sized OpenMP pool on a small box run
            # 10-20 times slower than one.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        if args.database_url:
            self.env.pop("SQLITE_PATH")

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.starts[name] += 1
        self.started_wall = time.time()
        log = (self.tmp / f"{name}-{self.starts[name]}.log").open("wb")
        # A session of its own: SIGKILL goes to the whole group (gunicorn's workers, a pool's
        # children), as when a container or a machine dies.
        return subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_web(self) -> None:
        self.web = self._spawn(
            "web", [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"]
        )
        self._wait_healthy()

    def start_worker(self) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "--concurrency", "1"]
        cmd += ["-Q", self.env["CELERY_DEFAULT_QUEUE"], "-n", f"faults-{self.port}-{self.starts['worker'] + 1}@%h"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
        self.worker = self._spawn("worker", cmd)
        log = self.tmp / f"worker-{self.starts['worker']}.log"
        self._wait(lambda: " ready." in log.read_text(errors="replace"), f"the worker to start; see {log}")

    def kill(self) -> None:
        """SIGKILL the process group that runs the jobs, then start it again."""
        proc = self.worker if self.mode == "celery" else self.web
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if self.mode == "celery":
            self.start_worker()
        else:
            self.start_web()

    def __enter__(self) -> Soak:
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True)
        self.start_web()
        if self.mode == "celery":
            self.start_worker()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (self.worker, self.web):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)

    def _wait(self, check: Any, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in (self.web, self.worker):
                if proc is not None and proc.poll() is not None:
                    raise SystemExit(
                        f"a process exited with {proc.returncode} while waiting for {what}; see {self.tmp}"
                    )
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.tmp}")
            time.sleep(0.1)

    def _wait_healthy(self) -> None:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/api/health/", timeout=5):
                    return True
            except OSError:
                return False

        self._wait(healthy, "the web process to answer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, seed: int) -> str:
        args = self.args
        body = {
            "prompt": f"soak {seed}" if seed % 5 else f"soak (odd one out) {seed}",
            "seed": seed,
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            # Most jobs share a batch key; every fifth asks for two images.
            "num_images": 2 if seed % 5 == 0 else 1,
            "async": True,
        }
        if seed % 4 == 0:
            # Few steps and four large images: most of the job is saving them, so a kill can
            # land there (at 64x64 the files are written in a few milliseconds).
            body.update(steps=2, width=args.save_size, height=args.save_size, num_images=4)
        req = urllib.request.Request(
            f"{self.url}/api/txt2img/",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["id"]
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"submit failed with {exc.code}: {exc.read()[:300]!r}") from None


def _django(soak: Soak) -> None:
    """This process reads the soak's database through the server's own models."""
    for key in ("DJANGO_SETTINGS_MODULE", "ENV_FILE", "DATABASE_URL", "SQLITE_PATH", "MEDIA_ROOT", "QUEUE"):
        if key in soak.env:
            os.environ[key] = soak.env[key]
        else:
            os.environ.pop(key, None)
    import django
    from django.conf import settings

    if settings.configured:
        from django.db import connections

        connections.close_all()
        # A second mode in this process: point the connection at the new database.
        db = connections.databases["default"]
        if soak.env.get("SQLITE_PATH"):
            db["NAME"] = soak.env["SQLITE_PATH"]
        settings.MEDIA_ROOT = soak.env["MEDIA_ROOT"]
        return
    django.setup()


def _rows(ids: list[str]) -> list[dict[str, Any]]:
    from django.db import close_old_connections

    from api.models import Generation

    close_old_connections()
    return list(
        Generation.objects.filter(pk__in=ids).values(
            "id", "status", "worker", "started_at", "progress", "attempts", "error"
        )
    )


def _finished(ids: list[str]) -> int:
    return sum(r["status"] in FINISHED for r in _rows(ids))


def _folder(soak: Soak, gid: Any) -> Path:
    return soak.media / "generations" / str(gid)


def _find_moment(soak: Soak, moment: str, ids: list[str], wait: float) -> tuple[str, str | None]:
    """Wait up to ``wait`` seconds for ``moment``; returns the moment caught and, for
    ``saving``, the job whose files were appearing."""
    if moment == "random":
        time.sleep(random.uniform(0, wait))
        return "random", None
    if moment == "saving":
        # Its window is milliseconds long at each job's end: give it more jobs' ends to hit.
        return _find_saving(soak, ids, 3 * wait)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        rows = _rows(ids)
        running = [r for r in rows if r["status"] == "running"]
        if moment == "running" and any((r["progress"] or {}).get("step", 0) >= 1 for r in running):
            return moment, None
        if moment == "batch":
            together = Counter((r["worker"], r["started_at"]) for r in running)
            if any(n >= 2 for n in together.values()):
                return moment, None
        if all(r["status"] in FINISHED for r in rows):
            break
        time.sleep(0.02)
    return "random", None


def _find_saving(soak: Soak, ids: list[str], wait: float) -> tuple[str, str | None]:
    """A job's files appearing, written since the last (re)start, while its row wasn't final at
    the last look (at most 50 ms ago). The caller checks the row after the kill."""
    root = soak.media / "generations"
    deadline = time.monotonic() + wait
    final: set[str] = set()
    next_look = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= next_look:
            final = {str(r["id"]) for r in _rows(ids) if r["status"] in FINISHED}
            if len(final) == len(ids):
                break
            next_look = now + 0.05
        for folder in os.scandir(root) if root.exists() else []:
            if folder.name in final:
                continue
            try:
                if any(f.stat().st_mtime >= soak.started_wall for f in os.scandir(folder.path)):
                    return "saving", folder.name
            except FileNotFoundError:
                continue  # removed meanwhile (a recovery cleaning up)
        time.sleep(0.001)
    return "random", None


def _ended_before(gid: str, moment: datetime) -> bool:
    from api.models import Generation

    finished_at = Generation.objects.filter(pk=gid).values_list("finished_at", flat=True).first()
    return finished_at is not None and finished_at <= moment


def audit(soak: Soak, ids: list[str]) -> dict[str, Any]:
    from django.db import close_old_connections

    from api.images import thumbnail_name
    from api.models import Generation

    close_old_connections()
    counts = Counter[str]()
    problems: list[str] = []
    claimed: set[Path] = set()
    for g in Generation.objects.filter(pk__in=ids).prefetch_related("images"):
        images = list(g.images.all())
        asked = int(g.params.get("num_images", 1))
        files = [soak.media / i.file for i in images]
        claimed.update(files)
        claimed.update(soak.media / thumbnail_name(i.file) for i in images)
        pngs = list(_folder(soak, g.pk).glob("*.png"))
        if g.status not in FINISHED:
            counts["stuck"] += 1
            problems.append(f"{g.pk}: stuck {g.status} (attempt {g.attempts}, {g.worker})")
            continue
        if g.status == "succeeded":
            counts["succeeded"] += 1
            if len(images) > asked or len(pngs) > asked or len({i.index for i in images}) < len(images):
                counts["duplicates"] += 1
                problems.append(f"{g.pk}: {len(images)} image rows, {len(pngs)} PNGs for {asked} images")
            if len(images) < asked or not all(f.is_file() for f in files):
                counts["missing"] += 1
                problems.append(f"{g.pk}: succeeded with {len(images)}/{asked} images or a file missing")
        elif (g.error or {}).get("code") == "worker_lost":
            counts["worker_lost"] += 1
        else:
            counts["failed_other"] += 1
            problems.append(f"{g.pk}: {g.status} {g.error}")
    known = {str(i) for i in ids}
    root = soak.media / "generations"
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file() and path not in claimed:
            counts["orphans"] += 1
            owner = path.parent.name
            problems.append(
                f"orphan file {path.relative_to(soak.media)}" + ("" if owner in known else " (no such job)")
            )
    return {"counts": counts, "problems": problems}


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    rng_seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(rng_seed)
    started = time.perf_counter()
    with Soak(mode, args) as soak:
        _django(soak)
        ids = [soak.submit(seed) for seed in range(1, args.jobs + 1)]
        kills: Counter[str] = Counter()
        for k in range(args.kills):
            if all(r["status"] in FINISHED for r in _rows(ids)):
                break
            done = _finished(ids)
            moment, suspect = _find_moment(soak, MOMENTS[k % len(MOMENTS)], ids, args.moment_wait)
            killed_at = datetime.now(UTC)
            soak.kill()
            if suspect is not None and _ended_before(suspect, killed_at):
                moment = "random"  # its row was final already: not a kill while saving
            kills[moment] += 1
            # Spread the kills over the run: let at least one more job end before the next.
            deadline = time.monotonic() + args.moment_wait
            while time.monotonic() < deadline and _finished(ids) <= done < len(ids):
                time.sleep(0.05)
        deadline = time.monotonic() + args.finish_timeout
        while time.monotonic() < deadline and not all(r["status"] in FINISHED for r in _rows(ids)):
            time.sleep(0.2)
        # A finished job's last files are written before its row turns final; wait out nothing.
        result = audit(soak, ids)
        result.update(
            mode=mode,
            jobs=len(ids),
            kills=dict(kills),
            starts=dict(soak.starts),
            wall_s=round(time.perf_counter() - started, 1),
            rng_seed=rng_seed,
            folder=str(soak.tmp),
        )
    return result


GOALS = ("stuck", "duplicates", "missing", "orphans", "failed_other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--mode", default="celery,thread", help="celery, thread, or both comma-separated")
    parser.add_argument("-n", "--jobs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=6, help="kills per mode (cycling through the moments)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--save-size", type=int, default=256, help="the size of every fourth job's four images")
    parser.add_argument("--batch-max", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--moment-wait", type=float, default=8.0, help="seconds to wait for a kill's moment")
    parser.add_argument("--finish-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None, help="the kill schedule's random seed")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--database-url", default="", help="a PostgreSQL URL; default: a throwaway SQLite file")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    results = [run_mode(mode.strip(), args) for mode in args.mode.split(",") if mode.strip()]

    print()
    header = ("mode", "jobs", "kills", "succeeded", "worker_lost", *GOALS, "wall s")
    rows = []
    for r in results:
        c = r["counts"]
        kills = sum(r["kills"].values())
        detail = "/".join(str(r["kills"].get(m, 0)) for m in MOMENTS)
        rows.append(
            (r["mode"], r["jobs"], f"{kills} ({detail})", c["succeeded"], c["worker_lost"])
            + tuple(c[g] for g in GOALS)
            + (r["wall_s"],)
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))
    print(f"kills are counted by moment: {'/'.join(MOMENTS)}")
    for r in results:
        for problem in r["problems"]:
            print(f"[{r['mode']}] {problem}")
        print(f"[{r['mode']}] kill schedule seed {r['rng_seed']}; logs and media in {r['folder']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if any(r["counts"][g] for r in results for g in GOALS):
        sys.exit(1)


if __name__ == "__main__":
    main()
