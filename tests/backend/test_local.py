"""The local backend on real tiny pipelines: seeds, batches, schedulers, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backend.errors import GenerationCancelled, InvalidParams
from backend.local import LocalBackend
from backend.params import GenerationParams, image_seeds


def params(**overrides) -> GenerationParams:
    base = {
        "kind": "txt2img",
        "model_id": "tiny-sd",
        "prompt": "a cat",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 3,
    }
    return GenerationParams(**(base | overrides))


@pytest.fixture(scope="module")
def backend(tiny_model_dirs) -> LocalBackend:  # noqa: ANN001
    return LocalBackend()


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_seed_same_pixels_other_seed_other_pixels(backend):
    a = backend.generate(params()).images[0]
    b = backend.generate(params()).images[0]
    c = backend.generate(params(seed=4)).images[0]
    assert a.seed == 3 and a.image.size == (64, 64)
    assert np.array_equal(arr(a.image), arr(b.image))
    assert not np.array_equal(arr(a.image), arr(c.image))


def test_batch_images_match_single_runs_within_2(backend):
    out = backend.generate(params(num_images=2, seed=10))
    assert [i.seed for i in out.images] == [10, 11]
    for item in out.images:
        alone = backend.generate(params(seed=item.seed)).images[0]
        assert np.abs(arr(alone.image) - arr(item.image)).max() <= 2


def test_image_seeds_wrap():
    assert image_seeds(2**32 - 2, 3) == [2**32 - 2, 2**32 - 1, 0]


@pytest.mark.parametrize(
    "name",
    ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "pndm", "lms", "heun", "ddpm", "dpmpp_2s"],
)
def test_every_scheduler_runs_and_the_default_is_restored(backend, name):
    out = backend.generate(params(scheduler=name, steps=3))
    assert out.images[0].image.size == (64, 64)
    model = backend.manager.get("tiny-sd")
    assert type(model.txt2img.scheduler).__name__ != "" and model.txt2img.scheduler is not model.base_scheduler
    backend.generate(params(steps=2))
    assert model.txt2img.scheduler is model.base_scheduler


def test_progress_reports_every_step(backend):
    seen: list[tuple[int, int]] = []
    backend.generate(params(steps=5), on_progress=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_img2img_progress_counts_only_the_steps_that_run(backend):
    seen: list[tuple[int, int]] = []
    init = Image.new("RGB", (64, 64), (90, 90, 90))
    backend.generate(
        params(kind="img2img", steps=10, strength=0.5), init_image=init, on_progress=lambda s, t: seen.append((s, t))
    )
    assert seen[-1] == (5, 5)


def test_cancel_stops_at_the_next_step_before_the_vae_decode(backend):
    model = backend.manager.get("tiny-sd")
    decodes = []
    original = model.txt2img.vae.decode

    def counting_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        decodes.append(1)
        return original(*args, **kwargs)

    steps: list[int] = []
    model.txt2img.vae.decode = counting_decode
    try:
        with pytest.raises(GenerationCancelled):
            backend.generate(
                params(steps=20), on_progress=lambda s, t: steps.append(s), should_cancel=lambda: len(steps) >= 3
            )
    finally:
        del model.txt2img.vae.decode
    assert steps == [1, 2, 3]
    assert decodes == []


def test_img2img_without_image_is_invalid(backend):
    with pytest.raises(InvalidParams):
        backend.generate(params(kind="img2img", strength=0.5))


def test_a_prompt_past_the_window_is_encoded_whole_and_counted(backend, monkeypatch):
    """Nothing is truncated any more: the tail of a long prompt changes the image, the token
    count is recorded, and MAX_PROMPT_TOKENS is the only cap."""
    import dataclasses

    # The tiny tokenizer reads characters: 75 fit the window; 120 take two chunks.
    head = "a" * 100
    short = backend.generate(params(prompt="a" * 75))
    assert short.warnings == [] and short.provenance["prompt_tokens"] == 75
    one = backend.generate(params(prompt=head + "b" * 20))
    two = backend.generate(params(prompt=head + "c" * 20))
    assert one.provenance["prompt_tokens"] == 120 and one.warnings == []
    assert not np.array_equal(arr(one.images[0].image), arr(two.images[0].image))
    manager = backend.manager
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, max_prompt_tokens=100))
    with pytest.raises(InvalidParams, match=r"prompt must be at most 100 tokens \(MAX_PROMPT_TOKENS\), got 120"):
        backend.generate(params(prompt=head + "b" * 20))
    assert backend.generate(params(prompt="a" * 100)).provenance["prompt_tokens"] == 100


def test_the_record_names_the_libraries_and_the_weights(backend):
    out = backend.generate(params())
    assert {"torch", "diffusers", "transformers", "compel", "peft"} <= set(out.provenance["versions"])
    assert out.provenance["model_source"] == "builtin" and out.provenance["model_revision"].startswith("builtin-v")
    assert out.provenance["loras"] == []
