"""Prometheus metrics at /metrics: real generations move the counters by their own amounts,
label values stay bounded, access follows METRICS_TOKEN and AUTH_REQUIRED, and the files of
several real processes (gunicorn's workers, a neighbour, a Celery worker) add up in one scrape.

Each scrape is read with prometheus_client's own text parser, as Prometheus would. Counts are
compared before and after: other tests in this process count too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from api.auth import api_key_create, api_key_revoke
from api.metrics import files, recording
from api.models import Generation
from backend.catalog import ModelSpec
from backend.manager import get_manager
from tests.api import test_celery_worker
from tests.api.test_celery_worker import database_env, wait_for

# A real `celery worker` process on a queue of its own, as the Celery tests run it.
celery_mode = test_celery_worker.celery_mode

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"width": 64, "height": 64, "steps": 2}
TOKEN = "scrape-" + "t" * 25

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(client: Any, **headers: str) -> Samples:
    r = client.get("/metrics", **headers)
    assert r.status_code == 200, r.content
    assert r["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(r.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def broken_model(tmp_path: Path) -> Any:
    """A catalogue entry whose folder holds no weights: its jobs really fail at the load."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    manager = get_manager()
    manager.catalog["broken-metrics"] = ModelSpec(
        id="broken-metrics", name="Broken", family="sd15", default_size=64, source="local", path=str(folder)
    )
    yield "broken-metrics"
    manager.catalog.pop("broken-metrics", None)


# --- counters after real generations ----------------------------------------------------------


@pytest.mark.usefixtures("live_db")
def test_a_generation_moves_each_metric_by_its_own_amount(api):
    get_manager().unload("tiny-sd")  # so this job's load is counted too
    before = scrape(api)
    r = api.post("/api/txt2img/", {"prompt": "a red cube", "seed": 3, "num_images": 2, **SMALL}, format="json")
    assert r.status_code == 200, r.content
    row = Generation.objects.get(pk=r.json()["id"])
    after = scrape(api)

    model = {"model": "tiny-sd"}
    job = {**model, "kind": "txt2img"}
    assert delta(before, after, "sd_images_total", **model) == 2
    assert delta(before, after, "sd_jobs_total", **job, status="succeeded") == 1
    assert delta(before, after, "sd_jobs_total", **job, status="failed") == 0
    assert delta(before, after, "sd_generation_seconds_count", **job) == 1
    assert delta(before, after, "sd_generation_seconds_sum", **job) == pytest.approx(row.timings["inference_s"])
    assert delta(before, after, "sd_queue_wait_seconds_count") == 1
    waited = (row.started_at - row.created_at).total_seconds()
    assert delta(before, after, "sd_queue_wait_seconds_sum") == pytest.approx(waited, abs=1e-6)
    assert delta(before, after, "sd_model_load_seconds_count", **model) == 1
    assert delta(before, after, "sd_model_load_seconds_sum", **model) > 0
    assert value(after, "sd_models_loaded") >= 1
    assert 0 < value(after, "sd_worker_busy_ratio") <= 1
    # A histogram's buckets are cumulative and end at its count.
    assert value(after, "sd_generation_seconds_bucket", **job, le="+Inf") == value(
        after, "sd_generation_seconds_count", **job
    )
    # The request itself, and the first scrape (counted once it had answered).
    assert delta(before, after, "sd_requests_total", endpoint="/api/txt2img/", status="200") == 1
    assert delta(before, after, "sd_request_duration_seconds_count", endpoint="/api/txt2img/") == 1
    assert delta(before, after, "sd_requests_total", endpoint="/metrics", status="200") == 1
    # Nothing is left queued or running; the gauges are read from the job table.
    assert value(after, "sd_queue_depth") == 0 and value(after, "sd_jobs_running") == 0


@pytest.mark.usefixtures("live_db")
def test_a_failed_job_counts_as_failed_with_no_images_or_generation_time(api, broken_model):
    before = scrape(api)
    r = api.post("/api/txt2img/", {"prompt": "x", "model_id": broken_model, "seed": 1, **SMALL}, format="json")
    assert r.status_code == 503, r.content
    assert r.json()["error"]["code"] == "model_unavailable"
    after = scrape(api)
    job = {"model": broken_model, "kind": "txt2img"}
    assert delta(before, after, "sd_jobs_total", **job, status="failed") == 1
    assert delta(before, after, "sd_jobs_total", **job, status="succeeded") == 0
    assert delta(before, after, "sd_images_total", model=broken_model) == 0
    assert delta(before, after, "sd_generation_seconds_count", **job) == 0
    assert delta(before, after, "sd_model_load_seconds_count", model=broken_model) == 0
    assert delta(before, after, "sd_requests_total", endpoint="/api/txt2img/", status="503") == 1


@pytest.mark.usefixtures("live_db")
def test_queued_and_running_jobs_are_counted_in_the_job_table_at_scrape_time(api):
    rows = [Generation.objects.create(kind="txt2img", model_id="tiny-sd", params={}, seed=i) for i in range(3)]
    Generation.objects.filter(pk=rows[0].pk).update(status="running")
    try:
        samples = scrape(api)
        assert value(samples, "sd_queue_depth") == 2
        assert value(samples, "sd_jobs_running") == 1
    finally:
        Generation.objects.filter(pk__in=[r.pk for r in rows]).delete()
    assert value(scrape(api), "sd_queue_depth") == 0


# --- bounded labels ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_request_labels_are_route_patterns_never_raw_paths(api):
    before = scrape(api)
    ids = [uuid.uuid4() for _ in range(5)]
    for pk in ids:
        assert api.get(f"/api/results/{pk}/").status_code == 404
        assert api.get(f"/no/such/{pk}/page").status_code == 404
        assert api.get(f"/api/no-such-{pk}/").status_code == 404
    # Refused from its Content-Length before any routing: still labelled by its route.
    too_big = str(settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    r = api.generic("POST", "/api/txt2img/", b"{}", content_type="application/json", CONTENT_LENGTH=too_big)
    assert r.status_code == 413
    after = scrape(api)

    assert delta(before, after, "sd_requests_total", endpoint="/api/results/<pk>/", status="404") == 5
    assert delta(before, after, "sd_requests_total", endpoint="unmatched", status="404") == 10
    assert delta(before, after, "sd_requests_total", endpoint="/api/txt2img/", status="413") == 1
    endpoints = label_values(after, "sd_requests_total", "endpoint")
    assert not any(str(pk) in e or "no-such" in e for pk in ids for e in endpoints), endpoints
    assert all(e == "unmatched" or e.startswith("/") for e in endpoints), endpoints
    new = endpoints - label_values(before, "sd_requests_total", "endpoint")
    assert new <= {"/api/results/<pk>/", "unmatched", "/api/txt2img/", "/metrics"}, new
    assert all(s.isdigit() and len(s) == 3 for s in label_values(after, "sd_requests_total", "status"))


# --- who may read /metrics -----------------------------------------------------------------------


def assert_refused(r: Any, code: str) -> dict[str, Any]:
    assert r.status_code == 401, r.content
    assert r["WWW-Authenticate"] == 'Bearer realm="metrics"'
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert "/metrics needs" in body["error"]["message"]
    return body


@pytest.mark.django_db
def test_auth_required_needs_an_api_key(api, settings):
    settings.AUTH_REQUIRED = True
    settings.METRICS_TOKEN = ""
    assert_refused(api.get("/metrics"), "not_authenticated")
    assert_refused(api.get("/metrics", HTTP_AUTHORIZATION="Bearer sdk_not-a-key"), "authentication_failed")
    row, key = api_key_create(name="ops")
    assert api.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    api_key_revoke(api_key=row)
    assert_refused(api.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {key}"), "authentication_failed")


@pytest.mark.django_db
def test_metrics_token_opens_it_alone_and_a_wrong_one_is_refused(api, settings):
    settings.METRICS_TOKEN = TOKEN
    for auth_required in (True, False):
        settings.AUTH_REQUIRED = auth_required
        scrape(api, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        # Set, the token closes /metrics even where the API is open.
        assert_refused(api.get("/metrics"), "not_authenticated")
        for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            body = assert_refused(api.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {wrong}"), "authentication_failed")
            assert "METRICS_TOKEN" in body["error"]["message"] and wrong not in json.dumps(body)
        assert_refused(api.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}"), "not_authenticated")
    # An API key still opens it.
    _, key = api_key_create(name="ops")
    assert api.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200


@pytest.mark.django_db
def test_open_like_the_api_without_token_or_auth_and_get_only(api, settings):
    settings.AUTH_REQUIRED = False
    settings.METRICS_TOKEN = ""
    scrape(api)
    r = api.post("/metrics")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"METRICS_TOKEN": "t" * 15}, "METRICS_TOKEN must be at least 16 characters, got 15"),
        ({"METRICS_TOKEN": "t" * 16}, None),
        ({"METRICS_TOKEN": "t" * 17}, None),
        ({"WORKER_METRICS_PORT": "-1"}, "WORKER_METRICS_PORT must be >= 0, got -1"),
        ({"WORKER_METRICS_PORT": "65535"}, None),
        ({"WORKER_METRICS_PORT": "65536"}, "WORKER_METRICS_PORT must be <= 65535, got 65536"),
        ({"WORKER_METRICS_PORT": "lots"}, "WORKER_METRICS_PORT must be an integer, got 'lots'"),
        ({"WORKER_METRICS_ADDR": "metrics.local"}, "WORKER_METRICS_ADDR must be an IP address, got 'metrics.local'"),
        ({"WORKER_METRICS_ADDR": "127.0.0.1"}, None),
    ],
)
def test_settings_are_checked_at_start_up(env, problem):
    out = subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        cwd=ROOT,
        env={**os.environ, "ENV_FILE": "none", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if problem is None:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0 and f"ImproperlyConfigured: {problem}" in out.stderr, out.stderr


# --- GPU memory --------------------------------------------------------------------------------


class _CudaInUse:
    """Stands in for torch.cuda on a machine with one GPU in use: this machine has none."""

    def __init__(self, initialized: bool = True) -> None:
        self.initialized = initialized

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return 1

    def memory_allocated(self, index: int) -> int:
        return 3 * 2**30

    def memory_reserved(self, index: int) -> int:
        return 4 * 2**30

    def get_device_properties(self, index: int) -> Any:
        return SimpleNamespace(total_memory=80 * 2**30)


@pytest.mark.django_db
def test_gpu_memory_is_sampled_only_where_cuda_is_already_in_use(api):
    recording.sample_gpu_memory(None)  # a process that never imported torch: nothing to read
    recording.sample_gpu_memory(SimpleNamespace(cuda=_CudaInUse(initialized=False)))
    me = {"pid": files.identifier(), "device": "cuda:0"}
    assert value(scrape(api), "sd_gpu_memory_bytes", **me, kind="total") == 0
    recording.sample_gpu_memory(SimpleNamespace(cuda=_CudaInUse()))
    samples = scrape(api)
    assert value(samples, "sd_gpu_memory_bytes", **me, kind="allocated") == 3 * 2**30
    assert value(samples, "sd_gpu_memory_bytes", **me, kind="reserved") == 4 * 2**30
    assert value(samples, "sd_gpu_memory_bytes", **me, kind="total") == 80 * 2**30
    for kind in ("allocated", "reserved", "total"):
        recording.m.GPU_MEMORY.labels("cuda:0", kind).set(0)


# --- the busy ratio -----------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_busy_ratio_is_the_share_of_the_last_minute_inside_pipeline_calls():
    clock = _Clock()
    meter = recording.BusyMeter(window=60.0, clock=clock)
    assert meter.ratio() == 0.0
    meter.start()
    clock.now += 15
    assert meter.ratio() == 1.0  # busy all its life so far, the call still running
    meter.end()
    clock.now += 15
    assert meter.ratio() == 0.5  # 15 s of 30
    clock.now += 30
    assert meter.ratio() == 0.25  # 15 s of the last 60
    clock.now += 40
    assert meter.ratio() == 0.0  # the call ended 70 s ago
    meter.start()
    clock.now += 30
    assert meter.ratio() == 0.5
    clock.now += 90
    assert meter.ratio() == 1.0  # a call longer than the window


# --- several processes, one folder --------------------------------------------------------------

NEIGHBOUR = textwrap.dedent(
    """
    import os, sys
    import django

    django.setup()
    from api.metrics import files

    files.set_tag(sys.argv[1])
    from api.metrics import registry

    registry.REQUESTS.labels(sys.argv[2], "200").inc(int(sys.argv[3]))
    print("counted", flush=True)
    if sys.argv[4] == "stay":
        sys.stdin.read()  # alive until the test closes its stdin
    """
)


def neighbour(folder: Path, tag: str, endpoint: str, count: int, *, stay: bool) -> subprocess.Popen[str]:
    """Another process of this host writing into ``folder``: alive, or already gone."""
    env = {
        **os.environ,
        **database_env(),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "ENV_FILE": "none",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", NEIGHBOUR, tag, endpoint, str(count), "stay" if stay else "go"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "counted"
    if not stay:
        proc.wait(30)
    return proc


def get(url: str, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def counter_pids(folder: Path, tag: str) -> set[str]:
    """The processes of a kind that counted something."""
    return {p.name.split(".")[-2] for p in folder.glob(f"counter_{tag}.*.db")}


def process_pids(folder: Path, tag: str) -> set[str]:
    """The processes of a kind that have started recording (their histograms exist from the start)."""
    return {p.name.split(".")[-2] for p in folder.glob(f"histogram_{tag}.*.db")}


@pytest.mark.slow
@pytest.mark.usefixtures("live_db")
def test_gunicorn_processes_and_a_live_neighbour_add_up_and_an_earlier_run_is_wiped(tmp_path):
    folder = tmp_path / "metrics"
    # A process of an earlier run, gone: its counts must not survive the server's start.
    neighbour(folder, "web", "/earlier-run/", 7, stay=False)
    assert counter_pids(folder, "web")
    # A live process of this host (a worker beside the web server): its counts must.
    beside = neighbour(folder, "celery-beside", "/beside/", 5, stay=True)
    queued = Generation.objects.create(kind="txt2img", model_id="tiny-sd", params={}, seed=1)
    port = free_port()
    env = {
        **os.environ,
        **database_env(),
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "ENV_FILE": "none",
        "QUEUE": "celery",  # the web side only: any number of processes
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        "SSE_MAX_STREAMS": "4",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "METRICS_TOKEN": TOKEN,
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("gunicorn", lambda: _up(base, server), 90, 0.2)
        # Until both processes have answered some (bounded): then every one is counted once.
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while len(counter_pids(folder, "web")) < 2 and sent < 400:
                codes = list(pool.map(lambda _: get(f"{base}/api/health/")[0], range(20)))
                assert codes == [200] * 20
                sent += 20
        assert len(counter_pids(folder, "web")) == 2, "one gunicorn process answered every request"
        status, body = get(f"{base}/metrics", Authorization=f"Bearer {TOKEN}")
        assert status == 200, body
        samples = parse(body.decode())
        assert value(samples, "sd_requests_total", endpoint="/api/health/", status="200") == sent
        assert value(samples, "sd_request_duration_seconds_count", endpoint="/api/health/") == sent
        assert value(samples, "sd_requests_total", endpoint="/beside/", status="200") == 5
        assert ("sd_requests_total", frozenset({("endpoint", "/earlier-run/"), ("status", "200")})) not in samples
        assert value(samples, "sd_queue_depth") == 1

        # A process killed: gunicorn's child_exit takes its live gauges out, and its counts stay
        # in the totals, also once its replacement has started (which must not clean up).
        started = process_pids(folder, "web")
        victim = sorted(counter_pids(folder, "web"))[0]
        os.kill(int(victim), signal.SIGKILL)
        ident = f"web.{files.host()}.{victim}"
        wait_for("child_exit", lambda: not (folder / f"gauge_livesum_{ident}.db").exists(), 30, 0.1)
        wait_for("the replacement process", lambda: process_pids(folder, "web") - started, 60, 0.1)
        assert (folder / f"counter_{ident}.db").exists()
        samples = parse(get(f"{base}/metrics", Authorization=f"Bearer {TOKEN}")[1].decode())
        assert value(samples, "sd_requests_total", endpoint="/api/health/", status="200") == sent
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()
        beside.stdin.close()  # type: ignore[union-attr]
        beside.wait(30)
        queued.delete()
    # The server removes nothing on exit from a folder it was given.
    assert counter_pids(folder, "web")


def _up(base: str, server: subprocess.Popen[bytes]) -> bool:
    # Asks /metrics without the token (a 401): the health requests counted are the test's own.
    assert server.poll() is None, f"gunicorn exited with {server.returncode}"
    try:
        return get(f"{base}/metrics")[0] == 401
    except OSError:
        return False


def test_a_lone_server_makes_a_folder_for_its_run_and_removes_it_at_exit(transactional_db):
    code = textwrap.dedent(
        """
        import os, sys
        import django

        django.setup()
        from django.test import Client

        client = Client()
        client.get("/api/health/")
        text = client.get("/metrics").content.decode()
        print(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        print(os.getpid())
        print("torch imported:", "torch" in sys.modules)
        print(text)
        """
    )
    # What a server stopped by SIGTERM left behind (runserver runs no exit handlers then).
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = Path(tempfile.mkdtemp(prefix=f"{files.RUN_FOLDER_PREFIX}{gone.stdout.strip()}-"))
    (left / "counter_web.host.1.db").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k not in (files.DIR_ENV, files.PREPARED_ENV)}
    env.update(database_env(), DJANGO_SETTINGS_MODULE="config.settings_test", ENV_FILE="none")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    folder, pid, imported, *text = out.stdout.splitlines()
    assert Path(folder).name.startswith(f"sdapi-metrics-{pid}-") and not Path(folder).exists()
    assert not left.exists()
    assert imported == "torch imported: False"
    samples = parse("\n".join(text) + "\n")
    assert value(samples, "sd_requests_total", endpoint="/api/health/", status="200") == 1


# --- a Celery worker ------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_a_celery_workers_job_counts_in_the_web_scrape_and_on_its_own_port(api, celery_mode, monkeypatch):
    worker = celery_mode
    scrape(api)  # this process's files exist, so the worker inherits the folder
    folder = files.directory()
    assert folder is not None and os.environ[files.DIR_ENV] == str(folder)
    port = free_port()
    monkeypatch.setenv("WORKER_METRICS_PORT", str(port))
    monkeypatch.setenv("WORKER_METRICS_ADDR", "127.0.0.1")
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    worker.start()
    # After the worker's start: it removed what dead workers of earlier tests left.
    before = scrape(api)
    r = api.post("/api/txt2img/", {"prompt": "a lighthouse", "seed": 5, **SMALL}, format="json")
    assert r.status_code == 200, r.content
    assert Generation.objects.get(pk=r.json()["id"]).worker.startswith("celery@")
    after = scrape(api)
    job = {"model": "tiny-sd", "kind": "txt2img"}
    assert delta(before, after, "sd_jobs_total", **job, status="succeeded") == 1
    assert delta(before, after, "sd_images_total", model="tiny-sd") == 1
    assert delta(before, after, "sd_generation_seconds_count", **job) == 1
    assert delta(before, after, "sd_queue_wait_seconds_count") == 1
    assert any(p.name.startswith("counter_celery-") for p in folder.glob("*.db"))

    # Its own port: its processes' files only, behind METRICS_TOKEN.
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for("the worker's metrics port", lambda: _listening(port), 30, 0.1)
    status, body = get(url)
    assert status == 401 and json.loads(body)["error"]["code"] == "not_authenticated"
    status, body = get(url, Authorization=f"Bearer {TOKEN}x")
    assert status == 401 and json.loads(body)["error"]["code"] == "authentication_failed"
    status, body = get(url, Authorization=f"Bearer {TOKEN}")
    assert status == 200
    own = parse(body.decode())
    assert value(own, "sd_jobs_total", **job, status="succeeded") == 1
    assert value(own, "sd_images_total", model="tiny-sd") == 1
    assert value(own, "sd_model_load_seconds_count", model="tiny-sd") == 1
    assert value(own, "sd_models_loaded") == 1
    assert not label_values(own, "sd_requests_total", "endpoint"), "the web server's requests are not its own"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- the shipped dashboard ----------------------------------------------------------------------


def test_the_grafana_dashboard_asks_only_for_metrics_the_server_has():
    from api.metrics import registry

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14 and {p["type"] for p in dashboard["panels"]} <= {"timeseries", "stat", "gauge"}
    known = {"sd_queue_depth", "sd_jobs_running"} | {
        m._name for m in vars(registry).values() if hasattr(m, "_name") and hasattr(m, "_type")
    }
    used = {re.sub(r"_(bucket|sum|count|total)$", "", n) for e in exprs for n in re.findall(r"\bsd_[a-z_]+", e)}
    known = {re.sub(r"_total$", "", n) for n in known}
    assert used == known, used ^ known
