"""Each scheduler name the API accepts builds the sampler it names, whatever the model's own
scheduler was, and keeps what belongs to the model (its betas, its prediction type).

The expected table is written out here on purpose, not read from backend/schedulers.py: a
wrong entry there must fail this test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from django.conf import settings

from backend.config import EngineConfig
from backend.local import LocalBackend
from backend.manager import ModelManager
from backend.params import GenerationParams
from backend.schedulers import SCHEDULER_NAMES, make_scheduler

# name -> (class, the config that makes it that sampler). A1111's names: "DPM++ 2M Karras" is
# DPM-Solver++ of order 2, multistep, on Karras sigmas; "Euler" is Euler on the model's own sigmas.
PLAIN_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
EXPECTED: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", PLAIN_SIGMAS),
    "euler": ("EulerDiscreteScheduler", PLAIN_SIGMAS),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", PLAIN_SIGMAS),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **PLAIN_SIGMAS}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, **PLAIN_SIGMAS, "use_karras_sigmas": True},
    ),
    "dpmpp_2s": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, **PLAIN_SIGMAS},
    ),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, **PLAIN_SIGMAS}),
}

# What a Stable Diffusion checkpoint ships: its betas belong to the model and must survive.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def sd15_config() -> dict:
    path = Path(settings.BASE_DIR) / "backend" / "model_configs" / "sd15" / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


def fancy_config(**extra) -> dict:
    """A model whose own default is "DPM++ 3M SDE Karras" on v-prediction (fine-tunes ship such)."""
    return dict(
        DPMSolverMultistepScheduler(
            **SD_BETAS,
            algorithm_type="sde-dpmsolver++",
            solver_order=3,
            use_karras_sigmas=True,
            prediction_type="v_prediction",
            **extra,
        ).config
    )


def assert_is(name: str, scheduler, base: dict) -> None:  # noqa: ANN001
    class_name, config = EXPECTED[name]
    assert type(scheduler).__name__ == class_name, (name, type(scheduler).__name__)
    got = {k: scheduler.config[k] for k in config}
    assert got == config, (name, got)
    for key, value in SD_BETAS.items():
        assert scheduler.config[key] == value, (name, key)
    assert scheduler.config["prediction_type"] == base.get("prediction_type", "epsilon"), name


def test_the_table_covers_every_name_the_api_accepts():
    assert set(SCHEDULER_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_builds_its_sampler_from_an_sd_model_config(name):
    base = sd15_config()
    assert_is(name, make_scheduler(name, base), base)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_model_whose_own_scheduler_is_another_sampler_still_gets_the_named_one(name):
    # Karras sigmas, SDE and order 3 are the model's default sampler, not part of the name
    # asked for: "dpmpp_2m" must not come back as 3M SDE Karras, nor "euler" on Karras sigmas.
    # v-prediction is the model's own and is kept.
    base = fancy_config()
    scheduler = make_scheduler(name, base)
    assert_is(name, scheduler, base)
    assert scheduler.config["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler", "dpmpp_2m", "unipc"])
def test_a_model_on_beta_sigmas_can_still_ask_for_any_sigmas(name):
    # diffusers refuses two sigma schedules at once: the name's own choice must replace the model's.
    base = dict(EulerDiscreteScheduler(**SD_BETAS, use_beta_sigmas=True).config)
    assert_is(name, make_scheduler(name, base), base)


def test_the_scheduler_of_a_model_is_not_changed_by_building_another():
    base = fancy_config()
    before = json.dumps(base, sort_keys=True, default=str)
    for name in EXPECTED:
        make_scheduler(name, base)
    assert json.dumps(base, sort_keys=True, default=str) == before


# -- through a loaded v-prediction pipeline ----------------------------------------------------


@pytest.fixture(scope="module")
def v_pred_backend(tiny_model_dirs, tmp_path_factory):  # noqa: ANN001, ANN201
    """tiny-sd loaded as an SD 2.x v-prediction model, the way the catalogue marks one."""
    folder = tmp_path_factory.mktemp("vpred")
    catalog = folder / "catalog.json"
    entry = {
        "id": "tiny-v",
        "family": "sd2",
        "default_size": 64,
        "path": str(tiny_model_dirs["tiny-sd"]),
        "prediction_type": "v_prediction",
    }
    catalog.write_text(json.dumps([entry]))
    manager = ModelManager(
        EngineConfig(
            base_dir=Path(settings.BASE_DIR),
            tiny_models_dir=settings.ENGINE.tiny_models_dir,
            max_loaded_models=1,
            model_catalog_file=str(catalog),
        )
    )
    yield LocalBackend(manager)
    manager.unload_all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_v_prediction_model_runs_every_sampler_as_v_prediction(v_pred_backend, name):
    params = GenerationParams(
        kind="txt2img", model_id="tiny-v", prompt="a cat", width=64, height=64, steps=2, guidance_scale=7.0, seed=1
    )
    seen: list = []
    model = v_pred_backend.manager.get("tiny-v")
    assert type(model.base_scheduler) is DDIMScheduler
    assert model.base_scheduler.config["prediction_type"] == "v_prediction"

    def during(step: int, total: int) -> None:
        seen.append(model.txt2img.scheduler)

    out = v_pred_backend.generate(dataclasses.replace(params, scheduler=name), on_progress=during)
    assert out.images[0].image.size == (64, 64)
    # The sampler that ran the steps is the one named, on the model's v-prediction.
    assert seen and all(s is seen[0] for s in seen)
    assert_is(name, seen[0], model.base_scheduler_config)
    assert seen[0].config["prediction_type"] == "v_prediction"
