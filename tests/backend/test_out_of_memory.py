"""Out of GPU memory: one retry with less memory (VAE tiling and slicing, one image at a time),
then a clear out_of_memory failure; the next job runs as configured.

There is no CUDA device here, so the pipeline's call is wrapped to raise the error CUDA raises
(torch.cuda.OutOfMemoryError) under the conditions given: that raise is the only thing patched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from backend.errors import OutOfMemory
from backend.local import LocalBackend
from backend.params import GenerationParams


def params(**overrides) -> GenerationParams:  # noqa: ANN003
    base = {"kind": "txt2img", "model_id": "tiny-sd", "prompt": "a cat", "width": 64, "height": 64, "steps": 2}
    return GenerationParams(**(base | {"guidance_scale": 7.5, "seed": 21} | overrides))


@pytest.fixture
def backend(tiny_model_dirs) -> LocalBackend:  # noqa: ANN001
    return LocalBackend()


@pytest.fixture
def oom_when(monkeypatch):  # noqa: ANN001, ANN201
    """oom_when(predicate): the pipeline raises CUDA's OOM whenever predicate(call kwargs) holds."""
    real = StableDiffusionPipeline.__call__
    calls: list[int] = []

    def install(predicate) -> list[int]:  # noqa: ANN001
        def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append(kwargs.get("num_images_per_prompt", 1))
            if predicate(kwargs):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
        return calls

    return install


def pixels(out) -> list[np.ndarray]:  # noqa: ANN001
    return [np.asarray(item.image, dtype=np.int16) for item in out.images]


def test_a_batch_that_does_not_fit_is_run_again_one_image_at_a_time(backend, oom_when, monkeypatch):
    solo = [pixels(backend.generate(params(seed=s)))[0] for s in (21, 22)]
    calls = oom_when(lambda kw: kw.get("num_images_per_prompt", 1) > 1)
    out = backend.generate(params(num_images=2))
    assert calls == [2, 1, 1]  # the batch, then each image alone
    got = pixels(out)
    # Each image is its seed's solo image: a fresh generator per seed for the retry.
    assert all(np.array_equal(a, b) for a, b in zip(got, solo, strict=True))
    assert [i.seed for i in out.images] == [21, 22]
    assert any("ran out of memory" in w for w in out.warnings)
    vae = backend.manager.get("tiny-sd").txt2img.vae
    assert not vae.use_tiling and not vae.use_slicing  # restored for the next job


def test_when_even_the_retry_does_not_fit_the_job_fails_out_of_memory_and_the_next_runs(backend, oom_when):
    before = pixels(backend.generate(params()))[0]
    oom_when(lambda kw: True)
    with pytest.raises(OutOfMemory) as failed:
        backend.generate(params())
    assert failed.value.code == "out_of_memory" and failed.value.http_status == 503
    assert "smaller size" in failed.value.message and "CPU_OFFLOAD=model" in failed.value.message
    oom_when(lambda kw: False)
    assert np.array_equal(pixels(backend.generate(params()))[0], before)


@pytest.mark.usefixtures("live_db")
def test_through_the_api_an_oom_failure_is_a_503_with_retry_after_and_the_server_goes_on(api, oom_when):
    from api.models import Generation

    oom_when(lambda kw: True)
    r = api.post("/api/txt2img/", {"prompt": "x", "seed": 1, "steps": 2}, format="json")
    assert r.status_code == 503 and r["Retry-After"]
    body = r.json()
    assert body["status"] == "failed" and body["error"]["code"] == "out_of_memory"
    assert Generation.objects.get(pk=body["id"]).status == "failed"  # never left running
    oom_when(lambda kw: False)
    assert api.post("/api/txt2img/", {"prompt": "x", "seed": 1, "steps": 2}, format="json").status_code == 200
