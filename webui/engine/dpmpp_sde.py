"""A1111's SDE samplers where diffusers' differ: DPM++ SDE, 2M SDE (midpoint and Heun) and 3M SDE follow A1111's
Eta for ancestral samplers (`eta`) and Sigma noise (`s_noise`), and 3M SDE steps as k-diffusion's.

k-diffusion's SDE steps take eta, which diffusers' solvers have fixed at 1: with h the step in log sigma, a step decays
the picture by e^(-eta h) besides the move from sigma to sigma_next, and adds sigma_next * sqrt(1 - e^(-2 eta h)) of
noise (times s_noise); at 0 they add none and are the plain ODE solvers. DPM++ SDE splits each of its two half-steps
into a step down and noise back up as an ancestral sampler does, the noise eta times the full split's.

The multistep steps here are k-diffusion's as it writes them, in its scale (x = sample / alpha), on the solver's
denoised estimates (diffusers keeps them as model_outputs). diffusers' third-order SDE step also differs at eta 1: it
gives the second difference of the estimates (D2) the coefficient (1 - e^-2h - 2h) / (2h)^2 - 0.5, where k-diffusion's
-phi_3 has + 0.5; the sampler table asks for k-diffusion's second-order warm-up and no lower-order last steps.
"""
from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler, DPMSolverSDESchedulerOutput

from webui.engine.dpmpp_2s_ancestral import denoised_of
from webui.engine.step_options import ancestral_levels


class _MultistepSDE(DPMSolverMultistepScheduler):
    """diffusers' multistep DPM-Solver with each SDE step taken as k-diffusion takes it (`_k_step`)."""
    eta: float = 1.0
    s_noise: float = 1.0

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if not self._k_diffusion(sample, noise):
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._step([model_output], sample, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if not self._k_diffusion(sample, noise):
            return super().multistep_dpm_solver_second_order_update(model_output_list, *args, sample=sample,
                                                                    noise=noise, **kwargs)
        return self._step(model_output_list[-2:], sample, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if not self._k_diffusion(sample, noise):
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample,
                                                                   noise=noise, **kwargs)
        return self._step(model_output_list[-3:], sample, noise)

    def _k_diffusion(self, sample, noise) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++" and sample is not None and noise is not None

    def _step(self, denoised: list[torch.Tensor], sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One step on the estimates so far (oldest first, as many as the order diffusers picked)."""
        levels = [self.sigmas[self.step_index + 1 - back] for back in range(len(denoised) + 1)]  # next, this, ...
        alpha_next, _ = self._sigma_to_alpha_sigma_t(levels[0])
        if levels[0] == 0:
            return denoised[-1] * alpha_next  # k-diffusion's last step: the estimate itself
        alpha, _ = self._sigma_to_alpha_sigma_t(levels[1])
        steps = [later.log() - earlier.log() for earlier, later in zip(levels, levels[1:])]  # h, h_1, h_2
        x = self._k_step(sample / alpha, denoised[::-1], levels, steps)
        if self.eta:
            x = x + noise * levels[0] * (-torch.expm1(-2 * self.eta * steps[0])).sqrt() * self.s_noise
        return x * alpha_next


class DPMPP2MSDEScheduler(_MultistepSDE):
    def _k_step(self, x, denoised, levels, steps):
        """k-diffusion's sample_dpmpp_2m_sde step without its noise (midpoint or Heun correction)."""
        h = steps[0]
        eta_h = self.eta * h
        x = levels[0] / levels[1] * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised[0]
        if len(denoised) > 1:
            r = steps[1] / h
            if self.config.solver_type == "heun":
                factor = -torch.expm1(-h - eta_h) / (-h - eta_h) + 1
            else:
                factor = -0.5 * torch.expm1(-h - eta_h)
            x = x + factor / r * (denoised[0] - denoised[1])
        return x


class DPMPP3MSDEScheduler(_MultistepSDE):
    def _k_step(self, x, denoised, levels, steps):
        """k-diffusion's sample_dpmpp_3m_sde step without its noise (its phi_2 warm-up with two estimates)."""
        h = steps[0]
        h_eta = h * (self.eta + 1)
        x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised[0]
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if len(denoised) == 3:
            r0, r1 = steps[1] / h, steps[2] / h
            d1_0, d1_1 = (denoised[0] - denoised[1]) / r0, (denoised[1] - denoised[2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif len(denoised) == 2:
            x = x + phi_2 * (denoised[0] - denoised[1]) / (steps[1] / h)
        return x


def _float32_tree(sample: torch.Tensor, sigmas: torch.Tensor, seed):
    """A Brownian tree over the schedule's noise levels built in float32, as A1111's latents are (one built on fp16
    latents, on a GPU, draws other noise: up to 0.014 apart a step), its draws given in the sample's dtype."""
    smallest, largest = sigmas[sigmas > 0].min(), sigmas.max()
    tree = BrownianTreeNoiseSampler(sample.float(), smallest.item(), largest.item(), seed)
    return lambda sigma, sigma_next: tree(sigma, sigma_next).to(sample.dtype)


class DPMPPSDEScheduler(DPMSolverSDEScheduler):
    """diffusers' DPM++ SDE (k-diffusion's sample_dpmpp_sde at r 1/2) with eta and s_noise."""
    eta: float = 1.0
    s_noise: float = 1.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float | None = None):
        s_noise = self.s_noise if s_noise is None else s_noise
        if self.noise_sampler is None:  # (diffusers' step, at eta 1, would build one in the sample's dtype)
            self.noise_sampler = _float32_tree(sample, self.sigmas, self.noise_sampler_seed)
        if self.eta == 1.0:
            return super().step(model_output, timestep, sample, return_dict, s_noise)
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        index = self.step_index if first else self.step_index - 1
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]  # each level but the ends is there twice
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        middle = (t + (t_next - t) * 0.5).neg().exp()
        denoised = denoised_of(self.config.prediction_type, model_output, sample, sigma if first else middle)
        if sigma_next == 0:
            prev_sample = denoised  # the Euler step to 0
        else:
            start = sample if first else self.sample
            to = middle if first else sigma_next
            down, up = ancestral_levels(sigma, to, self.eta)
            prev_sample = down / sigma * start - torch.expm1(t + down.log()) * denoised
            prev_sample = prev_sample + self.noise_sampler(sigma, to) * s_noise * up
            self.sample, self.mid_point_sigma = (sample, middle) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return DPMSolverSDESchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
