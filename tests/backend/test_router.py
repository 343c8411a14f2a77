"""The router: USE_LOCAL_MODELS=true|false|auto picks the local or the remote backend.

This machine has no GPU, so the CUDA-present cases patch ``torch.cuda.is_available`` and
nothing else: the rest of the decision runs as in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from django.conf import settings

from backend import router
from backend.config import ConfigError, EngineConfig, get_config, set_config
from backend.local import LocalBackend
from backend.remote import RemoteBackend


@pytest.fixture
def engine_config() -> Iterator[None]:
    """Restores the process config and the cached backends after the test."""
    original = get_config()
    router.reset_backends()
    yield
    set_config(original)
    router.reset_backends()


def use(setting: str, *, token: str = "") -> EngineConfig:
    config = replace(settings.ENGINE, use_local_models=setting, hf_token=token, hf_inference_url="")
    set_config(config)
    router.reset_backends()
    return config


@pytest.mark.parametrize(
    ("setting", "cuda", "token", "mode"),
    [
        ("true", False, False, "local"),
        ("true", False, True, "local"),
        ("true", True, False, "local"),
        ("true", True, True, "local"),
        ("false", False, False, "remote"),
        ("false", False, True, "remote"),
        ("false", True, False, "remote"),
        ("false", True, True, "remote"),
        ("auto", True, False, "local"),
        ("auto", True, True, "local"),
        ("auto", False, True, "remote"),
        ("auto", False, False, "local"),
    ],
)
def test_choose_mode_in_every_combination(setting, cuda, token, mode):
    assert router.choose_mode(setting, cuda_available=cuda, has_token=token) == mode


@pytest.mark.usefixtures("engine_config")
class TestCurrentMode:
    def test_true_is_local_even_with_a_token(self):
        assert router.current_mode(use("true", token="hf_x")) == "local"

    def test_false_is_remote_even_without_a_token(self):
        assert router.current_mode(use("false")) == "remote"

    def test_false_does_not_ask_about_cuda(self, monkeypatch):
        def no_question() -> bool:
            raise AssertionError("USE_LOCAL_MODELS=false must not probe CUDA")

        monkeypatch.setattr(torch.cuda, "is_available", no_question)
        assert router.current_mode(use("false")) == "remote"

    def test_auto_with_cuda_is_local_even_with_a_token(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert router.current_mode(use("auto", token="hf_x")) == "local"

    def test_auto_without_cuda_but_with_a_token_is_remote(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert router.current_mode(use("auto", token="hf_x")) == "remote"

    def test_auto_without_cuda_or_token_is_local_on_the_cpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert router.current_mode(use("auto")) == "local"

    def test_auto_on_this_machine_follows_the_real_probe(self):
        expected = "local" if torch.cuda.is_available() else "remote"
        assert router.current_mode(use("auto", token="hf_x")) == expected

    def test_current_mode_reads_the_process_config_by_default(self):
        use("false")
        assert router.current_mode() == "remote"
        use("true")
        assert router.current_mode() == "local"


@pytest.mark.usefixtures("engine_config")
class TestGetBackend:
    def test_local_mode_gives_the_local_backend(self):
        use("true")
        backend = router.get_backend()
        assert isinstance(backend, LocalBackend) and backend.name == "local"

    def test_remote_mode_gives_the_remote_backend_with_the_current_config(self):
        config = use("false", token="hf_x")
        backend = router.get_backend()
        assert isinstance(backend, RemoteBackend) and backend.name == "remote"
        assert backend.config == config

    def test_auto_picks_the_backend_the_mode_says(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        use("auto", token="hf_x")
        assert isinstance(router.get_backend(), RemoteBackend)
        use("auto")
        assert isinstance(router.get_backend(), LocalBackend)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        use("auto", token="hf_x")
        assert isinstance(router.get_backend(), LocalBackend)

    def test_an_explicit_mode_wins_over_the_setting(self):
        use("true")
        assert isinstance(router.get_backend("remote"), RemoteBackend)
        assert isinstance(router.get_backend("local"), LocalBackend)

    def test_backends_are_cached_until_reset(self):
        use("false", token="hf_x")
        first = router.get_backend()
        assert router.get_backend() is first
        router.reset_backends()
        assert router.get_backend() is not first


@pytest.mark.parametrize("value", ["true", "false", "auto", " AUTO ", "False"])
def test_use_local_models_accepts_its_three_choices(value):
    config = EngineConfig.from_env({"USE_LOCAL_MODELS": value}, base_dir=settings.ENGINE.base_dir)
    assert config.use_local_models == value.strip().lower()


def test_use_local_models_defaults_to_true():
    assert EngineConfig.from_env({}, base_dir=settings.ENGINE.base_dir).use_local_models == "true"


@pytest.mark.parametrize("value", ["yes", "remote", "1"])
def test_a_bad_use_local_models_fails_at_start_up(value):
    with pytest.raises(ConfigError, match="USE_LOCAL_MODELS"):
        EngineConfig.from_env({"USE_LOCAL_MODELS": value}, base_dir=settings.ENGINE.base_dir)
