"""A1111's Brownian-tree noise for its SDE samplers (DPM++ SDE, 2M SDE, 2M SDE Heun, 3M SDE).

A1111 gives these samplers k-diffusion's BrownianTreeNoiseSampler, one tree per picture seeded by the picture's seed,
over the run's noise levels: the noise of a step from sigma to sigma_next is the tree's normalised increment between
them. So a picture's noise does not depend on its batch, nor on Eta noise seed delta, and a run of more steps samples
the same path more finely. diffusers' DPM++ SDE has such a tree of its own (its noise_sampler_seed); its multistep
SDE solvers draw plain normal noise, so `with_brownian_noise` hands them the tree's increments instead.

The trees draw their normal numbers through torchsde, which A1111 redirects to its random number source (float32 on
the CPU, or the NV source's Philox numbers, then cast): `brownian_draws_from` does the same for a run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from webui.engine.philox import draw, make_generator

# The multistep SDE samplers whose step noise comes from a tree here (DPM++ SDE has its own)
MULTISTEP_SDE_SAMPLERS = ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")


@contextlib.contextmanager
def brownian_draws_from(source: str) -> Iterator[None]:
    """torchsde's normal numbers, while the block runs, from the run's random source as A1111 draws them
    (devices.randn_local): the seed's CPU generator or Philox numbers in float32, cast to the tree's dtype."""
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn

    def randn(size, dtype, device, seed):
        return draw(make_generator(source, seed), tuple(size), torch.float32).to(device=device, dtype=dtype)

    brownian_interval._randn = randn
    try:
        yield
    finally:
        brownian_interval._randn = original


def with_brownian_noise(scheduler, seeds: list[int]) -> None:
    """Make a DPM-Solver multistep SDE scheduler step with Brownian-tree noise, one tree per picture of these seeds,
    spanning the whole schedule's noise levels (img2img and the hires pass run its tail; A1111's tree spans it all
    too), in float32 as A1111's latents are, as k-diffusion's sample_dpmpp_2m_sde and 3m_sde draw it; the step to
    sigma 0 adds none."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    step = scheduler.step
    trees = None

    def brownian_step(model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        nonlocal trees
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        sigmas = scheduler.sigmas
        sigma, sigma_next = sigmas[scheduler.step_index], sigmas[scheduler.step_index + 1]
        if trees is None:
            trees = BrownianTreeNoiseSampler(sample.float(), sigmas[sigmas > 0].min(), sigmas.max(), seed=list(seeds))
        noise = trees(sigma, sigma_next).to(sample) if sigma_next > 0 else torch.zeros_like(sample)
        return step(model_output, timestep, sample, generator=generator, variance_noise=noise,
                    return_dict=return_dict)

    scheduler.step = brownian_step
