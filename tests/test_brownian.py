"""A1111's Brownian-tree noise for the SDE samplers: the steps against k-diffusion's formulas with its noise sampler,
the torchsde draws from the run's random source, and through the engine: batch-independent, ENSD-independent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from tests.test_samplers import SD15_SCHEDULER
from webui.engine.brownian import brownian_draws_from, with_brownian_noise
from webui.engine.philox import PhiloxGenerator
from webui.engine.samplers import make_scheduler
from webui.engine.step_options import StepOptions, use_step_options
from webui.schemas import GenerationRequest

SEEDS = [3, 7]


def kdiffusion_2m_sde(sigmas, x, eps, noise_sampler, heun=False, eta=1.0, s_noise=1.0):
    """k-diffusion's sample_dpmpp_2m_sde with A1111's noise sampler."""
    old_denoised = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * eps(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return denoised
        h = sigmas[i].log() - sigmas[i + 1].log()
        eta_h = eta * h
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
        if old_denoised is not None:
            r = h_last / h
            factor = ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) if heun else 0.5 * (-h - eta_h).expm1().neg()
            x = x + factor * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def start_and_model(seed: int, sigma) -> tuple[torch.Tensor, callable]:
    """A start at noise level `sigma`, and a model whose estimate depends on its input and noise level."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(2, 4, 3, 3, generator=generator) * sigma
    weights = torch.randn(2, 4, 3, 3, generator=generator)
    return start, lambda x, level: torch.tanh(x / (1 + level ** 2) ** 0.5 + weights)


def multistep_run(scheduler, start: torch.Tensor, eps) -> torch.Tensor:
    """diffusers' loop over a multistep scheduler set from its first step; the result in k-diffusion's scale."""
    sigmas = scheduler.sigmas
    sample = start / (1 + sigmas[0] ** 2) ** 0.5  # diffusers' scaled latent
    for timestep in scheduler.timesteps:
        sigma = sigmas[scheduler.step_index or 0]
        sample = scheduler.step(eps(sample * (1 + sigma ** 2) ** 0.5, sigma), timestep, sample).prev_sample
    return sample * (1 + sigmas[-1] ** 2) ** 0.5


# A1111's Eta for ancestral samplers and Sigma noise, which its SDE samplers take: the defaults, both off them, no noise
OPTIONS = [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)]


@pytest.mark.parametrize("sampler, heun", [("DPM++ 2M SDE", False), ("DPM++ 2M SDE Heun", True)])
@pytest.mark.parametrize("eta, s_noise", OPTIONS)
def test_the_multistep_sde_samplers_step_with_a1111s_brownian_noise(sampler, heun, eta, s_noise):
    """DPM++ 2M SDE Heun is A1111's solver_type heun: the same solver with the Heun correction."""
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Karras")
    use_step_options(scheduler, sampler, StepOptions(eta_ancestral=eta, s_noise=s_noise))
    scheduler.set_timesteps(5)
    with_brownian_noise(scheduler, SEEDS)
    start, eps = start_and_model(1, scheduler.sigmas[0])
    sample = multistep_run(scheduler, start, eps)
    sigmas = scheduler.sigmas
    trees = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
    expected = kdiffusion_2m_sde(sigmas, start, eps, trees, heun, eta, s_noise)
    torch.testing.assert_close(sample, expected, rtol=1e-4, atol=1e-4)
    if (eta, s_noise) != (1.0, 1.0):  # not the defaults' picture
        assert not torch.allclose(sample, kdiffusion_2m_sde(sigmas, start, eps, trees, heun), atol=1e-2)
    plain = make_scheduler(SD15_SCHEDULER, sampler, "Karras")  # diffusers' own normal draws: another picture
    plain.set_timesteps(5)
    other = start / (1 + plain.sigmas[0] ** 2) ** 0.5
    for timestep in plain.timesteps:
        sigma = plain.sigmas[plain.step_index or 0]
        other = plain.step(eps(other * (1 + sigma ** 2) ** 0.5, sigma), timestep, other,
                           generator=torch.Generator().manual_seed(3)).prev_sample
    assert not torch.allclose(other, sample, atol=1e-3)


@pytest.mark.parametrize("sampler, heun, eta", [("DPM++ 2M", False, 0.0), ("DPM++ 2M SDE", False, 1.0),
                                              ("DPM++ 2M SDE Heun", True, 1.0)])
def test_a_schedule_ending_at_a_sigma_keeps_the_second_order_to_its_last_step_as_k_diffusion(sampler, heun, eta):
    """KL Optimal ends at the smallest sigma, not 0: k-diffusion's last step there is second order (diffusers' would
    drop to first order below 15 steps). DPM++ 2M is 2M SDE at eta 0."""
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, "KL Optimal")
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas
    assert float(sigmas[-1]) > 0.02  # it ends at a sigma
    if eta:
        with_brownian_noise(scheduler, SEEDS)
    start, eps = start_and_model(1, sigmas[0])
    sample = multistep_run(scheduler, start, eps)  # (at the last level's scale: not 1 here)
    trees = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
    torch.testing.assert_close(sample, kdiffusion_2m_sde(sigmas, start, eps, trees, heun, eta), rtol=1e-4, atol=1e-4)


def test_img2img_runs_the_tail_of_a_tree_spanning_the_whole_schedule():
    """A1111's sample_img2img makes its noise sampler from the whole schedule's sigmas, not the part it runs."""
    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ 2M SDE", "Karras")
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(4)
    with_brownian_noise(scheduler, SEEDS)
    generator = torch.Generator().manual_seed(2)
    sigmas = scheduler.sigmas
    start = torch.randn(2, 4, 3, 3, generator=generator) * sigmas[4]

    def eps(x, sigma):
        return torch.tanh(x / (1 + sigma ** 2) ** 0.5)

    sample = start / (1 + sigmas[4] ** 2) ** 0.5
    for timestep in scheduler.timesteps[4:]:
        sigma = sigmas[scheduler.step_index if scheduler.step_index is not None else 4]
        sample = scheduler.step(eps(sample * (1 + sigma ** 2) ** 0.5, sigma), timestep, sample).prev_sample
    whole = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
    torch.testing.assert_close(sample, kdiffusion_2m_sde(sigmas[4:], start, eps, whole), rtol=1e-4, atol=1e-4)
    tail = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas[4], seed=SEEDS)
    assert not torch.allclose(sample, kdiffusion_2m_sde(sigmas[4:], start, eps, tail), atol=1e-3)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_torchsde_draws_from_the_runs_source_in_float32_as_a1111(source):
    from torchsde._brownian import brownian_interval

    before = brownian_interval._randn
    with brownian_draws_from(source):
        drawn = brownian_interval._randn((2, 3), torch.float16, "cpu", 42)
    assert brownian_interval._randn is before  # put back
    expected = PhiloxGenerator(42).randn((2, 3)) if source == "NV" else \
        torch.randn((2, 3), generator=torch.Generator().manual_seed(42))
    assert drawn.dtype == torch.float16 and torch.equal(drawn, expected.half())


def run(engine, seeds, sampler="DPM++ 2M SDE", **fields):
    request = GenerationRequest(prompt="a red apple", steps=4, sampler_name=sampler, **fields)
    return [np.asarray(result.image, np.int16) for result in engine.generate(request, seeds)]


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_a_pictures_noise_is_its_seeds_tree_whatever_its_batch_and_eta_noise_seed_delta(engine, sampler):
    """A1111: no uses_ensd for them; plain normal draws from the generators would follow ENSD."""
    batch = run(engine, [21, 22], sampler)
    single = run(engine, [22], sampler, eta_noise_seed_delta=31337)[0]
    assert np.abs(batch[1] - single).max() <= 1  # batched convolutions may round a last bit otherwise
    assert np.abs(batch[0] - single).mean() > 1


def test_the_nv_source_changes_them(engine):
    plain = run(engine, [5])[0]
    nv = run(engine, [5], randn_source="NV")[0]
    assert not np.array_equal(nv, plain) and np.array_equal(run(engine, [5], randn_source="NV")[0], nv)


def kdiffusion_3m_sde(sigmas, x, eps, noise_sampler, eta=1.0, s_noise=1.0):
    """k-diffusion's sample_dpmpp_3m_sde with A1111's noise sampler."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * eps(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return denoised
        h = sigmas[i].log() - sigmas[i + 1].log()
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        phi_2 = (-h_eta).expm1() / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("eta, s_noise", OPTIONS)
def test_dpmpp_3m_sde_steps_as_k_diffusions(steps, eta, s_noise):
    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ 3M SDE", "Karras")
    use_step_options(scheduler, "DPM++ 3M SDE", StepOptions(eta_ancestral=eta, s_noise=s_noise))
    scheduler.set_timesteps(steps)
    with_brownian_noise(scheduler, SEEDS)
    sigmas = scheduler.sigmas
    start, eps = start_and_model(4, sigmas[0])
    sample = multistep_run(scheduler, start, eps)
    trees = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
    torch.testing.assert_close(sample, kdiffusion_3m_sde(sigmas, start, eps, trees, eta, s_noise), rtol=1e-4, atol=1e-4)
    if (eta, s_noise) != (1.0, 1.0):
        assert not torch.allclose(sample, kdiffusion_3m_sde(sigmas, start, eps, trees), atol=1e-2)


def kdiffusion_sde(sigmas, x, eps, noise_sampler, eta=1.0, s_noise=1.0):
    """k-diffusion's sample_dpmpp_sde (r 1/2) with A1111's noise sampler, in its own arithmetic (the levels through
    t = -log sigma and back: the tree's numbers depend on their last bits)."""
    def sigma_of(t):
        return t.neg().exp()

    def ancestral(sigma_from, sigma_to):  # k-diffusion's get_ancestral_step
        if not eta:
            return sigma_to, 0.0
        up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        return (sigma_to ** 2 - up ** 2) ** 0.5, up

    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * eps(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return denoised
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        s = t + (t_next - t) * 0.5
        down, up = ancestral(sigma_of(t), sigma_of(s))
        s_ = down.log().neg()
        x_2 = sigma_of(s_) / sigma_of(t) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(sigma_of(t), sigma_of(s)) * s_noise * up
        denoised_2 = x_2 - sigma_of(s) * eps(x_2, sigma_of(s))
        down, up = ancestral(sigma_of(t), sigma_of(t_next))
        t_next_ = down.log().neg()
        x = sigma_of(t_next_) / sigma_of(t) * x - (t - t_next_).expm1() * denoised_2
        x = x + noise_sampler(sigma_of(t), sigma_of(t_next)) * s_noise * up
    return x


@pytest.mark.parametrize("eta, s_noise", OPTIONS)
def test_dpmpp_sde_steps_as_k_diffusions_with_its_noise(eta, s_noise):
    """diffusers' DPM++ SDE, given the pictures' seeds (as the engine gives them), on A1111's Karras levels."""
    import warnings

    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ SDE", "Karras")
    use_step_options(scheduler, "DPM++ SDE", StepOptions(eta_ancestral=eta, s_noise=s_noise))
    scheduler.set_timesteps(4)
    scheduler.noise_sampler_seed = SEEDS
    generator = torch.Generator().manual_seed(6)
    start = torch.randn(2, 4, 3, 3, generator=generator) * scheduler.sigmas[0]
    weights = torch.randn(2, 4, 3, 3, generator=generator)

    def eps(x, sigma):
        return torch.tanh(x / (1 + sigma ** 2) ** 0.5 + weights)

    sample = start.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's, on a query a rounding below the tree's smallest level
        for timestep in scheduler.timesteps:
            scale = (scheduler.scale_model_input(sample, timestep) / sample).flatten()[0]
            sample = scheduler.step(eps(sample, (1 / scale ** 2 - 1) ** 0.5), timestep, sample).prev_sample
        sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])  # the levels without the midpoints
        trees = BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
        expected = kdiffusion_sde(sigmas, start, eps, trees, eta, s_noise)
        defaults = kdiffusion_sde(sigmas, start, eps, trees)
    torch.testing.assert_close(sample, expected, rtol=1e-4, atol=1e-4)
    assert (eta, s_noise) == (1.0, 1.0) or not torch.allclose(sample, defaults, atol=1e-2)


@pytest.mark.parametrize("eta", [1.0, 0.5])  # diffusers' own step, and ours
def test_dpmpp_sde_draws_its_tree_in_float32_for_fp16_latents(eta):
    """A1111's latents are float32 whatever the model's dtype; a tree built on fp16 latents (a GPU run) draws other
    noise. Found by review."""
    import warnings

    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ SDE", "Karras")
    use_step_options(scheduler, "DPM++ SDE", StepOptions(eta_ancestral=eta))
    scheduler.set_timesteps(4)
    scheduler.noise_sampler_seed = SEEDS
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)).half() * scheduler.sigmas[0].half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's, on a query a rounding below the tree's smallest level
        prev = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample).prev_sample
        sigmas = scheduler.sigmas
        float32 = BrownianTreeNoiseSampler(sample.float(), sigmas[sigmas > 0].min().item(), sigmas.max().item(),
                                           seed=SEEDS)
        levels = (sigmas[0], sigmas[1] * 0.5)
        drawn = scheduler.noise_sampler(*levels)
        assert drawn.dtype == torch.float16 and prev.dtype == torch.float16
        torch.testing.assert_close(drawn, float32(*levels).half(), atol=0, rtol=0)
