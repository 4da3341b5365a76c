"""Sampler and schedule-type names users know, mapped to diffusers schedulers.

Schedulers are always built with `from_config` from the loaded model's own scheduler config, so a
model's prediction type and beta schedule carry over to every sampler. A zero-terminal-SNR setting
(rescale_betas_zero_snr) carries over only where diffusers' scheduler has it: Euler a, Euler, DPM++ 2M,
DPM++ 2M SDE, DDIM, UniPC and LCM; the others run such a model on its usual schedule.
This module only names classes; diffusers is imported when a scheduler is actually built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # The schedule types its diffusers scheduler can follow (not every one takes custom sigmas
    # or a timestep spacing); asking for another is an error rather than silently ignored.
    schedules: tuple[str, ...] = ("Automatic", "Karras", "Exponential", "SGM Uniform")
    max_steps: int | None = None  # a limit of its scheduler's, checked with the request


NO_CUSTOM_SIGMAS = ("Automatic", "SGM Uniform")

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
            schedules=NO_CUSTOM_SIGMAS),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms", "K-LMS")),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, aliases=("k_dpmpp_2m_sde",)),
    # diffusers has no ancestral single-step DPM++; its deterministic single-step solver is the
    # closest match, as diffusers' own scheduler table notes.
    Sampler("DPM++ 2S a", "DPMSolverSinglestepScheduler", {"solver_order": 2}, aliases=("k_dpmpp_2s_a",),
            schedules=("Automatic", "Karras", "Exponential")),
    # DDIMScheduler clips its x0 estimate to [-1, 1] unless the model's config says otherwise; that is
    # meant for pixel-space models and ruins latents (A1111's DDIM never clips).
    Sampler("DDIM", "DDIMScheduler", {"clip_sample": False}, aliases=("ddim",), schedules=NO_CUSTOM_SIGMAS),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms", "PNDM"), schedules=NO_CUSTOM_SIGMAS),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
    # LCM picks its steps from a 50-step schedule (diffusers' original_inference_steps), whatever the
    # timestep spacing, so SGM Uniform would change nothing.
    Sampler("LCM", "LCMScheduler", aliases=("lcm",), schedules=("Automatic",), max_steps=50),
)

# Schedule type label -> the scheduler config options that give it.
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

_SAMPLER_BY_KEY = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
_SCHEDULE_BY_KEY = {label.lower(): label for label in SCHEDULE_TYPES}
_SCHEDULE_BY_KEY.update({label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES})


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def get_sampler(name: str) -> Sampler:
    sampler = _SAMPLER_BY_KEY.get(name.strip().lower())
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    return sampler


def resolve_sampler(sampler_name: str, schedule: str | None = "Automatic") -> tuple[str, str]:
    """Check a sampler and schedule type and return their canonical names.

    Accepts old combined names such as "DPM++ 2M Karras" (schedule taken from the suffix) and
    A1111's aliases ("k_euler_a", "K-LMS", "PNDM"). Raises ValueError listing the valid names.
    """
    name = (sampler_name or "").strip()
    schedule_label = _canonical_schedule(schedule or "Automatic")
    if name.lower() not in _SAMPLER_BY_KEY:
        for label in SCHEDULE_TYPES:
            suffix = " " + label.lower()
            if label != "Automatic" and name.lower().endswith(suffix):
                name, schedule_label = name[: -len(suffix)], label
                break
    sampler = get_sampler(name)
    if schedule_label not in sampler.schedules:
        raise ValueError(
            f"sampler {sampler.name!r} does not support the {schedule_label} schedule; "
            f"use {' or '.join(sampler.schedules)} with it"
        )
    return sampler.name, schedule_label


def _canonical_schedule(schedule: str) -> str:
    label = _SCHEDULE_BY_KEY.get(schedule.strip().lower())
    if label is None:
        raise ValueError(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULE_TYPES)}")
    return label


def make_scheduler(base_config: dict[str, Any], sampler_name: str, schedule: str = "Automatic"):
    """Build a fresh diffusers scheduler for one run from the model's scheduler config."""
    import diffusers

    sampler_name, schedule = resolve_sampler(sampler_name, schedule)
    sampler = get_sampler(sampler_name)
    scheduler_class = getattr(diffusers, sampler.scheduler_class)
    options = {**sampler.options, **SCHEDULE_TYPES[schedule]}
    return scheduler_class.from_config(base_config, **options)
