"""Micro-batches in the engine: jobs that share a batch key run as one pipeline call, and each
keeps its own images (equal to its solo run within BATCH_PIXEL_TOLERANCE), errors and cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from backend.errors import GenerationCancelled, InvalidParams
from backend.local import LocalBackend
from backend.params import BatchMember, GenerationOutput, GenerationParams, LoraRef, batch_key
from tests.conftest import BATCH_PIXEL_TOLERANCE


def params(**overrides) -> GenerationParams:  # noqa: ANN003
    base = {"kind": "txt2img", "model_id": "tiny-sd", "prompt": "a cat", "width": 64, "height": 64, "steps": 3}
    return GenerationParams(**(base | {"guidance_scale": 7.5, "seed": 21} | overrides))


@pytest.fixture
def backend(tiny_model_dirs) -> LocalBackend:  # noqa: ANN001
    return LocalBackend()


@pytest.fixture
def pipeline_calls(monkeypatch):  # noqa: ANN001, ANN201
    """Counts the pipeline's calls and the images each one made (observed, not replaced)."""
    calls: list[int] = []

    def observe(cls) -> None:  # noqa: ANN001
        real = cls.__call__

        def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            out = real(self, *args, **kwargs)
            calls.append(len(out.images))
            return out

        monkeypatch.setattr(cls, "__call__", call)

    observe(StableDiffusionPipeline)
    observe(StableDiffusionImg2ImgPipeline)
    return calls


def pixels(out: GenerationOutput) -> list[np.ndarray]:
    return [np.asarray(item.image, dtype=np.int16) for item in out.images]


def close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        int(np.abs(x - y).max()) <= BATCH_PIXEL_TOLERANCE for x, y in zip(a, b, strict=True)
    )


def test_batch_key_covers_what_is_one_value_per_call():
    assert batch_key(params(prompt="x", seed=1, num_images=2)) == batch_key(params(prompt="y", seed=9))
    for change in (
        {"steps": 4},
        {"width": 128},
        {"scheduler": "euler"},
        {"guidance_scale": 5.0},
        {"model_id": "tiny-sdxl"},
        {"loras": (LoraRef("style", 0.5),)},
    ):
        assert batch_key(params(**change)) != batch_key(params()), change
    assert batch_key(params(loras=(LoraRef("s", 0.5),))) != batch_key(params(loras=(LoraRef("s", 0.8),)))
    assert batch_key(params(kind="img2img", strength=0.5)) != batch_key(params(kind="img2img", strength=0.6))


def test_one_call_for_several_jobs_and_each_equals_its_solo_run(backend, pipeline_calls):
    jobs = [
        params(prompt="a red barn", seed=5),
        params(prompt="a blue sea", seed=77, num_images=2, negative_prompt="blurry"),
        params(prompt="a green hill", seed=123),
    ]
    solo = [pixels(backend.generate(p)) for p in jobs]
    pipeline_calls.clear()
    results = backend.generate_batch([BatchMember(p) for p in jobs])
    assert pipeline_calls == [4]  # one call, four images
    for p, result, alone in zip(jobs, results, solo, strict=True):
        assert isinstance(result, GenerationOutput)
        assert [i.seed for i in result.images] == p.seeds
        assert close(pixels(result), alone)
        assert result.timings["batch_jobs"] == 3 and result.timings["batch_images"] == 4


def test_weighted_and_plain_prompts_run_as_separate_calls_and_stay_equal_to_solo(backend, pipeline_calls):
    jobs = [
        params(prompt="a (red:1.4) barn", seed=5),
        params(prompt="a plain barn", seed=6),
        params(prompt="(blue:0.7) sea", seed=7),
    ]
    solo = [pixels(backend.generate(p)) for p in jobs]
    pipeline_calls.clear()
    results = backend.generate_batch([BatchMember(p) for p in jobs])
    # The two weighted prompts (same embedding shape) share a call; the plain one has its own.
    assert sorted(pipeline_calls) == [1, 2]
    for result, alone in zip(results, solo, strict=True):
        assert close(pixels(result), alone)


def test_a_member_with_a_bad_prompt_fails_alone(backend, settings):
    backend.manager.config  # noqa: B018 - the engine's config (MAX_PROMPT_TOKENS=600 by default)
    too_long = " ".join(["word"] * 700)
    jobs = [params(prompt="fine", seed=1), params(prompt=too_long, seed=2), params(prompt="also fine", seed=3)]
    results = backend.generate_batch([BatchMember(p) for p in jobs])
    assert isinstance(results[1], InvalidParams) and "MAX_PROMPT_TOKENS" in str(results[1])
    assert isinstance(results[0], GenerationOutput) and isinstance(results[2], GenerationOutput)
    assert close(pixels(results[0]), pixels(backend.generate(jobs[0])))


def test_a_cancelled_member_loses_its_images_and_the_others_are_unaffected(backend):
    jobs = [params(prompt="keep me", seed=1), params(prompt="cancel me", seed=2), params(prompt="keep me too", seed=3)]
    solo = [pixels(backend.generate(p)) for p in (jobs[0], jobs[2])]
    steps_seen: list[int] = []
    results = backend.generate_batch(
        [
            BatchMember(jobs[0], on_progress=lambda s, t: steps_seen.append(s)),
            BatchMember(jobs[1], should_cancel=lambda: len(steps_seen) >= 1),
            BatchMember(jobs[2]),
        ]
    )
    assert isinstance(results[1], GenerationCancelled)
    assert close(pixels(results[0]), solo[0]) and close(pixels(results[2]), solo[1])
    assert steps_seen == [1, 2, 3]  # the call went on to the end for the others


def test_when_every_member_is_cancelled_the_call_stops(backend, pipeline_calls):
    steps: list[int] = []
    results = backend.generate_batch(
        [
            BatchMember(params(seed=s), on_progress=lambda a, b: steps.append(a), should_cancel=lambda: bool(steps))
            for s in (1, 2)
        ]
    )
    assert all(isinstance(r, GenerationCancelled) for r in results)
    assert pipeline_calls == [] and steps == [1, 1]  # stopped in the second step, before decoding


def test_jobs_with_different_keys_are_refused_as_one_batch(backend):
    with pytest.raises(InvalidParams, match="share"):
        backend.generate_batch([BatchMember(params()), BatchMember(params(steps=5))])


def test_img2img_members_keep_their_own_input_images(backend, pipeline_calls):
    from PIL import Image

    reds = Image.new("RGB", (64, 64), (200, 30, 30))
    blues = Image.new("RGB", (64, 64), (30, 30, 200))
    jobs = [(params(kind="img2img", strength=0.6, seed=4), reds), (params(kind="img2img", strength=0.6, seed=9), blues)]
    solo = [pixels(backend.generate(p, init_image=img)) for p, img in jobs]
    pipeline_calls.clear()
    results = backend.generate_batch([BatchMember(p, init_image=img) for p, img in jobs])
    assert pipeline_calls == [2]
    for result, alone in zip(results, solo, strict=True):
        assert close(pixels(result), alone)
    assert not close(pixels(results[0]), pixels(results[1]))


def test_out_of_memory_in_a_batch_is_retried_one_image_at_a_time(backend, monkeypatch):
    """No CUDA here: the pipeline call is wrapped to raise CUDA's OOM error for any call of more
    than one image. That raise is the only thing patched."""
    jobs = [params(prompt="first", seed=11), params(prompt="second", seed=12, num_images=2)]
    solo = [pixels(backend.generate(p)) for p in jobs]
    real = StableDiffusionPipeline.__call__
    sizes: list[int] = []

    def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        n = len(kwargs["prompt"]) if isinstance(kwargs.get("prompt"), list) else kwargs.get("num_images_per_prompt", 1)
        sizes.append(n)
        if n > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    results = backend.generate_batch([BatchMember(p) for p in jobs])
    assert sizes == [3, 1, 1, 1]
    for result, alone in zip(results, solo, strict=True):
        assert isinstance(result, GenerationOutput) and close(pixels(result), alone)
        assert any("ran out of memory" in w for w in result.warnings)
