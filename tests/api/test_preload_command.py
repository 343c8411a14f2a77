"""``manage.py preload_models``: load times printed, failures named, a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from backend.manager import ModelManager

ROOT = Path(settings.BASE_DIR)


@pytest.fixture
def offline_manager(monkeypatch, tmp_path, tiny_model_dirs):  # noqa: ANN001, ANN201
    """The process's manager swapped for one that never touches the network (HF_HUB_OFFLINE=1)."""
    from dataclasses import replace

    def install(entries: list[dict] | None = None) -> ModelManager:
        catalog_file = ""
        if entries is not None:
            catalog_file = str(tmp_path / "models.json")
            Path(catalog_file).write_text(json.dumps(entries))
        config = replace(settings.ENGINE, local_files_only=True, model_catalog_file=catalog_file, max_loaded_models=2)
        manager = ModelManager(config)
        monkeypatch.setattr(ModelManager, "_instance", manager)
        return manager

    yield install
    if ModelManager._instance is not None:
        ModelManager._instance.unload_all()


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("preload_models", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_loads_the_models_given_and_prints_each_load_time(offline_manager):
    manager = offline_manager()
    out, err = run("--models", "tiny-sd", "tiny-sdxl")
    assert "tiny-sd: loaded in " in out and "tiny-sdxl: loaded in " in out
    assert "(cpu, fp32)" in out and "all 2 model(s) loaded" in out and err == ""
    assert manager.loaded_ids() == ["tiny-sd", "tiny-sdxl"]


def test_all_loads_every_catalogue_model(offline_manager, tiny_model_dirs):
    hub_ids = ["stable-diffusion-v1-5", "stable-diffusion-2-1", "dreamshaper-8", "sdxl-base-1.0", "openjourney-v4"]
    local = {"id": "local-sd", "family": "sd15", "default_size": 64, "path": str(tiny_model_dirs["tiny-sd"])}
    manager = offline_manager([{"id": i, "remove": True} for i in hub_ids] + [local])
    out, _ = run("--all")
    for model_id in ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint", "local-sd"):
        assert f"{model_id}: loaded in " in out
    assert "MAX_LOADED_MODELS=2" in out and "unloaded again" in out
    assert manager.load_count == {"tiny-sd": 1, "tiny-sdxl": 1, "tiny-sd-inpaint": 1, "local-sd": 1}


def test_a_failure_is_named_and_the_others_still_load(offline_manager):
    offline_manager()
    with pytest.raises(CommandError, match=r"1 of 2 model\(s\) failed to load: dreamshaper-8"):
        out, err = io.StringIO(), io.StringIO()
        try:
            call_command("preload_models", "--models", "dreamshaper-8", "tiny-sd", stdout=out, stderr=err)
        finally:
            assert "dreamshaper-8: FAILED" in err.getvalue() and "isn't available offline" in err.getvalue()
            assert "tiny-sd: loaded in " in out.getvalue()


def test_unknown_ids_are_refused_before_anything_loads(offline_manager):
    manager = offline_manager()
    with pytest.raises(CommandError, match="not in the catalogue: nope, ../tiny-sd; valid ids: "):
        run("--models", "tiny-sd", "nope", "../tiny-sd")
    assert manager.load_count == {}


def test_without_models_it_loads_preload_models_or_says_what_to_give(offline_manager, settings):
    manager = offline_manager()
    settings.PRELOAD_MODELS = []
    with pytest.raises(CommandError, match="--models ID"):
        run()
    settings.PRELOAD_MODELS = ["tiny-sd"]
    out, _ = run()
    assert "tiny-sd: loaded in " in out and manager.loaded_ids() == ["tiny-sd"]


def test_models_and_all_together_are_refused(offline_manager):
    offline_manager()
    with pytest.raises(CommandError):
        run("--all", "--models", "tiny-sd")


def test_the_real_command_exits_non_zero_fast_naming_an_unavailable_hub_model(tmp_path, tiny_model_dirs):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DJANGO_"))}
    env |= {
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "ENV_FILE": "none",
        "HF_HUB_OFFLINE": "1",  # fail at once instead of trying the network
        "HF_HOME": str(tmp_path / "hf-home"),
        "TINY_MODELS_DIR": str(settings.ENGINE.tiny_models_dir),
        "DEVICE": "cpu",
        "MAX_LOADED_MODELS": "2",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "manage.py", "preload_models", "--models", "tiny-sd", "stable-diffusion-v1-5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "tiny-sd: loaded in " in proc.stdout
    assert "stable-diffusion-v1-5: FAILED" in proc.stderr
    assert "isn't available offline" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "failed to load: stable-diffusion-v1-5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120  # mostly interpreter start-up; the offline failure itself is immediate
    failed_line = next(
        line for line in proc.stderr.splitlines() if line.startswith("stable-diffusion-v1-5: FAILED after ")
    )
    assert float(failed_line.split("after ")[1].split("s ")[0]) < 5
