"""DPM++ 3M SDE as A1111 runs it (k-diffusion's sample_dpmpp_3m_sde), on diffusers' multistep DPM-Solver.

diffusers' third-order SDE step gives the second difference of the estimates (D2) the coefficient
(1 - e^-2h - 2h) / (2h)^2 - 0.5, where k-diffusion's -phi_3 is (1 - e^-2h - 2h) / (2h)^2 + 0.5 (the deterministic
third-order step has + 0.5 in diffusers too). This scheduler takes that step as k-diffusion writes it; the sampler
table asks for k-diffusion's second-order warm-up (phi_2: diffusers' "heun") and no lower-order last steps.
"""
from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler


class DPMPP3MSDEScheduler(DPMSolverMultistepScheduler):
    def multistep_dpm_solver_third_order_update(self, model_output_list: list[torch.Tensor], *args,
                                                sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                                                **kwargs) -> torch.Tensor:
        if self.config.algorithm_type != "sde-dpmsolver++" or sample is None or noise is None:
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample,
                                                                   noise=noise, **kwargs)
        # k-diffusion's sigmas (diffusers keeps them so) and its latent scale: sample / alpha
        sigma_next, sigma, sigma_1, sigma_2 = (self.sigmas[self.step_index + 1 - back] for back in range(4))
        alpha_next, _ = self._sigma_to_alpha_sigma_t(sigma_next)
        alpha, _ = self._sigma_to_alpha_sigma_t(sigma)
        denoised, denoised_1, denoised_2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_1, h_2 = sigma.log() - sigma_next.log(), sigma_1.log() - sigma.log(), sigma_2.log() - sigma_1.log()
        x = torch.exp(-2 * h) * (sample / alpha) - torch.expm1(-2 * h) * denoised
        r0, r1 = h_1 / h, h_2 / h
        d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = torch.expm1(-2 * h) / (2 * h) + 1
        phi_3 = phi_2 / (2 * h) - 0.5
        x = x + phi_2 * d1 - phi_3 * d2 + noise * sigma_next * (-torch.expm1(-2 * h)).sqrt()
        return x * alpha_next
