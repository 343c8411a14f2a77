"""Running a bench/ script the way an operator does: its own process, with the suite's own
settings left out of its environment and the tiny models in reach."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)


def run_bench(
    script: str,
    *args: str,
    drop: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``python bench/<script> *args``; ``drop`` names more environment prefixes to leave out,
    ``env`` adds variables. With ``check`` a non-zero exit fails the test, showing the output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", *drop))}
    clean |= {"ENV_FILE": "none", "TINY_MODELS_DIR": str(settings.ENGINE.tiny_models_dir)} | (env or {})
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, output(proc)
    return proc


def output(proc: subprocess.CompletedProcess[str]) -> str:
    """The ends of what a bench printed, for an assertion's message."""
    return proc.stdout[-3000:] + proc.stderr[-3000:]
