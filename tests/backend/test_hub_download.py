"""Download and caching for real: a hub on 127.0.0.1 serves a tiny model as a repository.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HOME`` once, at import, so the loads run
in a child process started with them set (``child_main`` below), driven over its stdin and
stdout. The child uses the real ``ModelManager`` with a catalogue file naming the hub
repositories, so the whole path runs: catalogue -> from_pretrained -> huggingface_hub ->
HTTP -> the HF cache.

Each test uses its own repository ids, so the tests don't depend on their order (they may
run in different workers).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_FakeHubToken0123456789"
REPLY = "@@"

# catalogue id -> (repository, variant named in its entry, folder the hub serves or None)
MODELS = {
    "first-load": ("test-org/tiny-sd-first", None, "plain"),
    "cache-load": ("test-org/tiny-sd-cache", None, "plain"),
    "dropped-hub": ("test-org/tiny-sd-dropped", None, "plain"),
    "never-downloaded": ("test-org/tiny-sd-never", None, "plain"),
    "no-such-repo": ("test-org/no-such-repo", None, None),
    "wrong-token": ("test-org/tiny-sd-token", None, "plain"),
    "with-fp16": ("test-org/tiny-sd-fp16", "fp16", "fp16"),
    "with-fp16-run-fp32": ("test-org/tiny-sd-fp16-b", "fp16", "fp16"),
    "without-fp16": ("test-org/tiny-sd-no-fp16", "fp16", "plain"),
}
WEIGHTS = {
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
}
FP16_WEIGHTS = {w.replace(".safetensors", ".fp16.safetensors") for w in WEIGHTS}


# -- the child process -------------------------------------------------------------------------------
def child_main() -> None:
    """Load models on command: one JSON object a line in, one ``@@{json}`` line out."""
    from dataclasses import replace

    import torch

    from backend.config import EngineConfig
    from backend.errors import EngineError
    from backend.manager import ModelManager

    config = EngineConfig.from_env()
    managers: dict[tuple[str, str | None], ModelManager] = {}

    def manager_for(dtype: str, token: str | None) -> ModelManager:
        key = (dtype, token)
        if key not in managers:
            plan = None
            if dtype == "fp16":
                # fp16 is the CUDA plan and there is no CUDA here: give that plan on the CPU.
                # Loading in fp16 works on the CPU; only the device differs from a GPU box.
                cpu = ModelManager(config).device_plan()
                plan = replace(cpu, dtype="fp16")
            managers[key] = ModelManager(replace(config, hf_token=token) if token is not None else config, plan=plan)
        return managers[key]

    def reply(payload: dict[str, Any]) -> None:
        sys.stdout.write(REPLY + json.dumps(payload) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "torch": torch.__version__})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "unload":
            for manager in managers.values():
                manager.unload(cmd["id"])
            reply({"ok": True})
            continue
        manager = manager_for(cmd.get("dtype", "fp32"), cmd.get("token"))
        started = time.perf_counter()
        try:
            model = manager.get(cmd["id"])
        except EngineError as exc:
            reply({"ok": False, "code": exc.code, "message": exc.message, "seconds": time.perf_counter() - started})
            continue
        reply(
            {
                "ok": True,
                "seconds": time.perf_counter() - started,
                "variant": model.variant,
                "unet_dtype": str(model.txt2img.unet.dtype),
                "pipeline": type(model.txt2img).__name__,
            }
        )


class Child:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("w")
        code = "from tests.backend.test_hub_download import child_main; child_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            bufsize=1,
        )
        self.read(timeout=180)

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise AssertionError(f"no answer from the child process; its log:\n{self.log.read_text()[-4000:]}")

    def ask(self, timeout: float = 120, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def load(self, model_id: str, **options: Any) -> dict[str, Any]:
        return self.ask(op="load", id=model_id, **options)

    def close(self) -> None:
        try:
            self.ask(op="quit", timeout=5)
        except (AssertionError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo_folders(tmp_path_factory, tiny_model_dirs) -> dict[str, Path]:  # noqa: ANN001
    """tiny-sd as it is, and a copy that also has fp16 weight files (``*.fp16.safetensors``)."""
    import torch
    from diffusers import StableDiffusionPipeline

    plain = tiny_model_dirs["tiny-sd"]
    with_fp16 = tmp_path_factory.mktemp("repos") / "tiny-sd-fp16"
    shutil.copytree(plain, with_fp16)
    StableDiffusionPipeline.from_pretrained(plain, dtype=torch.float16).save_pretrained(with_fp16, variant="fp16")
    return {"plain": plain, "fp16": with_fp16}


@pytest.fixture(scope="module")
def hub(repo_folders) -> Iterator[FakeHub]:  # noqa: ANN001
    repos = {repo: repo_folders[folder] for repo, _, folder in MODELS.values() if folder is not None}
    with FakeHub(repos, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="module")
def child(hub, hf_home, tmp_path_factory) -> Iterator[Child]:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("child")
    catalog = [
        {"id": mid, "family": "sd15", "default_size": 64, "repo": repo, **({"variant": variant} if variant else {})}
        for mid, (repo, variant, _) in MODELS.items()
    ]
    (folder / "models.json").write_text(json.dumps(catalog))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "MODEL_CATALOG_FILE": str(folder / "models.json"),
        "PYTHONPATH": str(ROOT),
        "DEVICE": "cpu",
    }
    proc = Child(env, folder / "child.log")
    yield proc
    proc.close()


@pytest.fixture
def hub_down(hub) -> Iterator[FakeHub]:  # noqa: ANN001
    """The hub stopped for one test, and started again (same address) after it."""
    hub.stop()
    yield hub
    hub.start()


def snapshot(hf_home: Path, repo: str) -> Path:
    snapshots = list((hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
    assert len(snapshots) == 1, snapshots
    return snapshots[0]


# -- the tests ------------------------------------------------------------------------------------------
def test_a_first_load_downloads_the_model_into_the_hf_cache_with_the_token(child, hub, hf_home):
    repo = MODELS["first-load"][0]
    result = child.load("first-load")
    assert result["ok"], result
    assert result["pipeline"] == "StableDiffusionPipeline"
    downloaded = hub.files_downloaded(repo)
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} | WEIGHTS <= downloaded
    folder = snapshot(hf_home, repo)
    for name in WEIGHTS | {"model_index.json", "tokenizer/tokenizer_config.json"}:
        assert (folder / name).is_file(), name
    asked = [r for r in hub.requests if repo in r.path]
    assert asked and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in asked)


def test_a_second_load_with_the_hub_stopped_comes_from_the_cache(child, hub, hf_home):
    assert child.load("cache-load")["ok"]
    assert WEIGHTS <= hub.files_downloaded(MODELS["cache-load"][0])
    child.ask(op="unload", id="cache-load")
    hub.stop()
    try:
        result = child.load("cache-load")
    finally:
        hub.start()
    assert result["ok"], result
    assert result["pipeline"] == "StableDiffusionPipeline"


def test_an_unreachable_hub_and_an_empty_cache_say_the_model_is_not_available_offline(child, hub_down, hf_home):
    result = child.load("never-downloaded")
    assert not result["ok"]
    assert result["code"] == "model_unavailable"
    message = result["message"]
    assert "'never-downloaded'" in message and "isn't available offline" in message
    assert "hub can't be reached" in message and "preload_models --models never-downloaded" in message
    assert TOKEN not in message and str(hf_home) not in message
    assert result["seconds"] < 30
    assert not (hf_home / "hub" / "models--test-org--tiny-sd-never" / "snapshots").exists()


def test_a_hub_that_drops_connections_falls_back_on_the_cache(child, hub):
    assert child.load("dropped-hub")["ok"]
    child.ask(op="unload", id="dropped-hub")
    hub.drop = True
    try:
        hub.clear()
        result = child.load("dropped-hub")
        tried = len(hub.requests)
    finally:
        hub.drop = False
    assert result["ok"], result
    assert tried >= 1  # it did try the hub first


def test_the_fp16_variant_is_downloaded_when_the_model_runs_in_fp16(child, hub):
    repo = MODELS["with-fp16"][0]
    result = child.load("with-fp16", dtype="fp16")
    assert result["ok"], result
    assert result["variant"] == "fp16" and result["unet_dtype"] == "torch.float16"
    downloaded = hub.files_downloaded(repo)
    assert downloaded >= FP16_WEIGHTS
    assert not downloaded & WEIGHTS  # half the bytes: the full-precision files stay on the hub


def test_fp32_never_asks_for_the_fp16_variant(child, hub):
    repo = MODELS["with-fp16-run-fp32"][0]
    result = child.load("with-fp16-run-fp32")
    assert result["ok"], result
    assert result["variant"] is None and result["unet_dtype"] == "torch.float32"
    downloaded = hub.files_downloaded(repo)
    assert downloaded >= WEIGHTS and not downloaded & FP16_WEIGHTS


def test_a_repository_without_the_fp16_variant_loads_its_default_weights_in_fp16(child, hub):
    result = child.load("without-fp16", dtype="fp16")
    assert result["ok"], result
    assert result["variant"] is None and result["unet_dtype"] == "torch.float16"
    assert WEIGHTS <= hub.files_downloaded(MODELS["without-fp16"][0])


def test_a_repository_the_hub_does_not_have_is_not_found(child, hub):
    result = child.load("no-such-repo")
    assert not result["ok"]
    assert result["code"] == "model_not_found"
    assert "test-org/no-such-repo" in result["message"] and "catalogue" in result["message"]


def test_a_token_the_hub_refuses_is_access_denied_and_never_echoed(child, hub):
    result = child.load("wrong-token", token="hf_WrongToken999")
    assert not result["ok"]
    assert result["code"] == "model_access_denied"
    assert "HF_TOKEN" in result["message"] and "hf_WrongToken999" not in result["message"]
    refused = [r for r in hub.requests if MODELS["wrong-token"][0] in r.path]
    assert refused and all(r.headers.get("authorization") == "Bearer hf_WrongToken999" for r in refused)
