"""DDIM CFG++, A1111's sampler after Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models" (2024).

A DDIM step takes the picture it predicts (x0) from the guided noise prediction, as DDIM does, but points back towards
the noise along the negative prompt's own prediction, not the guided one; and the CFG scale is read as a fraction of
12.5 (A1111 maps CFG scale 0-12.5 to CFG++'s 0-1). It follows Eta DDIM as DDIM does.

The pipeline guides as usual (uncond + cfg * (cond - uncond)); a hook on the UNet keeps each call's negative rows
(`recording_uncond`), and the step works the CFG++ guidance out of the two: uncond + (guided - uncond) / 12.5.
At CFG scale 1 no call runs the negative prompt here (for any sampler), so DDIM CFG++ is DDIM on the prompt alone
there, where A1111 still weighs the negative prompt's prediction in (by 1 - 1/12.5). A call that skips its negative
rows (NGMS, Skip Early CFG) takes the positive prediction for both, as A1111's does (with AND, the parts' combined
prediction, where A1111 takes the first part's).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers import DDIMScheduler

from webui.engine.unet_hooks import removed_after

CFGPP_SCALE = 12.5  # A1111's: CFG scale 12.5 is CFG++'s full guidance


class DDIMCFGPPScheduler(DDIMScheduler):
    uncond: torch.Tensor | None = None  # the call's negative rows, set by recording_uncond; None: the call had none

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True):
        uncond, self.uncond = self.uncond, None
        if uncond is None:  # no negative rows (CFG scale 1, an LCM model): DDIM's step on the prediction
            uncond = model_output
        guided = uncond + (model_output - uncond) / CFGPP_SCALE
        stepped = super().step(guided, timestep, sample, eta=eta, generator=generator, variance_noise=variance_noise,
                               return_dict=True)
        # DDIM pointed back along the guided noise; CFG++ along the negative prompt's: the difference, in noise terms
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        std = eta * self._get_variance(timestep, prev_timestep) ** 0.5
        direction = (1 - alpha_prev - std ** 2) ** 0.5
        prev_sample = stepped.prev_sample + direction * self._noise_per_output(timestep) * (uncond - guided)
        if not return_dict:
            return prev_sample, stepped.pred_original_sample
        return type(stepped)(prev_sample=prev_sample, pred_original_sample=stepped.pred_original_sample)

    def _noise_per_output(self, timestep: int) -> float:
        """How much the noise a prediction stands for moves with the prediction, the sample held (DDIM's formulas)."""
        alpha = self.alphas_cumprod[timestep]
        if self.config.prediction_type == "v_prediction":
            return alpha ** 0.5
        if self.config.prediction_type == "sample":
            return -(alpha / (1 - alpha)) ** 0.5
        return 1.0


@contextlib.contextmanager
def recording_uncond(unet, scheduler: DDIMCFGPPScheduler, images: int) -> Iterator[None]:
    """While inside, each call of `unet` with negative rows (the first `images` of a guided batch) leaves them with the
    scheduler for its step. Enter it after the other UNet hooks, which lay out and fill in the batch it reads."""
    def record(_module, _args, output):
        prediction = output[0] if isinstance(output, tuple) else next(iter(output.values()))
        scheduler.uncond = prediction[:images] if prediction.shape[0] == 2 * images else None
        return None

    with removed_after([unet.register_forward_hook(record)]):
        yield
