"""The deployment files: compose (checked by `docker compose config` where it exists, and
always against the compose-spec JSON schema), the
Dockerfile, gunicorn's process model per QUEUE mode, and the Celery settings' start-up checks."""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def docker_compose_missing() -> str | None:
    """Why `docker compose` can't run here, or None when it can."""
    docker = shutil.which("docker")
    if docker is None:
        return "the docker client is not installed"
    out = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"the docker client at {docker} has no compose plugin ('docker compose version' exited {out.returncode})"
    return None


def compose_spec_errors(doc: Any) -> list[str]:
    """What the compose-spec JSON schema (the one `docker compose config` validates against)
    finds wrong in ``doc``. The schema comes with check-jsonschema (requirements-dev.txt), which
    vendors it: it can't be downloaded at test time."""
    import json
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_compose_file_matches_the_compose_spec_schema():
    assert compose_spec_errors(compose()) == []
    # The check can fail: a misspelt key, a wrong type and an unknown condition are caught.
    doc = compose()
    doc["services"]["web"]["restrat"] = "always"
    doc["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_finished"
    doc["services"]["redis"]["healthcheck"]["retries"] = [1, 2]
    errors = " | ".join(compose_spec_errors(doc))
    assert "'restrat' was unexpected" in errors
    assert "service_finished" in errors and "services/worker/depends_on" in errors
    assert "services/redis/healthcheck/retries: [1, 2] is not of type" in errors


def test_docker_compose_config_accepts_the_file():
    missing = docker_compose_missing()
    if missing is not None:
        # The step is replaced, not dropped: the file is checked against the compose-spec
        # schema that `docker compose config` itself validates with (interpolation aside,
        # which test_compose_services_gpu_volumes_health_and_env checks by hand).
        assert compose_spec_errors(compose()) == []
        if IN_CI:
            return
        pytest.skip(f"{missing}: checked against the compose-spec JSON schema instead")
    env = {**os.environ, "POSTGRES_PASSWORD": "not-a-real-password"}
    out = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    missing_password = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"},
        cwd="/",
        timeout=60,
    )
    assert missing_password.returncode != 0 and "POSTGRES_PASSWORD" in missing_password.stderr


def test_compose_services_gpu_volumes_health_and_env():
    doc = compose()
    services = doc["services"]
    assert {"web", "worker", "redis", "postgres"} <= set(services)
    for name in ("web", "worker", "redis", "postgres"):
        assert "test" in services[name]["healthcheck"], name

    web, worker = services["web"], services["worker"]
    assert web["command"][0] == "gunicorn" and "gunicorn.conf.py" in web["command"]
    assert worker["command"][:4] == ["celery", "-A", "config", "worker"]
    assert "--concurrency=1" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in web, "the web process never loads a model, so it needs no GPU"

    for svc in (web, worker):
        assert svc["environment"]["QUEUE"] == "celery"
        assert svc["environment"]["DATABASE_URL"].startswith("postgres://")
        assert svc["environment"]["CELERY_BROKER_URL"].startswith("redis://redis:")
        assert svc["env_file"][0]["path"] == ".env"
        mounts = {v.split(":")[1] for v in svc["volumes"]}
        assert {"/data/huggingface", "/data/media"} <= mounts
        assert (
            svc["environment"]["HF_HOME"] == "/data/huggingface" and svc["environment"]["MEDIA_ROOT"] == "/data/media"
        )
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"hf-cache", "media"} <= set(doc["volumes"])
    assert "${POSTGRES_PASSWORD:?" in (ROOT / "docker-compose.yml").read_text(), "a secret has no default"


def test_dockerfile_and_dockerignore():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.index('pip install "torch==') < dockerfile.index("pip install -r requirements.txt")
    assert "USER app" in dockerfile and "HEALTHCHECK" in dockerfile and "/api/health/" in dockerfile
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", "db.sqlite3*", "media", ".git"} <= set(ignored)


def gunicorn_conf(**env: str) -> dict[str, Any]:
    saved = dict(os.environ)
    os.environ.update({"ENV_FILE": "none", **env})
    for name in ("QUEUE", "WEB_CONCURRENCY", "GUNICORN_THREADS"):
        if name not in env:
            os.environ.pop(name, None)
    try:
        return runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_gunicorn_thread_mode_is_one_process_and_refuses_more():
    conf = gunicorn_conf()
    assert conf["workers"] == 1 and conf["worker_class"] == "gthread" and conf["threads"] >= 4
    assert conf["preload_app"] is False and conf["max_requests"] == 0
    assert gunicorn_conf(QUEUE="thread", WEB_CONCURRENCY="1")["workers"] == 1
    with pytest.raises(SystemExit, match="one copy of each model per process"):
        gunicorn_conf(QUEUE="thread", WEB_CONCURRENCY="2")


def test_gunicorn_celery_mode_scales_processes():
    assert gunicorn_conf(QUEUE="celery")["workers"] >= 2
    assert gunicorn_conf(QUEUE="celery", WEB_CONCURRENCY="5", GUNICORN_THREADS="4")["workers"] == 5
    with pytest.raises(SystemExit, match="WEB_CONCURRENCY must be an integer"):
        gunicorn_conf(QUEUE="celery", WEB_CONCURRENCY="many")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gunicorn_serves_the_app_with_the_config(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "ENV_FILE": "none",
        "QUEUE": "celery",  # the web side only: nothing to recover, no model
        "WEB_CONCURRENCY": "2",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "SQLITE_PATH": str(tmp_path / "db.sqlite3"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health/", timeout=5) as resp:
                    assert resp.status == 200 and b'"ok"' in resp.read()
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "gunicorn did not answer within 60s"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CELERY_TASK_TIME_LIMIT": "3600", "CELERY_VISIBILITY_TIMEOUT": "3600"},
            "CELERY_VISIBILITY_TIMEOUT must be longer",
        ),
        (
            {"CELERY_TASK_TIME_LIMIT": "600", "CELERY_TASK_SOFT_TIME_LIMIT": "600"},
            "CELERY_TASK_SOFT_TIME_LIMIT must be below",
        ),
        ({"JOB_HEARTBEAT_INTERVAL": "10", "JOB_STALE_AFTER": "20"}, "JOB_STALE_AFTER must be at least"),
        ({"CELERY_MODEL_QUEUES": "sdxl-base-1.0"}, "CELERY_MODEL_QUEUES entries must look like model_id=queue"),
        ({"CELERY_BROKER_URL": "127.0.0.1:6379"}, "CELERY_BROKER_URL must be a redis://"),
    ],
)
def test_bad_celery_settings_fail_at_start_naming_the_variable(env, message):
    run_env = {**os.environ, "ENV_FILE": "none", "DJANGO_SETTINGS_MODULE": "config.settings", **env}
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "ImproperlyConfigured" in out.stderr and message in out.stderr


def test_celery_app_settings_for_long_gpu_jobs():
    from django.conf import settings

    from config.celery import TASK_NAME, app

    conf = app.conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert conf.task_ignore_result is True
    assert conf.task_default_queue == settings.CELERY_DEFAULT_QUEUE
    import api.tasks  # noqa: F401 - registers the task, as the worker's include does

    assert TASK_NAME in app.tasks


def test_each_model_goes_to_the_queue_of_the_workers_that_hold_it(settings):
    from api.services.celery_executor import queue_for_model

    settings.CELERY_DEFAULT_QUEUE = "generations"
    settings.CELERY_MODEL_QUEUES = {"sdxl-base-1.0": "sdxl"}
    assert queue_for_model("sdxl-base-1.0") == "sdxl"
    assert queue_for_model("tiny-sd") == "generations"
