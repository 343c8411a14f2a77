"""RemoteBackend: the real InferenceClient against an inference server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from PIL import Image

from backend.catalog import load_catalog
from backend.config import ConfigError, EngineConfig, parse_model_map
from backend.errors import (
    GenerationCancelled,
    InvalidParams,
    RemoteAuthFailed,
    RemoteBadResponse,
    RemoteError,
    RemoteModelUnavailable,
    RemoteNotConfigured,
    RemoteRateLimited,
    RemoteRejected,
    RemoteTimeout,
    RemoteUnreachable,
    UnknownModel,
)
from backend.params import GenerationParams
from backend.remote import RemoteBackend, RemoteTarget, parse_retry_after, public_url, redact
from tests.conftest import png_of
from tests.fakes.inference_server import FakeInferenceServer, Reply

TOKEN = "hf_RemoteTestToken0123456789"


@pytest.fixture(autouse=True)
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    # HF_HUB_OFFLINE=1 (handy for the local-model tests) blocks the client even on 127.0.0.1.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def server() -> Iterator[FakeInferenceServer]:
    with FakeInferenceServer(token=TOKEN) as s:
        yield s


class SleepRecorder:
    """Stands in for time.sleep so backoff tests take no time and can assert the waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    @property
    def total(self) -> float:
        return round(sum(self.calls), 6)


def make_config(url: str = "", **overrides: object) -> EngineConfig:
    values: dict[str, object] = {
        "base_dir": Path("."),
        "use_local_models": "false",
        "hf_token": TOKEN,
        "hf_inference_url": url,
        "remote_timeout_s": 2.0,
        "remote_max_retries": 2,
        "remote_backoff_s": 0.01,
        "remote_max_backoff_s": 0.05,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def make_backend(url: str = "", *, sleep: SleepRecorder | None = None, **overrides: object) -> RemoteBackend:
    kwargs = {"sleep": sleep} if sleep is not None else {}
    return RemoteBackend(make_config(url, **overrides), **kwargs)  # type: ignore[arg-type]


def txt2img(**overrides: object) -> GenerationParams:
    values: dict[str, object] = {
        "kind": "txt2img",
        "model_id": "stable-diffusion-v1-5",
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 96,
        "steps": 12,
        "guidance_scale": 6.5,
        "seed": 41,
    }
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


def img2img(**overrides: object) -> GenerationParams:
    return txt2img(kind="img2img", strength=0.6, **overrides)


# --- the protocol ------------------------------------------------------------------------------


def test_txt2img_sends_one_request_per_image_with_its_seed(server):
    progress: list[tuple[int, int]] = []
    out = make_backend(server.url).generate(txt2img(num_images=3), on_progress=lambda s, t: progress.append((s, t)))

    assert out.backend == "remote"
    assert [img.seed for img in out.images] == [41, 42, 43]
    assert all(img.image.mode == "RGB" and img.image.size == (64, 96) for img in out.images)
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert {"inference_s", "retry_wait_s"} <= set(out.timings) and out.warnings == []
    assert len(server.requests) == 3
    for request, seed in zip(server.requests, (41, 42, 43), strict=True):
        assert request.method == "POST" and request.path == server.path
        assert request.authorization == f"Bearer {TOKEN}"
        assert request.headers["content-type"] == "application/json"
        assert request.json == {
            "inputs": "a lighthouse at dusk",
            "parameters": {
                "negative_prompt": "blurry",
                "width": 64,
                "height": 96,
                "num_inference_steps": 12,
                "guidance_scale": 6.5,
                "seed": seed,
            },
        }


def test_images_come_back_as_the_service_drew_them_per_seed(server):
    backend = make_backend(server.url)
    first = backend.generate(txt2img(num_images=2))
    again = backend.generate(txt2img(seed=42))
    a, b = (img.image.getpixel((0, 0)) for img in first.images)
    assert a != b
    assert again.images[0].image.getpixel((0, 0)) == b


def test_empty_negative_prompt_is_left_out_and_scheduler_is_sent_by_class_name(server):
    out = make_backend(server.url).generate(txt2img(negative_prompt="", scheduler="euler_a"))
    parameters = server.bodies[0]["parameters"]
    assert "negative_prompt" not in parameters
    assert parameters["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert out.warnings == []


def test_scheduler_options_that_cant_be_sent_are_reported(server):
    out = make_backend(server.url).generate(txt2img(scheduler="dpmpp_2m_karras"))
    assert server.bodies[0]["parameters"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert any("use_karras_sigmas" in w for w in out.warnings)


def test_an_unknown_scheduler_is_refused_before_any_request(server):
    with pytest.raises(InvalidParams, match="scheduler"):
        make_backend(server.url).generate(txt2img(scheduler="nope"))
    assert server.requests == []


def test_img2img_sends_the_resized_image_as_base64_with_its_parameters(server):
    init = Image.open(io.BytesIO(png_of((10, 200, 10), size=(100, 50))))
    out = make_backend(server.url).generate(img2img(num_images=2), init_image=init)

    assert [img.seed for img in out.images] == [41, 42]
    assert all(img.image.size == (64, 96) for img in out.images)
    assert len(server.requests) == 2
    body = server.bodies[1]
    assert body["parameters"] == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "num_inference_steps": 12,
        "guidance_scale": 6.5,
        "target_size": {"width": 64, "height": 96},
        "strength": 0.6,
        "seed": 42,
    }
    sent = Image.open(io.BytesIO(base64.b64decode(body["inputs"])))
    assert sent.format == "PNG" and sent.size == (64, 96)
    assert sent.convert("RGB").getpixel((5, 5)) == (10, 200, 10)
    assert server.requests[1].authorization == f"Bearer {TOKEN}"


def test_img2img_without_an_image_is_refused_before_any_request(server):
    with pytest.raises(InvalidParams):
        make_backend(server.url).generate(img2img())
    assert server.requests == []


def test_an_image_of_another_size_is_resized_to_the_request_with_a_warning(server):
    server.script(Reply.png(size=(32, 32)), Reply.png(size=(32, 32)))
    out = make_backend(server.url).generate(txt2img(num_images=2))
    assert [img.image.size for img in out.images] == [(64, 96), (64, 96)]
    assert out.warnings == ["the inference service returned 32x32; resized to 64x96"]


# --- failures and retries ----------------------------------------------------------------------


def test_bad_token_is_a_clear_auth_error_and_not_retried(server):
    backend = make_backend(server.url, hf_token="hf_WrongToken0000000000")
    with pytest.raises(RemoteAuthFailed) as info:
        backend.generate(txt2img())
    assert info.value.code == "remote_auth_failed" and info.value.http_status == 502
    assert "HTTP 401" in info.value.message and "HF_TOKEN" in info.value.message
    assert len(server.requests) == 1


def test_forbidden_is_an_auth_error_too(server):
    server.script(Reply.error(403, "gated"))
    with pytest.raises(RemoteAuthFailed, match="HTTP 403"):
        make_backend(server.url).generate(txt2img())


def test_503_then_200_succeeds_after_one_retry(server):
    sleep = SleepRecorder()
    server.script(Reply.error(503, "Model is loading"))
    out = make_backend(server.url, sleep=sleep, remote_backoff_s=0.5, remote_max_backoff_s=10).generate(txt2img())
    assert len(out.images) == 1 and len(server.requests) == 2
    assert server.bodies[0] == server.bodies[1]
    assert sleep.total == 0.5  # no Retry-After: the first backoff step
    assert out.timings["retry_wait_s"] == 0.5
    assert out.warnings == ["the inference service asked to wait and was retried 1 time(s)"]


def test_503_waits_for_the_loading_estimate_when_there_is_no_retry_after(server):
    sleep = SleepRecorder()
    server.script(Reply.error(503, "Model is loading", estimated_time=3.5))
    make_backend(server.url, sleep=sleep, remote_max_backoff_s=10).generate(txt2img())
    assert sleep.total == 3.5


def test_503_every_time_becomes_model_unavailable_after_the_retries(server):
    server.always(Reply.error(503, "Model is loading"))
    with pytest.raises(RemoteModelUnavailable) as info:
        make_backend(server.url, remote_max_retries=2).generate(txt2img())
    assert info.value.code == "remote_model_unavailable" and info.value.http_status == 503
    assert "after 3 attempt(s)" in info.value.message
    assert len(server.requests) == 3


def test_429_honours_retry_after_then_fails_clearly_when_retries_run_out(server):
    sleep = SleepRecorder()
    server.always(Reply.error(429, "Rate limit reached", headers={"Retry-After": "7"}))
    backend = make_backend(
        server.url, sleep=sleep, remote_max_retries=3, remote_backoff_s=0.01, remote_max_backoff_s=30
    )
    with pytest.raises(RemoteRateLimited) as info:
        backend.generate(txt2img())
    assert info.value.code == "remote_rate_limited" and info.value.http_status == 429
    assert "HTTP 429" in info.value.message and "after 4 attempt(s)" in info.value.message
    assert len(server.requests) == 4
    assert sleep.total == 21.0  # Retry-After, not the 0.01 s backoff, three times


def test_retry_after_is_capped_by_the_max_backoff(server):
    sleep = SleepRecorder()
    server.script(Reply.error(429, "slow down", headers={"Retry-After": "3600"}))
    make_backend(server.url, sleep=sleep, remote_max_backoff_s=2).generate(txt2img())
    assert sleep.total == 2.0


def test_backoff_doubles_without_retry_after_up_to_the_cap(server):
    sleep = SleepRecorder()
    server.always(Reply.error(503, "busy"))
    backend = make_backend(server.url, sleep=sleep, remote_max_retries=4, remote_backoff_s=1, remote_max_backoff_s=5)
    with pytest.raises(RemoteModelUnavailable):
        backend.generate(txt2img())
    assert sleep.total == 1 + 2 + 4 + 5


def test_retry_after_is_really_waited_between_requests(server):
    server.script(Reply.error(429, "slow down", headers={"Retry-After": "0.3"}))
    make_backend(server.url, remote_max_backoff_s=5).generate(txt2img())
    assert len(server.requests) == 2
    assert server.requests[1].at - server.requests[0].at >= 0.3


def test_zero_retries_fails_on_the_first_429(server):
    server.script(Reply.error(429, "slow down", headers={"Retry-After": "1"}))
    with pytest.raises(RemoteRateLimited):
        make_backend(server.url, remote_max_retries=0).generate(txt2img())
    assert len(server.requests) == 1


def test_a_hang_is_a_timeout_error_within_the_configured_time(server):
    server.script(Reply.hang(30))
    backend = make_backend(server.url, remote_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RemoteTimeout) as info:
        backend.generate(txt2img())
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0
    assert info.value.code == "remote_timeout" and info.value.http_status == 504
    assert "0.5s" in info.value.message and "REMOTE_TIMEOUT" in info.value.message
    assert len(server.requests) == 1


def test_a_gateway_timeout_answer_is_a_timeout_error(server):
    server.script(Reply.error(504, "upstream timed out"))
    with pytest.raises(RemoteTimeout, match="HTTP 504"):
        make_backend(server.url).generate(txt2img())


def test_a_200_that_is_not_an_image_is_a_bad_response(server):
    server.script(Reply.raw(b"<html><body>Welcome to nginx!</body></html>"))
    with pytest.raises(RemoteBadResponse) as info:
        make_backend(server.url).generate(txt2img())
    assert info.value.code == "remote_bad_response" and info.value.http_status == 502
    assert "not an image" in info.value.message


def test_a_truncated_image_is_a_bad_response(server):
    server.script(Reply.raw(png_of(size=(64, 96))[:80], content_type="image/png"))
    with pytest.raises(RemoteBadResponse, match="broken image"):
        make_backend(server.url).generate(txt2img())


@pytest.mark.parametrize(
    ("status", "error", "fragment"),
    [
        (404, RemoteModelUnavailable, "HTTP 404"),
        (422, RemoteRejected, "width must be <= 1024"),
        (400, RemoteRejected, "width must be <= 1024"),
        (500, RemoteError, "HTTP 500"),
    ],
)
def test_other_statuses_have_their_own_errors_and_are_not_retried(server, status, error, fragment):
    server.script(Reply.error(status, "width must be <= 1024"))
    with pytest.raises(error, match=fragment):
        make_backend(server.url).generate(txt2img())
    assert len(server.requests) == 1


def test_a_wrong_path_is_model_unavailable(server):
    with pytest.raises(RemoteModelUnavailable, match="HTTP 404"):
        make_backend(server.base + "/models/nope").generate(txt2img())


def test_an_unreachable_service_is_its_own_error():
    with FakeInferenceServer(token=TOKEN) as s:
        url = s.url
    with pytest.raises(RemoteUnreachable) as info:
        make_backend(url).generate(txt2img())
    assert info.value.code == "remote_unreachable" and info.value.http_status == 503


def test_hf_hub_offline_is_reported_instead_of_sent(server, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RemoteUnreachable, match="HF_HUB_OFFLINE"):
        make_backend(server.url).generate(txt2img())
    assert server.requests == []


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_is_checked_between_images(server):
    done: list[int] = []
    with pytest.raises(GenerationCancelled):
        make_backend(server.url).generate(
            txt2img(num_images=4), on_progress=lambda s, t: done.append(s), should_cancel=lambda: len(done) >= 2
        )
    assert len(server.requests) == 2


def test_a_cancel_during_the_last_call_drops_its_image(server):
    server.script(Reply(delay_s=0.3))
    cancel_after = time.monotonic() + 0.1
    with pytest.raises(GenerationCancelled):
        make_backend(server.url).generate(txt2img(), should_cancel=lambda: time.monotonic() >= cancel_after)
    assert len(server.requests) == 1


def test_cancel_stops_a_backoff_wait(server):
    server.always(Reply.error(503, "loading", headers={"Retry-After": "30"}))
    cancelled_at = time.monotonic() + 0.3
    backend = make_backend(server.url, remote_max_retries=5, remote_max_backoff_s=30)
    started = time.monotonic()
    with pytest.raises(GenerationCancelled):
        backend.generate(txt2img(), should_cancel=lambda: time.monotonic() >= cancelled_at)
    assert time.monotonic() - started < 2.0
    assert len(server.requests) == 1


# --- the token stays secret -----------------------------------------------------------------------


def test_token_never_appears_in_errors_or_logs(server, caplog):
    echoing = FakeInferenceServer(token=TOKEN, echo_credentials=True).start()
    loggers = [logging.getLogger(name) for name in ("backend", "huggingface_hub", "httpx2", "httpcore2")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    try:
        for logger in loggers:
            logger.setLevel(logging.DEBUG)
        # The service repeats what it got: the client's error text then holds the token.
        with pytest.raises(RemoteAuthFailed) as info:
            make_backend(echoing.url, hf_token=TOKEN + "x").generate(txt2img())
        messages.append(info.value.message)
        server.script(Reply.error(422, f"bad request from Bearer {TOKEN} ({TOKEN})"))
        with pytest.raises(RemoteRejected) as info2:
            make_backend(server.url).generate(txt2img())
        messages.append(info2.value.message)
        server.script(Reply.error(503, f"loading for {TOKEN}"), Reply.raw(b"not an image"))
        with pytest.raises(RemoteBadResponse) as info3:
            make_backend(server.url).generate(txt2img())
        messages.append(info3.value.message)
        make_backend(server.url).generate(txt2img())
    finally:
        echoing.stop()
        for logger in loggers:
            logger.removeHandler(caplog.handler)
            logger.setLevel(logging.NOTSET)
    assert caplog.records, "the backend logs its calls"
    assert all(TOKEN not in m for m in messages)
    assert "bad request from Bearer *** (***)" in messages[1]
    assert TOKEN not in caplog.text
    assert TOKEN[3:] not in caplog.text
    # The service's echo did reach the log, masked.
    assert "Invalid credentials in Authorization header (got 'Bearer ***')" in caplog.text
    assert server.requests[-1].authorization == f"Bearer {TOKEN}"


def test_redact_masks_the_token_and_anything_shaped_like_one():
    assert redact(f"a {TOKEN} b", TOKEN) == "a *** b"
    assert redact("Authorization: Bearer sk-secret-value, next", "") == "Authorization: Bearer ***, next"
    assert redact("leaked hf_abcdefghijklmnop here") == "leaked hf_*** here"


def test_repr_of_config_and_client_hide_the_token(server):
    backend = make_backend(server.url)
    assert TOKEN not in repr(backend.config)
    assert TOKEN not in repr(backend.client(backend.target("tiny-sd")))


# --- where requests go ----------------------------------------------------------------------------


def test_hf_inference_url_sends_every_model_to_exactly_that_url(server):
    backend = make_backend(server.url, hf_remote_model_map="tiny-sd=owner/elsewhere")
    for model_id in ("tiny-sd", "stable-diffusion-v1-5", "sdxl-base-1.0"):
        assert backend.target(model_id) == RemoteTarget(server.url)
        backend.generate(txt2img(model_id=model_id))
    assert [r.path for r in server.requests] == [server.path] * 3


def test_without_a_url_the_catalogue_repo_and_provider_are_used():
    backend = make_backend(hf_inference_provider="hf-inference")
    target = backend.target("sdxl-base-1.0")
    assert target == RemoteTarget("stabilityai/stable-diffusion-xl-base-1.0", "hf-inference")
    client = backend.client(target)
    assert client.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert client.provider == "hf-inference"
    assert client.timeout == 2.0
    assert client.token == TOKEN


def test_without_a_provider_the_client_chooses_one():
    target = make_backend().target("stable-diffusion-v1-5")
    assert target.provider is None
    assert "provider auto" in target.describe()


def test_model_map_overrides_the_catalogue_and_covers_builtin_models():
    backend = make_backend(
        hf_remote_model_map="stable-diffusion-v1-5=me/my-sd15, tiny-sd=me/tiny", hf_inference_provider="fal-ai"
    )
    assert backend.target("stable-diffusion-v1-5") == RemoteTarget("me/my-sd15", "fal-ai")
    assert backend.target("tiny-sd") == RemoteTarget("me/tiny", "fal-ai")
    assert backend.target("dreamshaper-8") == RemoteTarget("Lykon/dreamshaper-8", "fal-ai")


def test_model_map_can_point_one_model_at_its_own_endpoint(server):
    backend = make_backend(hf_remote_model_map=f"tiny-sd={server.url}")
    out = backend.generate(txt2img(model_id="tiny-sd"))
    assert len(out.images) == 1
    assert server.requests[0].path == server.path
    assert server.requests[0].authorization == f"Bearer {TOKEN}"


def test_a_model_without_a_hub_repo_is_unavailable_remotely_with_the_fix_named():
    with pytest.raises(RemoteModelUnavailable, match="HF_REMOTE_MODEL_MAP=tiny-sd=owner/repo"):
        make_backend().target("tiny-sd")


def test_an_unknown_model_is_refused():
    with pytest.raises(UnknownModel):
        make_backend().target("no-such-model")


def test_an_operator_catalogue_entry_is_routed_to_its_repo(tmp_path):
    catalog_file = tmp_path / "models.json"
    catalog_file.write_text('[{"id": "my-model", "family": "sd15", "default_size": 512, "repo": "me/my-model"}]')
    backend = make_backend(model_catalog_file=str(catalog_file))
    assert backend.target("my-model") == RemoteTarget("me/my-model", None)
    assert set(load_catalog(str(catalog_file))) == set(backend.catalog)


def test_routing_without_a_token_is_not_configured():
    backend = make_backend(hf_token="")
    with pytest.raises(RemoteNotConfigured, match="HF_TOKEN"):
        backend.generate(txt2img())


def test_an_endpoint_without_a_token_gets_no_authorization_header(monkeypatch):
    # Not even a token the client could find by itself in the environment.
    monkeypatch.setenv("HF_TOKEN", "hf_AmbientToken0123456789")
    with FakeInferenceServer() as open_server:
        out = make_backend(open_server.url, hf_token="").generate(txt2img())
    assert len(out.images) == 1
    assert open_server.requests[0].authorization is None


def test_an_unsupported_provider_is_model_unavailable():
    backend = make_backend(hf_inference_provider="no-such-provider")
    with pytest.raises(RemoteModelUnavailable, match="no-such-provider"):
        backend.generate(txt2img())


# --- configuration and helpers --------------------------------------------------------------------


def test_remote_settings_are_read_from_the_environment():
    config = EngineConfig.from_env(
        {
            "HF_TOKEN": " hf_fromenv ",
            "HF_INFERENCE_URL": "https://example.endpoints.huggingface.cloud",
            "HF_INFERENCE_PROVIDER": "hf-inference",
            "HF_REMOTE_MODEL_MAP": "tiny-sd=me/tiny",
            "REMOTE_TIMEOUT": "45",
            "REMOTE_MAX_RETRIES": "5",
            "REMOTE_BACKOFF": "0.5",
            "REMOTE_MAX_BACKOFF": "10",
        },
        base_dir=Path("."),
    )
    assert (config.hf_token, config.hf_inference_url, config.hf_inference_provider) == (
        "hf_fromenv",
        "https://example.endpoints.huggingface.cloud",
        "hf-inference",
    )
    assert config.hf_remote_model_map == "tiny-sd=me/tiny"
    assert (
        config.remote_timeout_s,
        config.remote_max_retries,
        config.remote_backoff_s,
        config.remote_max_backoff_s,
    ) == (45.0, 5, 0.5, 10.0)
    assert "hf_fromenv" not in repr(config)


def test_remote_defaults():
    config = EngineConfig.from_env({}, base_dir=Path("."))
    assert (config.hf_inference_url, config.hf_inference_provider, config.hf_remote_model_map) == ("", "", "")
    assert (
        config.remote_timeout_s,
        config.remote_max_retries,
        config.remote_backoff_s,
        config.remote_max_backoff_s,
    ) == (120.0, 3, 1.0, 30.0)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"HF_INFERENCE_URL": "example.com/endpoint"}, "HF_INFERENCE_URL"),
        ({"HF_REMOTE_MODEL_MAP": "tiny-sd"}, "HF_REMOTE_MODEL_MAP"),
        ({"HF_REMOTE_MODEL_MAP": "tiny-sd=not-a-repo"}, "HF_REMOTE_MODEL_MAP"),
        ({"REMOTE_TIMEOUT": "0"}, "REMOTE_TIMEOUT"),
        ({"REMOTE_MAX_RETRIES": "21"}, "REMOTE_MAX_RETRIES"),
        ({"REMOTE_BACKOFF": "-1"}, "REMOTE_BACKOFF"),
        ({"REMOTE_MAX_BACKOFF": "soon"}, "REMOTE_MAX_BACKOFF"),
    ],
)
def test_bad_remote_settings_fail_at_start_up_naming_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        EngineConfig.from_env(env, base_dir=Path("."))


def test_a_url_with_credentials_is_not_echoed_in_the_config_error():
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_env({"HF_INFERENCE_URL": "ftp://user:secret@host"}, base_dir=Path("."))
    assert "secret" not in str(info.value)


def test_parse_model_map():
    assert parse_model_map("") == {}
    assert parse_model_map(" a=o/r , b = https://x.example/p?q=1 ,") == {"a": "o/r", "b": "https://x.example/p?q=1"}


def test_parse_retry_after_accepts_seconds_and_http_dates():
    from datetime import UTC, datetime

    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_public_url_drops_credentials_and_query():
    assert public_url("https://user:pw@host.example:8443/models/x?token=abc#f") == "https://host.example:8443/models/x"


def test_endpoint_address_stays_out_of_client_messages(server):
    server.script(Reply.error(500, "boom"))
    with pytest.raises(RemoteError) as info:
        make_backend(server.url).generate(txt2img())
    assert "127.0.0.1" not in info.value.message


def test_config_is_taken_from_the_process_config_by_default(server):
    from backend.config import get_config, set_config

    original = get_config()
    set_config(replace(make_config(server.url), remote_timeout_s=7.0))
    try:
        assert RemoteBackend().config.remote_timeout_s == 7.0
    finally:
        set_config(original)
