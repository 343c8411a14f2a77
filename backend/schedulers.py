"""Scheduler names the API accepts, mapped onto diffusers scheduler classes."""

from __future__ import annotations

from typing import Any

# name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # SD ships PNDM with the PRK warm-up skipped; with it, few-step runs break.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


# The options that make a sampler the one its name says, beyond its class. A model's own
# scheduler config may set them for its default sampler ("DPM++ 3M SDE Karras", beta sigmas):
# a name asked for gets its class's defaults for them instead, then its own extra config.
SAMPLER_OPTIONS = ("algorithm_type", "solver_order", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A new scheduler of kind ``name`` built from the model's own scheduler config.

    Building from the model's config keeps its beta schedule and prediction type
    (v-prediction for SD 2.x 768), which a scheduler's bare defaults would lose; the
    ``SAMPLER_OPTIONS`` come from the name, not from the model.
    """
    import inspect

    import diffusers

    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    own = {key: accepted[key].default for key in SAMPLER_OPTIONS if key in accepted}
    return cls.from_config(dict(base_config), **{**own, **extra})
