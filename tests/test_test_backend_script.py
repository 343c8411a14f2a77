"""The operator's check scripts, run as an operator runs them: test_backend.py and scripts/gpu_check.py.

Both run in a child process on the tiny models this pytest run built, offline, with the HF cache
in a temporary folder. test_backend.py is run with Django made unimportable, to show it
doesn't need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from PIL import Image

ROOT = Path(settings.BASE_DIR)
# Runs the script as __main__ with `import django` failing.
WITHOUT_DJANGO = "import runpy, sys; sys.modules['django'] = None; sys.argv[0] = 'test_backend.py'; runpy.run_path('test_backend.py', run_name='__main__')"


@pytest.fixture
def env(tmp_path, tiny_model_dirs) -> dict[str, str]:  # noqa: ANN001
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DJANGO_", "DEVICE", "TORCH_DTYPE"))}
    return clean | {
        "ENV_FILE": "none",
        "HF_HOME": str(tmp_path / "hf-home"),
        "TINY_MODELS_DIR": str(settings.ENGINE.tiny_models_dir),
        "MODEL_CATALOG_FILE": "",
    }


def run_script(
    args: list[str], env: dict[str, str], stdin: str = "", timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_reports_versions_cuda_and_generates_one_image_without_django(env, tmp_path):
    out = tmp_path / "image.png"
    proc = run_script(["-c", WITHOUT_DJANGO, "--output", str(out), "--steps", "2"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for label in ("Python ", "PyTorch ", "transformers ", "diffusers "):
        assert f"\n{label}" in text, label
    import diffusers
    import torch

    assert torch.__version__ in text and diffusers.__version__ in text
    assert ("CUDA          yes" if torch.cuda.is_available() else "CUDA          no") in text
    assert "device cpu, dtype fp32" in text or torch.cuda.is_available()
    assert "model tiny-sd (builtin://tiny-sd)" in text
    assert "loaded in " in text and "generated 64x64, 2 steps, seed 42: " in text and "s inference" in text
    assert text.rstrip().endswith("OK")
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_interactive_asks_for_prompts_until_an_empty_line(env, tmp_path):
    out = tmp_path / "image.png"
    stdin = "a red fox\na blue bird\n\nnever drawn\n"
    proc = run_script(["test_backend.py", "--interactive", "--output", str(out), "--steps", "2"], env, stdin=stdin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("prompt> ") == 3  # two prompts, then the empty line
    assert "seed 43" in proc.stdout and "seed 44" in proc.stdout and "2 prompt(s) done" in proc.stdout
    assert out.exists() and (tmp_path / "image-1.png").exists() and (tmp_path / "image-2.png").exists()
    assert not (tmp_path / "image-3.png").exists()


def test_exits_non_zero_naming_the_failure(env, tmp_path):
    proc = run_script(["test_backend.py", "--model", "no-such-model"], env)
    assert proc.returncode == 1
    assert "FAILED: model_id 'no-such-model' is not in the catalogue" in proc.stderr and "tiny-sd" in proc.stderr
    # A hub model that was never downloaded, offline: a clear reason, not a traceback.
    proc = run_script(["test_backend.py", "--model", "stable-diffusion-v1-5", "--offline"], env)
    assert proc.returncode == 1
    assert "isn't available offline" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_check_runs_on_the_cpu_with_the_tiny_model(env, tmp_path):
    report = tmp_path / "report.json"
    proc = run_script(
        ["scripts/gpu_check.py", "tiny-sd", "--steps", "2", "--json", str(report), "--save-images", str(tmp_path)], env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 of 1 model(s) passed" in proc.stdout
    (row,) = json.loads(report.read_text())["models"]
    assert row["model"] == "tiny-sd" and row["problems"] == []
    assert row["img2img_shares_weights"] is True and row["load_s"] >= 0 and row["txt2img_s"] > 0
    assert (tmp_path / "tiny-sd-txt2img.png").exists() and (tmp_path / "tiny-sd-img2img.png").exists()
    proc = run_script(["scripts/gpu_check.py", "tiny-sd", "no-such-model"], env)
    assert proc.returncode == 2 and "not in the catalogue: no-such-model" in proc.stderr
