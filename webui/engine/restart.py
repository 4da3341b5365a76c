"""Restart, A1111's sampler after Xu et al., "Restart Sampling for Improving Generative Processes" (2023).

It is Heun's sampler (k-diffusion's: two model calls a step, one for the last step to 0) on a schedule that, from
20 steps on, goes back up once or twice: after the step that lands nearest sigma 0.1, fresh noise lifts the picture
to the level nearest sigma 2 and a short Karras schedule brings it down again. A1111 keeps the step count: the main
schedule loses the steps the restarts take, and is laid out again as Karras between the given schedule's largest and
smallest levels (the schedule type only sets those ends then). Below 20 steps it is plain Heun. A1111 hands it
neither eta nor Sigma noise.

img2img and the hires fix run a schedule's tail: A1111 hands Restart that tail, so the restarts are planned over the
steps the pass runs (`pass_steps`), not over the whole schedule.

The scheduler is diffusers' Heun with the model calls laid out one by one (`self.sigmas[i]`: the level of call i);
the levels before the pass's tail keep Heun's two calls a step, so diffusers' img2img finds the tail where it looks.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor  # by name: philox.drawing_from_philox replaces it here

from webui.engine.dpmpp_2s_ancestral import denoised_of
from webui.engine.samplers import RESTARTS_FROM_STEPS, karras_sigmas

RESTART_AT = 0.1  # the level a restart goes back up from ...
RESTART_TO = 2.0  # ... and the level it goes up to


def karras_levels(steps: int, smallest: float, largest: float) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras between these ends, in float32 (so A1111's to the bit), with its final 0."""
    levels = torch.from_numpy(karras_sigmas(steps, np.array([smallest, largest]))).float()
    return torch.cat([levels, levels.new_zeros(1)])


def restart_steps(levels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (from, to) levels of each step Restart takes over a schedule's float32 levels (its final 0 included):
    as many steps as the schedule has."""
    steps = len(levels) - 1
    if steps < RESTARTS_FROM_STEPS:
        return list(zip(levels[:-1], levels[1:]))
    length, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    levels = karras_levels(steps - length * times, levels[-2].item(), levels[0].item())
    bottom = int(torch.argmin((levels - RESTART_AT).abs()))
    top = int(torch.argmin((levels - RESTART_TO).abs()))
    plan = list(zip(levels[:-1], levels[1:]))
    if top < bottom:
        # length + 1 levels from the top down to the bottom (Karras's final 0 dropped): `length` steps a restart
        down = karras_levels(length + 1, levels[bottom].item(), levels[top].item())[:-1]
        plan[bottom:bottom] = list(zip(down[:-1], down[1:])) * times
    return plan


def restart_noise(plan: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor | None]:
    """The noise level added before each step: where a step starts above the one before ended, what brings the
    picture up from there (A1111 compares the float32 levels, so a level a hair above the last also draws)."""
    noise: list[torch.Tensor | None] = [None]
    for (_, end), (start, _) in zip(plan[:-1], plan[1:]):
        noise.append((start ** 2 - end ** 2) ** 0.5 if end < start else None)
    return noise


class RestartScheduler(HeunDiscreteScheduler):
    pass_steps: int | None = None  # the steps the pass runs, the tail of the schedule set (None: all of it)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        levels = torch.cat([self.sigmas[:1], self.sigmas[1::2]])  # Heun's layout: each level but the ends twice
        known = dict(zip(levels[:-1].tolist(), self.timesteps[0::2].tolist()))
        steps = len(levels) - 1
        head = steps - min(self.pass_steps or steps, steps)
        before = list(zip(levels[:head], levels[1:head + 1]))  # never run, but where img2img counts the tail from
        tail = restart_steps(levels[head:])
        self._lay_out(before + tail, [None] * head + restart_noise(tail), known, device)

    def _lay_out(self, plan, noise, known: dict[float, float], device) -> None:
        """One entry a model call: its level, its timestep, whether it is a step's Heun correction, the level its
        step goes to, and the noise level added when its step is done (before a restart)."""
        levels, self._corrects, self._goes_to, self._noise_after = [], [], [], []
        for (start, end), lift in zip(plan, noise):
            if lift is not None:
                self._noise_after[-1] = lift
            calls = (start, end) if end > 0 else (start,)  # a step to 0 is Euler's
            levels += calls
            self._corrects += [False, True][:len(calls)]
            self._goes_to += [end] * len(calls)
            self._noise_after += [None] * len(calls)
        log_sigmas = np.log(np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5))
        self.sigmas = torch.stack([*levels, levels[0].new_zeros(())]).float()
        # the timesteps of Heun's own levels as it set them; the new levels' interpolated in log sigma, as k-diffusion
        times = np.interp(np.log(self.sigmas[:-1].double().numpy()), log_sigmas, np.arange(len(log_sigmas)))
        times = [known.get(level, time) for level, time in zip(self.sigmas[:-1].tolist(), times.tolist())]
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self._started = None

    @property
    def state_in_first_order(self) -> bool:
        """Between steps (not half-way through a Heun step)."""
        return getattr(self, "_started", None) is None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        call = self.step_index
        sigma = self.sigmas[call]
        denoised = denoised_of(self.config.prediction_type, model_output, sample, sigma)
        derivative = (sample - denoised) / sigma
        if self._corrects[call]:  # Heun: the step again from its start, with the two derivatives' mean
            start, start_derivative, start_sigma = self._started
            prev_sample = start + (start_derivative + derivative) / 2 * (sigma - start_sigma)
            self._started = None
        else:
            prev_sample = sample + derivative * (self._goes_to[call] - sigma)
            if call + 1 < len(self._corrects) and self._corrects[call + 1]:
                self._started = (sample, derivative, sigma)
        lift = self._noise_after[call]
        if lift is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            prev_sample = prev_sample + noise * lift
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
