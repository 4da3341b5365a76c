"""DPM++ 2S a as A1111 runs it (k-diffusion's sample_dpmpp_2s_ancestral), which diffusers lacks.

Each step calls the model twice and adds fresh noise, as DPM2 a does, and on the same noise levels: the ancestral
step's target sigma_down, and between it and the step's sigma their geometric mean, where the second call is made
(k-diffusion's s = t + h/2 in log sigma). The first half-step is an Euler step to that midpoint in both samplers;
they differ in the second: DPM-Solver++(2S) steps from the step's start with the midpoint's denoised estimate,

    x_next = x + (x - denoised_mid) / sigma * (sigma_down - sigma) + noise * sigma_up,

where DPM2 a takes the derivative at the midpoint instead. So this is diffusers' DPM2 a with its second half-step
replaced; the last step (to sigma 0) is a single Euler call in both.

Both take A1111's Eta for ancestral samplers (`eta`): sigma_up is eta times the full ancestral step's (capped at the
next sigma), so sigma_down, and with it the midpoint where the second call is made, move too (diffusers' DPM2 a works
its levels out at eta 1 alone); and its Sigma noise (`s_noise`), which scales the noise each step adds.
"""
from __future__ import annotations

import torch
from diffusers import KDPM2AncestralDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor  # by name: philox.drawing_from_philox replaces it here

from webui.engine.step_options import ancestral_levels


def denoised_of(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the picture from its output at `sigma` (epsilon or v-prediction), as k-diffusion's
    denoisers work it out from the unscaled sample."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    raise ValueError(f"this sampler runs epsilon and v-prediction models, not {prediction_type!r}")


class _AtEta:
    """An ancestral two-call scheduler whose levels follow `eta` (1: diffusers' own), and whose step noise is
    `s_noise` times sigma_up (A1111's Sigma noise; sigma_up sizes nothing else)."""
    eta: float = 1.0
    s_noise: float = 1.0

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if self.eta != 1.0:
            self._levels_at_eta()
        if self.s_noise != 1.0:
            self.sigmas_up = self.sigmas_up * self.s_noise

    def _levels_at_eta(self) -> None:
        """sigma_up, sigma_down and the midpoints again at eta, laid out as diffusers lays them (each level but the
        first twice), and the midpoint calls' timesteps with them."""
        sigmas = torch.cat([self.sigmas[:1], self.sigmas[1:-1:2]])  # the step levels, ending at 0
        following = torch.cat([sigmas[1:], sigmas[:1] * 0])
        down, up = ancestral_levels(sigmas, following, self.eta)
        middle = sigmas.log().lerp(down.log(), 0.5).exp()
        middle[-2:] = 0.0
        self.sigmas_up, self.sigmas_down, self.sigmas_interpol = (
            torch.cat([levels[:1], levels[1:].repeat_interleave(2), levels[-1:]]) for levels in (up, down, middle))
        at_middle = torch.tensor([self._sigma_to_t(level, self.log_sigmas.cpu()) for level in middle[:-2]])
        self.timesteps[1::2] = at_middle.to(self.timesteps)


class DPM2AncestralScheduler(_AtEta, KDPM2AncestralDiscreteScheduler):
    """DPM2 a with A1111's eta."""


class DPMPP2SAncestralScheduler(_AtEta, KDPM2AncestralDiscreteScheduler):
    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:  # the Euler half-step to the midpoint
            return super().step(model_output, timestep, sample, generator, return_dict)
        index = self.step_index - 1
        sigma, sigma_mid = self.sigmas[index], self.sigmas_interpol[index]
        denoised_mid = denoised_of(self.config.prediction_type, model_output, sample, sigma_mid)
        start, self.sample = self.sample, None
        prev_sample = start + (start - denoised_mid) / sigma * (self.sigmas_down[index] - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = prev_sample + noise * self.sigmas_up[index]
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised_mid
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised_mid)
