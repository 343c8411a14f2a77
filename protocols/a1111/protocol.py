"""AUTOMATIC1111's wire shapes: its sampler and scheduler tables, and the fixed listings.

Only the samplers this server can run are listed. Each maps onto one native scheduler; where
A1111 has no exact twin here the nearest one runs, and ``note`` says so (docs/compat.md
carries the same table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str
    native: str
    aliases: tuple[str, ...] = ()
    # The native scheduler when the request's schedule type is Karras.
    karras: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    note: str = ""


# Aliases include stable-diffusion.cpp's names (euler_a, dpm++2m, ...), which SillyTavern's
# sdcpp source sends over this same API, and "DPM++ 2S", which this server's own infotexts
# write for its DPM++ 2S scheduler, so a PNG's parameters can be sent back as they are.
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m", "dpm++2m", "dpm++2mv2"), karras="dpmpp_2m_karras"),
    # The name before A1111 1.9 split samplers from schedule types.
    Sampler("DPM++ 2M Karras", "dpmpp_2m_karras", ("k_dpmpp_2m_ka",), options={"scheduler": "karras"}, note="old name"),
    Sampler(
        "DPM++ 2S a",
        "dpmpp_2s",
        ("k_dpmpp_2s_a", "DPM++ 2S", "dpm++2s_a"),
        note="runs DPM++ 2S (single-step), not ancestral",
    ),
    Sampler("DPM++ SDE", "dpmpp_2s", ("k_dpmpp_sde",), note="runs DPM++ 2S (single-step), no SDE noise"),
    Sampler("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral", "euler_a")),
    Sampler("Euler", "euler", ("k_euler",)),
    Sampler("LMS", "lms", ("k_lms",)),
    Sampler("Heun", "heun", ("k_heun",)),
    Sampler("DPM2", "heun", ("k_dpm_2", "dpm2"), note="runs Heun, the nearest second-order sampler"),
    Sampler("DPM2 a", "euler_a", ("k_dpm_2_a",), note="runs Euler a, the nearest ancestral sampler"),
    Sampler("DDIM", "ddim", ("ddim",)),
    Sampler("DDPM", "ddpm", ("ddpm",)),
    Sampler("PLMS", "pndm", ("plms",)),
    Sampler("UniPC", "unipc", ("unipc",)),
)

# A1111's default when a request names no sampler (its API's ``sampler_index`` default).
DEFAULT_SAMPLER = "Euler"


def _key(name: str) -> str:
    return " ".join(name.lower().split())


_SAMPLER_BY_NAME: dict[str, Sampler] = {}
for _s in SAMPLERS:
    for _n in (_s.name, *_s.aliases):
        _SAMPLER_BY_NAME.setdefault(_key(_n), _s)


def sampler_find(name: str) -> Sampler | None:
    """A sampler by its name or an A1111 alias, ignoring case and repeated spaces."""
    return _SAMPLER_BY_NAME.get(_key(name))


@dataclass(frozen=True)
class Schedule:
    name: str
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


# A1111's schedule types. Only Karras changes what runs (with DPM++ 2M); the others are
# accepted so A1111's own defaults ("automatic", SillyTavern's "normal") work.
SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic", ("discrete",)),  # "discrete": stable-diffusion.cpp's default
    Schedule("uniform", "Uniform", need_inner_model=True),
    Schedule("karras", "Karras", default_rho=7.0),
    Schedule("exponential", "Exponential"),
    Schedule("polyexponential", "Polyexponential", default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal"),
    Schedule("align_your_steps", "Align Your Steps", ("ays",)),
    Schedule("simple", "Simple"),
    Schedule("normal", "Normal"),
    Schedule("ddim", "DDIM"),
    Schedule("beta", "Beta"),
)

_SCHEDULE_BY_NAME: dict[str, Schedule] = {}
for _c in SCHEDULES:
    for _n in (_c.name, _c.label, *(_c.aliases or ())):
        _SCHEDULE_BY_NAME.setdefault(_key(_n), _c)


def schedule_find(name: str) -> Schedule | None:
    return _SCHEDULE_BY_NAME.get(_key(name))


def samplers_listing() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def schedulers_listing() -> list[dict[str, Any]]:
    return [
        {
            "name": c.name,
            "label": c.label,
            "aliases": list(c.aliases) if c.aliases else None,
            "default_rho": c.default_rho,
            "need_inner_model": c.need_inner_model,
        }
        for c in SCHEDULES
    ]


# Nothing upscales here; A1111's lists still start with "None" and the latent modes, which
# clients splice into their menus.
UPSCALERS: list[dict[str, Any]] = [
    {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0},
]
LATENT_UPSCALE_MODES: list[dict[str, str]] = [
    {"name": name}
    for name in (
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    )
]


def timestamp(moment: Any) -> str:
    """A1111's job timestamp: ``YYYYmmddHHMMSS``."""
    return moment.strftime("%Y%m%d%H%M%S") if moment is not None else "0"
