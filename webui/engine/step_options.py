"""A1111's sampler parameters that change how a sampler steps: eta and the sigma churn family.

- Eta for DDIM (`eta_ddim`, 0 by default): how much fresh noise each DDIM (and DDIM CFG++) step adds (0: deterministic).
- Eta for ancestral samplers (`eta_ancestral`, 1 by default): how much of an ancestral step is noise; 0 makes
  Euler a a plain Euler, DPM2 a a DPM2 and DPM++ 2S a a DPM++ 2S. The SDE samplers take it too (0: their ODE solvers).
- Sigma churn, tmin, tmax and noise (`s_churn`, `s_tmin`, `s_tmax`, `s_noise`): Karras et al.'s stochastic
  sampling, which raises the noise level a little before each step whose sigma lies in [tmin, tmax] (tmax 0: no
  upper limit) and adds noise to match; sigma noise scales that noise, and the noise DPM2 a, DPM++ 2S a and the SDE
  samplers add as they step.

The samplers follow what A1111's of the same names follow (FOLLOWS), but for Heun's and DPM2's churn, which their
diffusers schedulers cannot do. Where a sampler
does not follow one, it is left out of the infotext, as A1111 leaves out those its samplers do not take.

Euler's churn is diffusers' (EulerDiscreteScheduler): it adds the churn noise after the model call of the step, where
A1111's k-diffusion adds it before, so a churned picture is like A1111's, not the same.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from webui.engine.philox import philox_noise, uses_philox
from webui.engine.samplers import RESTARTS_FROM_STEPS

# A1111's defaults: a parameter at its default changes nothing and is not written into the infotext.
DEFAULTS = {"eta_ddim": 0.0, "eta_ancestral": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
INFOTEXT_KEYS = {"eta_ddim": "Eta DDIM", "eta_ancestral": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin",
                 "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
# A1111's slider ranges
LIMITS = {"eta_ddim": 1.0, "eta_ancestral": 1.0, "s_churn": 100.0, "s_tmin": 10.0, "s_tmax": 999.0, "s_noise": 1.1}
# As A1111's (its sampler_extra_params and the samplers whose k-diffusion function takes eta): Euler a takes no Sigma
# noise there, Restart none of them
_ETA_AND_NOISE = ("eta_ancestral", "s_noise")
FOLLOWS = {"DDIM": ("eta_ddim",), "DDIM CFG++": ("eta_ddim",), "Euler a": ("eta_ancestral",), "DPM2 a": _ETA_AND_NOISE,
           "DPM++ 2S a": _ETA_AND_NOISE, "DPM++ SDE": _ETA_AND_NOISE, "DPM++ 2M SDE": _ETA_AND_NOISE,
           "DPM++ 2M SDE Heun": _ETA_AND_NOISE, "DPM++ 3M SDE": _ETA_AND_NOISE,
           "Euler": ("s_churn", "s_tmin", "s_tmax", "s_noise")}
# What A1111's samplers of the same names follow, where ours cannot (their diffusers schedulers have no such parameter)
_A1111_ALSO = {"Heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"), "DPM2": ("s_churn", "s_tmin", "s_tmax", "s_noise")}
# The samplers that draw fresh noise from the images' generators as they step, when they do: their pictures are the
# ones A1111's Eta noise seed delta changes.
# (each of the options and the pass's step count)
_DRAWS_NOISE = {"Euler a": lambda options, steps: options.eta_ancestral > 0,
                "DDIM": lambda options, steps: options.eta_ddim > 0,
                "DDIM CFG++": lambda options, steps: options.eta_ddim > 0,
                "Euler": lambda options, steps: options.s_churn > 0,
                "DPM2 a": lambda options, steps: options.eta_ancestral > 0,
                "DPM++ 2S a": lambda options, steps: options.eta_ancestral > 0,
                # A1111's table has no uses_ensd for it, but its restarts' noise follows ENSD: when it restarts
                "Restart": lambda options, steps: steps >= RESTARTS_FROM_STEPS,
                # (the SDE samplers' noise comes from Brownian trees of the seeds: webui/engine/brownian.py)
                "LCM": lambda options, steps: True}


@dataclass(frozen=True)
class StepOptions:
    eta_ddim: float = 0.0
    eta_ancestral: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0: no upper limit
    s_noise: float = 1.0

    @classmethod
    def of(cls, request) -> "StepOptions":
        """The options a request (any object with these attributes) asks for."""
        return cls(**{field.name: getattr(request, field.name) for field in fields(cls)})

    def followed(self, sampler_name: str) -> dict[str, float]:
        """Those the sampler follows that are not at their defaults, by name (what the infotext records)."""
        return {name: getattr(self, name) for name in FOLLOWS.get(sampler_name, ())
                if getattr(self, name) != DEFAULTS[name]}


def unfollowed(sampler_name: str, options: "StepOptions") -> list[str]:
    """The options set (off their defaults) that A1111's sampler of this name would follow and ours cannot."""
    return [name for name in _A1111_ALSO.get(sampler_name, ()) if getattr(options, name) != DEFAULTS[name]]


def draws_noise(sampler_name: str, options: "StepOptions", steps: int) -> bool:
    """Whether the sampler, with these options, draws noise after the start noise in a pass of `steps` steps (so ENSD
    changes its picture)."""
    return sampler_name in _DRAWS_NOISE and _DRAWS_NOISE[sampler_name](options, steps)


def ancestral_levels(sigma: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ancestral split of a step from sigma to sigma_to: the level it steps down to, and the noise that
    brings it back up (eta times the full split's, at most sigma_to)."""
    if not eta:
        return sigma_to, sigma_to * 0
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def use_step_options(scheduler, sampler_name: str, options: StepOptions) -> None:
    """Make a freshly built scheduler step with the options its sampler follows (nothing when all are defaults). Euler
    a on a custom schedule runs on Euler's scheduler (samplers.Sampler.custom_sigmas_class): it steps as Euler a."""
    from diffusers import EulerDiscreteScheduler

    changed = options.followed(sampler_name)
    if sampler_name == "Euler a" and isinstance(scheduler, EulerDiscreteScheduler):
        scheduler.step = _ancestral_step(scheduler, options.eta_ancestral)
        return
    if not changed:
        return
    if sampler_name == "Euler a":
        scheduler.step = _ancestral_step(scheduler, options.eta_ancestral)
    elif FOLLOWS[sampler_name] == _ETA_AND_NOISE:
        # their steps follow both (webui/engine/dpmpp_2s_ancestral.py, dpmpp_sde.py)
        scheduler.eta, scheduler.s_noise = options.eta_ancestral, options.s_noise
    elif FOLLOWS[sampler_name] == ("eta_ddim",):  # DDIM, DDIM CFG++
        _step_with(scheduler, eta=options.eta_ddim)  # the pipeline passes eta=0 itself: this one wins
    elif sampler_name == "Euler":
        _step_with(scheduler, s_churn=options.s_churn, s_tmin=options.s_tmin,
                   s_tmax=options.s_tmax or math.inf, s_noise=options.s_noise)


def _step_with(scheduler, **options) -> None:
    step = scheduler.step

    @functools.wraps(step)  # the pipeline reads the step's signature to know it takes a generator
    def step_with_options(*args, **kwargs):
        return step(*args, **(kwargs | options))

    scheduler.step = step_with_options


def _ancestral_step(scheduler, eta: float):
    """Euler a's step with k-diffusion's eta: the step goes down to sigma_down deterministically, then sigma_up of fresh
    noise brings it back to the next sigma; eta scales sigma_up (eta 1 is diffusers' own step). diffusers' step is run for the prediction of the clean picture (whatever the model predicts) and to
    move the scheduler on; the generators are set back after it, so the noise drawn here is the draw that step made."""
    step = scheduler.step

    def step_with_eta(model_output, timestep, sample, generator=None, return_dict=True, **kwargs):
        saved = _states(generator)
        denoised = step(model_output, timestep, sample, generator=generator, return_dict=True).pred_original_sample
        _restore(generator, saved)
        index = scheduler.step_index - 1  # the step just taken
        sigma, sigma_to = scheduler.sigmas[index].double(), scheduler.sigmas[index + 1].double()
        sigma_down, sigma_up = (float(level) for level in ancestral_levels(sigma, sigma_to, eta))
        sigma = float(sigma)
        sample = sample.to(torch.float32)
        derivative = (sample - denoised) / sigma
        noise = _draw(model_output, generator)
        following = (sample + derivative * (sigma_down - sigma) + noise * sigma_up).to(model_output.dtype)
        if not return_dict:
            return following, denoised
        return _output(following, denoised)

    return step_with_eta


def _output(prev_sample: torch.Tensor, pred_original_sample: torch.Tensor):
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

    return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _draw(like: torch.Tensor, generator) -> torch.Tensor:
    """Noise as the scheduler's own step draws it, from either random number source's generators."""
    from diffusers.utils.torch_utils import randn_tensor

    draw = philox_noise if uses_philox(generator) else randn_tensor
    return draw(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _generators(generator) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


def _states(generator) -> list[torch.Tensor]:
    return [one.get_state() for one in _generators(generator)]


def _restore(generator, states: list[torch.Tensor]) -> None:
    for one, state in zip(_generators(generator), states):
        one.set_state(state)
