"""Model calls that leave the negative prompt out, as A1111's two sampler options do:

- Skip Early CFG (`skip_early_cond`): the first part of a pass runs without classifier-free guidance, which can
  make pictures more varied (and the pass faster);
- NGMS, "Negative Guidance minimum sigma" (`s_min_uncond`): once the noise level (sigma) has fallen below it, every
  other call (every call with `s_min_uncond_all`) leaves the negative prompt out: the picture is almost done and
  guidance changes little there, so the pass is faster.

A skipped call runs the UNet on the positive rows alone and its result stands for the negative rows too, so the
pipeline's guidance (uncond + cfg * (cond - uncond)) gives the positive prediction unchanged, as A1111's does.
The calls to skip are worked out before the pass from its timesteps (webui/engine/refiner.py's pass_timesteps);
hooks around the UNet do the rest, after the other UNet hooks (composed prompts, ControlNet, an inpainting
model's channels) have laid out the batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from webui.engine.unet_hooks import removed_after, with_prediction

MAX_NGMS = 15.0  # A1111's slider's end


@dataclass(frozen=True)
class UncondSkip:
    early: float = 0.0  # skip_early_cond: the part of a pass's calls, from its start (0: none, 1: all)
    min_sigma: float = 0.0  # s_min_uncond (NGMS): below this sigma, calls skip (0: never)
    all_steps: bool = False  # s_min_uncond_all: NGMS skips every call below its sigma, not every other one

    @property
    def active(self) -> bool:
        return self.early > 0 or self.min_sigma > 0

    def skips(self, call: int, calls: int, sigma: float) -> bool:
        """Whether model call `call` (from 0) of a pass A1111 counts as `calls` (its steps times the sampler's
        order), at noise level `sigma`, skips the negative."""
        if self.early > 0 and call / calls <= self.early:
            return True
        return self.min_sigma > 0 and (call % 2 == 1 or self.all_steps) and sigma < self.min_sigma


def sigmas_at(timesteps: torch.Tensor | list[float], alphas_cumprod: torch.Tensor) -> list[float]:
    """The noise level of each timestep, sqrt((1 - a) / a) of the schedule's cumulative alphas, read between the
    model's 1000 steps on a log scale (how a Karras schedule's sigmas became fractional timesteps)."""
    alphas = alphas_cumprod.double().numpy()
    log_sigmas = np.log(np.sqrt((1 - alphas) / alphas))
    points = np.asarray([float(t) for t in timesteps], dtype=np.float64)
    return np.exp(np.interp(points, np.arange(len(alphas)), log_sigmas)).tolist()


def skip_plan(skip: UncondSkip, timesteps: torch.Tensor | list[float], alphas_cumprod: torch.Tensor,
              calls: int | None = None) -> list[bool]:
    """For each model call of a pass (at these timesteps), whether it leaves the negative prompt out. `calls`: the
    calls A1111 expects of the pass, Skip Early CFG's measure (steps x 2 for a second-order sampler such as Heun,
    whose last step calls once); None: one per timestep."""
    if not skip.active:
        return [False] * len(timesteps)
    sigmas = sigmas_at(timesteps, alphas_cumprod)
    return [skip.skips(call, calls or len(sigmas), sigma) for call, sigma in enumerate(sigmas)]


class SkipCalls:
    """A pass's plan and how far it has come: the UNets that run the pass (the model's, a refiner's) share it."""

    def __init__(self, plan: list[bool], images: int):
        self.plan = plan
        self.images = images  # the negative rows at the head of a guided batch: one per image
        self.call = 0

    def next_skips(self, rows: int) -> bool:
        """Whether the call about to run (a batch of `rows`) skips; counts the call. An unguided batch (CFG 1, one
        row per image) has no negative rows to leave out."""
        call, self.call = self.call, self.call + 1
        return rows > self.images and call < len(self.plan) and self.plan[call]


@contextlib.contextmanager
def skipping_uncond(unet, calls: SkipCalls | None) -> Iterator[None]:
    """While inside, the planned calls of `unet` run without their negative rows. Enter it after the other UNet
    hooks: its pre-hook must see the batch they laid out, and its last hook must see their results."""
    if calls is None or not any(calls.plan):
        yield
        return
    skipped = []  # whether the call in progress skipped

    def drop_uncond(_module, args, kwargs):
        rows = args[0].shape[0]
        skipped[:] = [calls.next_skips(rows)]
        if not skipped[0]:
            return None
        head = calls.images
        return tuple(_rows_after(value, head, rows) for value in args), {
            name: _rows_after(value, head, rows) for name, value in kwargs.items()}

    def stand_in_for_uncond(_module, _args, output):
        # Before the other hooks read the result: rows in place of the negative ones (A1111 takes each image's
        # first positive row), so a composed prompt's hook finds the batch it laid out.
        if not skipped[0]:
            return None
        return with_prediction(output, lambda pred: torch.cat([pred[:calls.images], pred]))

    def cond_for_both(_module, _args, output):
        # Last: the negative rows become the positive ones, so guidance leaves the positive prediction as it is.
        if not skipped[0]:
            return None
        images = calls.images
        return with_prediction(output, lambda pred: torch.cat([pred[images:2 * images], pred[images:]]))

    with removed_after([unet.register_forward_pre_hook(drop_uncond, with_kwargs=True),
                        unet.register_forward_hook(stand_in_for_uncond, prepend=True),
                        unet.register_forward_hook(cond_for_both)]):
        yield


def _rows_after(value, head: int, rows: int):
    """A batch-wide input without its first `head` rows; other inputs (a 0-d timestep, flags) as they are.
    ControlNet's residuals come as a list of tensors."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == rows:
        return value[head:]
    if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(item) for item in value):
        return type(value)(_rows_after(item, head, rows) for item in value)
    if isinstance(value, dict):  # SDXL's added_cond_kwargs: pooled vectors and size numbers, a row per image
        return {name: _rows_after(item, head, rows) for name, item in value.items()}
    return value
