import math

import pytest
import torch

from webui.engine.samplers import (SAMPLERS, SCHEDULE_TYPES, ScheduleShape, a1111_timestep_levels, make_scheduler,
                                  resolve_sampler, sampler_names)
from tests.tiny_sd import tiny_components

EXPECTED = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
            "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ 2S a", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]


def test_every_known_sampler_name_is_offered():
    assert sampler_names() == EXPECTED
    # stable-diffusion-webui 1.10's schedule types, in its order
    assert list(SCHEDULE_TYPES) == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
    ("Euler a", ("Euler a", "Automatic")),
    ("K-LMS", ("LMS", "Automatic")),  # the seed blog's three: K-LMS, PNDM, DDIM
    ("PNDM", ("PLMS", "Automatic")),
    ("ddim", ("DDIM", "Automatic")),
    ("k_dpmpp_2m", ("DPM++ 2M", "Karras")),  # Automatic stands for the sampler's default, as in A1111
    ("UniPC SGM Uniform", ("UniPC", "SGM Uniform")),
])
def test_names_and_old_combined_names_resolve(name, expected):
    assert resolve_sampler(name, "Automatic") == expected


def test_schedule_type_names_are_case_insensitive():
    assert resolve_sampler("Euler", "karras") == ("Euler", "Karras")
    assert resolve_sampler("Euler", "sgm_uniform") == ("Euler", "SGM Uniform")
    assert resolve_sampler("Euler", "SGMUniform") == ("Euler", "SGM Uniform")  # A1111's alias
    assert resolve_sampler("Euler", "kl_optimal") == ("Euler", "KL Optimal")


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        resolve_sampler("Eular", "Automatic")
    assert "unknown sampler 'Eular'" in str(err.value)
    assert "DPM++ 2M" in str(err.value) and "UniPC" in str(err.value)


def test_unknown_schedule_and_unsupported_pair_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule type 'Linear Quadratic'"):  # ComfyUI's, not A1111's
        resolve_sampler("Euler", "Linear Quadratic")
    with pytest.raises(ValueError, match="'DDIM' does not support the Karras schedule"):
        resolve_sampler("DDIM", "Karras")


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_scheduler_keeps_the_models_own_config(sampler):
    from diffusers import EulerDiscreteScheduler

    base = EulerDiscreteScheduler.from_config(tiny_components()["scheduler"].config,
                                              prediction_type="v_prediction").config
    scheduler = make_scheduler(base, sampler)
    assert type(scheduler).__name__ == next(s.scheduler_class for s in SAMPLERS if s.name == sampler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_schedule_types_change_the_sigmas():
    base = dict(tiny_components()["scheduler"].config)
    plain = make_scheduler(base, "Euler")
    karras = make_scheduler(base, "Euler", "Karras")
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not (plain.sigmas == karras.sigmas).all()


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_every_offered_schedule_really_reaches_the_scheduler(sampler):
    import inspect

    from webui.engine.samplers import get_sampler

    base = dict(tiny_components()["scheduler"].config)
    for schedule in get_sampler(sampler).schedules:
        scheduler = make_scheduler(base, sampler, schedule)
        accepted = inspect.signature(type(scheduler).__init__).parameters
        for option, value in SCHEDULE_TYPES[schedule].items():
            assert option in accepted and scheduler.config[option] == value, (sampler, schedule, option)


SD15_SCHEDULER = {  # stable-diffusion-v1-5's scheduler_config.json (the published facts)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    "clip_sample": False, "skip_prk_steps": True,
}


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_every_schedule_a_sampler_accepts_changes_its_schedule(sampler):
    """A schedule type a sampler accepts but ignores would be a setting that silently does nothing."""
    def schedule(schedule_type):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler.name, schedule_type)
        scheduler.set_timesteps(12)  # at 10, our SGM Uniform (trailing) gives Simple's timesteps
        sigmas = getattr(scheduler, "sigmas", None)
        return scheduler.timesteps.tolist(), None if sigmas is None else [round(float(s), 4) for s in sigmas]

    distinct = sorted({resolve_sampler(sampler.name, label)[1] for label in sampler.schedules})
    schedules = {label: schedule(label) for label in distinct}
    same = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:] if schedules[a] == schedules[b]]
    assert all({a, b} in SAME_IN_A1111 for a, b in same), same


# A1111's Normal is its Uniform (k-diffusion's get_sigmas), and so is its Automatic for a sampler with no schedule of
# its own (diffusers' own spacing interpolates the sigmas linearly, k-diffusion log-linearly: nearly the same).
SAME_IN_A1111 = [{"Uniform", "Normal"}, {"Automatic", "Uniform"}, {"Automatic", "Normal"},
                 {"Exponential", "Polyexponential"}]  # at its default rho of 1


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_one_step_goes_from_pure_noise_to_the_image_with_every_schedule(sampler):
    """One-step models (SD-Turbo) run 1 step: it must start at the last training timestep, as A1111's
    k-diffusion does, and end at (about) no noise; t=0 or t=1, or a step that ends where it began,
    denoises nothing."""
    largest_sigma = float(sd15_sigmas()[-1])
    for schedule_type in sampler.schedules:
        scheduler = make_scheduler(SD15_SCHEDULER, sampler.name, schedule_type)
        scheduler.set_timesteps(1)
        assert float(scheduler.timesteps[0]) > 998, (schedule_type, scheduler.timesteps)
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None:
            assert float(sigmas[0]) == pytest.approx(largest_sigma, rel=1e-3), schedule_type
            assert float(sigmas[-1]) < 0.03, (schedule_type, sigmas)  # UniPC ends at the smallest sigma, 0.029


# stable-diffusion-webui 1.9+ (modules/sd_samplers_kdiffusion.py, samplers_k_diffusion): the schedule type
# each sampler uses when the request says Automatic.
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                   "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential",
                   "DPM++ 2S a": "Karras", "DPM2": "Karras", "DPM2 a": "Karras", "Restart": "Karras"}


@pytest.mark.parametrize("sampler", sampler_names())
def test_automatic_is_the_samplers_own_default_schedule_as_in_a1111(sampler):
    expected = A1111_AUTOMATIC.get(sampler, "Automatic")
    assert resolve_sampler(sampler, "Automatic") == (sampler, expected)
    assert resolve_sampler(sampler, None) == (sampler, expected)
    built = make_scheduler(SD15_SCHEDULER, sampler, "Automatic")
    steps = 19 if sampler == "Restart" else 20  # from 20 steps on, Restart lays its own schedule out
    built.set_timesteps(steps)
    if expected == "Automatic":
        assert not built.config.get("use_karras_sigmas", False)  # the scheduler's own sigmas
        return
    ours = built.sigmas.double()
    # A1111's DPM2, DPM2 a and DPM++ 3M SDE make a level more and leave the next-to-last out (its
    # discard_next_to_last_sigma)
    levels = A1111_FORMULAS[expected](steps + 1, sd15_sigmas())[:-1] if sampler in ("DPM2", "DPM2 a", "DPM++ 3M SDE") \
        else A1111_FORMULAS[expected](steps, sd15_sigmas())
    for level in levels:  # each level is there (DPM2 adds midpoints)
        assert torch.isclose(ours, level, rtol=1e-3).any(), (sampler, float(level))


def sd15_sigmas() -> torch.Tensor:
    """The SD 1.5 model's sigma for each of its 1000 training steps, from its beta schedule."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "LMS", "DPM++ SDE", "DPM++ 2M"])
def test_k_diffusion_samplers_start_at_the_models_largest_sigma_even_with_leading_spacing(sampler):
    """A1111 runs these from sigma_max (14.61 for SD 1.5); the config names "leading", which in
    diffusers would start them at t=951 (sigma 11.0) for 20 steps."""
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Automatic")
    scheduler.set_timesteps(20)
    assert float(scheduler.sigmas[0]) == pytest.approx(float(sd15_sigmas()[-1]), rel=1e-3)


def a1111_karras(steps, table):
    """k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max, rho=7), which A1111 calls with the model's smallest
    and largest sigma."""
    low, high = float(table[0]), float(table[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7


def a1111_exponential(steps, table):  # k-diffusion's get_sigmas_exponential: even in log sigma, largest first
    return torch.linspace(math.log(float(table[-1])), math.log(float(table[0])), steps, dtype=torch.float64).exp()


A1111_FORMULAS = {"Karras": a1111_karras, "Exponential": a1111_exponential}


def test_karras_sigmas_are_a1111s():
    """A1111's Karras, then a final 0."""
    steps = 20
    expected = a1111_karras(steps, sd15_sigmas())
    for sampler in ("Euler", "DPM++ 2M"):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Karras")
        scheduler.set_timesteps(steps)
        ours = scheduler.sigmas.double()
        assert float(ours[-1]) == 0 and torch.allclose(ours[:steps], expected, rtol=1e-3), sampler


def test_unipc_uses_a1111s_settings():
    unipc = make_scheduler(SD15_SCHEDULER, "UniPC").config
    assert (unipc.solver_type, unipc.solver_order) == ("bh1", 3)  # A1111: uni_pc_variant bh1, uni_pc_order 3
    assert unipc.final_sigmas_type == "sigma_min"  # A1111's UniPC stops at t = 1/1000


def test_beta_sigmas_are_a1111s():
    """A1111's beta_scheduler(n, sigma_min, sigma_max, alpha=0.6, beta=0.6): the beta distribution's quantiles at
    1 - linspace(0, 1, n) (1 down to 0, both ends in) between the model's smallest and largest sigma, then a final 0."""
    import numpy as np
    import scipy.stats

    sigmas = sd15_sigmas()
    low, high, steps = float(sigmas[0]), float(sigmas[-1]), 12
    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)
    expected = torch.tensor(low + quantiles * (high - low))
    assert float(expected[0]) == pytest.approx(high) and float(expected[-1]) == pytest.approx(low)
    for sampler in ("Euler", "DPM++ 2M", "Heun"):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Beta")
        scheduler.set_timesteps(steps)
        ours = scheduler.sigmas.double()
        assert float(ours[-1]) == 0, sampler
        assert torch.allclose(ours[:-1].unique_consecutive(), expected, rtol=1e-3), sampler  # Heun repeats sigmas


def test_dpmpp_3m_sde_is_the_third_order_sde_solver():
    config = make_scheduler(SD15_SCHEDULER, "DPM++ 3M SDE").config
    assert (config.algorithm_type, config.solver_order) == ("sde-dpmsolver++", 3)
    assert resolve_sampler("DPM++ 3M SDE", "Automatic") == ("DPM++ 3M SDE", "Exponential")


# NVIDIA's published Align Your Steps levels (its how-to page), as A1111 1.10 uses them
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


@pytest.mark.parametrize("sdxl, levels", [(False, AYS_SD15), (True, AYS_SDXL)])
@pytest.mark.parametrize("steps", [11, 20, 6])
def test_align_your_steps_uses_the_published_levels_interpolated_log_linearly(sdxl, levels, steps):
    if steps == len(levels):
        expected = torch.tensor(levels, dtype=torch.float64)
    else:  # log-linear interpolation, here by torch's linear resampling of the logs
        logs = torch.tensor(levels, dtype=torch.float64).log().flip(0)[None, None]
        expected = torch.nn.functional.interpolate(logs, size=steps, mode="linear", align_corners=True)[0, 0]
        expected = expected.exp().flip(0)
    for sampler in ("Euler", "DPM++ 2M"):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Align Your Steps", sdxl=sdxl)
        scheduler.set_timesteps(steps)
        ours = scheduler.sigmas.double()
        assert float(ours[-1]) == 0 and torch.allclose(ours[:-1], expected, rtol=1e-3), (sampler, ours)


@pytest.mark.parametrize("rho", [0.0, 2.5])
def test_polyexponential_is_k_diffusions_at_its_rho(rho):
    """get_sigmas_polyexponential(n, sigma_min, sigma_max, rho): exp(ramp ** rho * (log max - log min) + log min)
    with ramp from 1 to 0, then a final 0; A1111's Schedule rho, 0 for its default of 1."""
    sigmas = sd15_sigmas()
    low, high, steps = float(sigmas[0]), float(sigmas[-1]), 15
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** (rho or 1.0)
    expected = (ramp * (torch.tensor(high).log() - torch.tensor(low).log()) + torch.tensor(low).log()).exp()
    assert resolve_sampler("Euler", "polyexponential") == ("Euler", "Polyexponential")
    scheduler = make_scheduler(SD15_SCHEDULER, "Euler", "Polyexponential", shape=ScheduleShape(rho=rho))
    scheduler.set_timesteps(steps)
    ours = scheduler.sigmas.double()
    assert float(ours[-1]) == 0 and torch.allclose(ours[:-1], expected, rtol=1e-3)
    exponential = make_scheduler(SD15_SCHEDULER, "Euler", "Exponential", shape=ScheduleShape(rho=rho))
    exponential.set_timesteps(steps)
    assert torch.allclose(exponential.sigmas, scheduler.sigmas, rtol=1e-4) == (not rho)  # the same at rho 1 alone


def log_linear_sigma(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's t_to_sigma: the log of the table's sigmas interpolated between the two whole timesteps around t."""
    low = t.floor().long().clamp(max=len(table) - 2)
    weight = t - low
    return ((1 - weight) * table[low].log() + weight * table[low + 1].log()).exp()


def a1111_uniform(steps, table):  # sd_schedulers.uniform (k-diffusion get_sigmas) and normal_scheduler
    return log_linear_sigma(table, torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64))


def a1111_simple(steps, table):  # sd_schedulers.simple_scheduler
    return torch.stack([table[-(1 + int(x * len(table) / steps))] for x in range(steps)])


def a1111_ddim(steps, table):  # sd_schedulers.ddim_scheduler: the timesteps 1, 1 + k, ... below 1000, largest first
    return torch.stack([table[t] for t in range(1, len(table), max(len(table) // steps, 1))]).flip(0)


def a1111_kl_optimal(steps, table):  # sd_schedulers.kl_optimal: steps + 1 levels, the last the smallest sigma
    indices = torch.arange(steps + 1, dtype=torch.float64)
    low, high = torch.atan(table[0]), torch.atan(table[-1])
    return torch.tan(indices / steps * low + (1 - indices / steps) * high)


@pytest.mark.parametrize("schedule, a1111", [("Uniform", a1111_uniform), ("Normal", a1111_uniform),
                                             ("Simple", a1111_simple), ("DDIM", a1111_ddim)])
@pytest.mark.parametrize("steps", [20, 13])
def test_the_table_schedules_are_a1111s(schedule, a1111, steps):
    """Uniform, Normal, Simple and DDIM read the model's sigma table; each then ends at 0."""
    expected = a1111(steps, sd15_sigmas())
    for sampler in ("Euler", "DPM++ 2M", "LMS"):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, schedule)
        scheduler.set_timesteps(steps)
        ours = scheduler.sigmas.double()
        assert float(ours[-1]) == 0, (schedule, sampler)
        if len(expected) == steps:
            assert torch.allclose(ours[:-1], expected, rtol=1e-3), (schedule, sampler, ours, expected)
        else:  # DDIM at 13 steps: A1111 makes 14 levels and runs 14 steps; we keep the 13 largest
            assert schedule == "DDIM" and len(expected) == steps + 1
            assert torch.allclose(ours[:-1], expected[:steps], rtol=1e-3), (schedule, sampler)


@pytest.mark.parametrize("steps", [20, 7])
def test_kl_optimal_is_a1111s_and_ends_at_the_smallest_sigma(steps):
    expected = a1111_kl_optimal(steps, sd15_sigmas())
    for sampler in ("Euler", "DPM++ 2M", "UniPC"):  # the schedulers that can end at a sigma
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, "KL Optimal")
        scheduler.set_timesteps(steps)
        assert torch.allclose(scheduler.sigmas.double(), expected, rtol=1e-3), (sampler, scheduler.sigmas)
    lms = make_scheduler(SD15_SCHEDULER, "LMS", "KL Optimal")  # LMS always ends at 0
    lms.set_timesteps(steps)
    assert torch.allclose(lms.sigmas.double()[:-1], expected[:-1], rtol=1e-3) and float(lms.sigmas[-1]) == 0


@pytest.mark.parametrize("schedule", ["Simple", "DDIM", "KL Optimal", "Uniform", "Align Your Steps"])
def test_unipc_ends_its_schedule_at_the_smallest_sigma(schedule):
    """UniPC ends custom sigmas by repeating their last level; Simple's at 30 steps is 0.18, left in the picture."""
    scheduler = make_scheduler(SD15_SCHEDULER, "UniPC", schedule)
    scheduler.set_timesteps(30)
    sigmas = scheduler.sigmas.double()
    assert float(sigmas[-1]) == pytest.approx(float(sd15_sigmas()[0]), rel=1e-3)
    assert float(sigmas[-2]) > float(sigmas[-1]) or schedule in ("Uniform", "Align Your Steps")  # those end there


@pytest.mark.parametrize("schedule", ["Beta", "KL Optimal", "Uniform", "Simple", "Karras", "Exponential"])
def test_the_model_schedules_span_the_whole_table_whatever_the_timestep_spacing(schedule):
    """A config naming "trailing" spacing (the embedded model's) samples timesteps 999, 949, ..., 49 at 20 steps;
    the schedule types still run from the model's largest sigma to its smallest, as A1111's do."""
    trailing = {**SD15_SCHEDULER, "timestep_spacing": "trailing"}
    leading = make_scheduler(SD15_SCHEDULER, "Euler", schedule)
    ours = make_scheduler(trailing, "Euler", schedule)
    for scheduler in (leading, ours):
        scheduler.set_timesteps(20)
    assert torch.allclose(ours.sigmas, leading.sigmas)
    assert float(ours.sigmas[0]) == pytest.approx(float(sd15_sigmas()[-1]), rel=1e-3)


# A1111's sigma_min, sigma_max and rho options (ScheduleShape)

@pytest.mark.parametrize("schedule, formula", [
    ("Karras", lambda steps, ends: a1111_karras(steps, ends)),
    ("Exponential", lambda steps, ends: a1111_exponential(steps, ends)),
    ("KL Optimal", lambda steps, ends: a1111_kl_optimal(steps, ends)[:-1]),
])
def test_the_schedule_min_and_max_sigma_move_the_ends_of_the_range_spanning_schedules(schedule, formula):
    from webui.engine.samplers import ScheduleShape

    ends = torch.tensor([0.1, 8.0], dtype=torch.float64)
    scheduler = make_scheduler(SD15_SCHEDULER, "Euler", schedule, shape=ScheduleShape(sigma_min=0.1, sigma_max=8.0))
    scheduler.set_timesteps(12)
    assert torch.allclose(scheduler.sigmas.double()[:12], formula(12, ends), rtol=1e-3), scheduler.sigmas
    only_max = make_scheduler(SD15_SCHEDULER, "Euler", schedule, shape=ScheduleShape(sigma_max=8.0))
    only_max.set_timesteps(12)
    model_min = float(sd15_sigmas()[0])
    assert float(only_max.sigmas[0]) == pytest.approx(8.0, rel=1e-3)
    assert torch.allclose(only_max.sigmas.double()[:12], formula(12, torch.tensor([model_min, 8.0],
                                                                                    dtype=torch.float64)), rtol=1e-3)


def test_kl_optimal_ends_at_the_schedule_min_sigma_and_a_one_sided_range_must_fall():
    from webui.engine.samplers import ScheduleShape

    for sampler in ("Euler", "UniPC"):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler, "KL Optimal", shape=ScheduleShape(sigma_min=0.5))
        scheduler.set_timesteps(8)
        assert float(scheduler.sigmas[-1]) == pytest.approx(0.5), sampler  # A1111's kl_optimal ends there
    climbing = make_scheduler(SD15_SCHEDULER, "Euler", "Karras", shape=ScheduleShape(sigma_min=20.0))
    with pytest.raises(ValueError, match="sigma_min: 20 is not below this model's largest sigma 14.6"):
        climbing.set_timesteps(6)
    assert ScheduleShape(sigma_max=0.01).range_problem(sd15_sigmas().numpy()).startswith("sigma_max: 0.01 is not above")


def test_the_schedule_rho_bends_karras_and_the_table_schedules_ignore_the_range():
    from webui.engine.samplers import ScheduleShape

    steep = make_scheduler(SD15_SCHEDULER, "Euler", "Karras", shape=ScheduleShape(rho=3.0))
    steep.set_timesteps(10)
    low, high = float(sd15_sigmas()[0]), float(sd15_sigmas()[-1])
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (high ** (1 / 3) + ramp * (low ** (1 / 3) - high ** (1 / 3))) ** 3
    assert torch.allclose(steep.sigmas.double()[:10], expected, rtol=1e-3)
    for schedule in ("Uniform", "Simple", "Align Your Steps"):  # A1111 hands them the range; they read their own
        plain, shaped = (make_scheduler(SD15_SCHEDULER, "Euler", schedule, shape=shape)
                         for shape in (ScheduleShape(), ScheduleShape(sigma_min=0.5, sigma_max=5.0, rho=2.0)))
        plain.set_timesteps(10)
        shaped.set_timesteps(10)
        assert torch.equal(plain.sigmas, shaped.sigmas), schedule


def kdiffusion_2s_ancestral(sigmas: torch.Tensor, x: torch.Tensor, eps, noise, eta: float = 1.0,
                            s_noise: float = 1.0) -> torch.Tensor:
    """k-diffusion's sample_dpmpp_2s_ancestral on a model whose noise estimate at (x, sigma) is eps(x, sigma), with
    the given noise draws."""
    draws = iter(noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = x - sigma * eps(x, sigma)
        sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        if sigma_down == 0:
            x = denoised  # the Euler step to 0
        else:
            t, t_next = -sigma.log(), -sigma_down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = x_2 - s.neg().exp() * eps(x_2, s.neg().exp())
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + next(draws) * s_noise * sigma_up
    return x


@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.7)])
def test_dpmpp_2s_a_steps_as_k_diffusions_ancestral_sampler(eta, s_noise):
    """At A1111's Eta for ancestral samplers too (0: DPM++ 2S, no noise), and its Sigma noise."""
    from webui.engine.step_options import StepOptions, use_step_options

    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ 2S a", "Karras")
    use_step_options(scheduler, "DPM++ 2S a", StepOptions(eta_ancestral=eta, s_noise=s_noise))
    steps = 4
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64) * scheduler.sigmas[0]
    weights = torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64)

    def eps(x, sigma):  # a model whose estimate depends on its input and noise level
        return torch.tanh(x / (1 + sigma ** 2) ** 0.5 + weights)

    sample, calls = start.clone(), 0
    noise_generator = torch.Generator().manual_seed(9)
    for timestep in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.step_index or 0] if scheduler.state_in_first_order else \
            scheduler.sigmas_interpol[scheduler.step_index - 1]
        output = eps(sample, sigma.double())
        sample = scheduler.step(output, timestep, sample, generator=noise_generator).prev_sample
        calls += 1
    assert calls == 2 * steps - 1  # two a step, one for the last (to 0)
    draws_generator = torch.Generator().manual_seed(9)
    noise = [torch.randn(1, 4, 2, 2, generator=draws_generator, dtype=torch.float64) for _ in range(steps - 1)]
    sigmas = torch.tensor([float(s) for s in a1111_karras(steps, sd15_sigmas())] + [0.0], dtype=torch.float64)
    expected = kdiffusion_2s_ancestral(sigmas, start, eps, noise, eta, s_noise)
    torch.testing.assert_close(sample, expected, rtol=1e-4, atol=1e-4)
    if (eta, s_noise) != (1.0, 1.0):  # the levels or the noise moved: not the defaults' picture
        assert not torch.allclose(sample, kdiffusion_2s_ancestral(sigmas, start, eps, noise), atol=1e-3)


def a1111_float32_table() -> torch.Tensor:
    """A1111's model sigmas: LDM's float64 alpha bars kept as float32, then k-diffusion's float32 arithmetic."""
    alpha_bars = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    alpha_bars = alpha_bars.float()
    return ((1 - alpha_bars) / alpha_bars) ** 0.5


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Polyexponential"])
def test_the_range_schedules_are_a1111s_to_the_bit(schedule):
    """k-diffusion's get_sigmas_* in float32 from the table's ends as floats: the SDE samplers' Brownian noise is
    drawn at these levels, so a last-bit difference makes another picture."""
    low, high = a1111_float32_table()[0].item(), a1111_float32_table()[-1].item()
    n = 17
    if schedule == "Karras":
        expected = (high ** (1 / 7) + torch.linspace(0, 1, n) * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    elif schedule == "Exponential":
        expected = torch.linspace(math.log(high), math.log(low), n).exp()
    else:
        expected = torch.exp(torch.linspace(1, 0, n) * (math.log(high) - math.log(low)) + math.log(low))
    scheduler = make_scheduler(SD15_SCHEDULER, "DPM++ 2M SDE", schedule)
    scheduler.set_timesteps(n)
    assert torch.equal(scheduler.sigmas[:-1].float(), expected)
    assert float(scheduler.timesteps[0]) == 999  # the model's own largest sigma, at its last timestep


def stand_in_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A stand-in model's noise prediction: depends on the sample and the timestep, as a UNet's does."""
    return 0.3 * x - 0.05 + t / 4000 + torch.linspace(-0.2, 0.2, x.shape[-1])


def a1111_timestep_run(steps: int) -> tuple[list[int], torch.Tensor]:
    """sd_samplers_timesteps.get_timesteps: every 1000 // steps from t=1, clipped to 999; and SD 1.5's alpha bars."""
    alphas = make_scheduler(SD15_SCHEDULER, "DDIM", "Automatic").alphas_cumprod.double()
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)], alphas


def a1111_ddim(x: torch.Tensor, steps: int, t_enc: int | None = None) -> torch.Tensor:
    """sd_samplers_timesteps_impl.ddim at eta 0: the model called at each level but the lowest, each step down to the
    next lower level, the run ending at t=1's. `t_enc`: sample_img2img's run on the levels below t_enc alone."""
    timesteps, alphas = a1111_timestep_run(steps)
    timesteps = timesteps[:t_enc]
    x = x.double()
    for index in range(len(timesteps) - 1, 0, -1):
        a_t, a_prev = alphas[timesteps[index]].item(), alphas[timesteps[index - 1]].item()
        e_t = stand_in_eps(x, timesteps[index])
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_t
    return x.float()


def a1111_plms(x: torch.Tensor, steps: int, t_enc: int | None = None) -> torch.Tensor:
    """sd_samplers_timesteps_impl.plms: a pseudo improved Euler step first (a second call at the next level), then
    Adams-Bashforth of orders 2, 3 and 4 on the noise predictions kept. `t_enc`: as a1111_ddim's."""
    timesteps, alphas = a1111_timestep_run(steps)
    timesteps = timesteps[:t_enc]
    x, old_eps = x.double(), []

    def step_with(e_t, index):
        a_t, a_prev = alphas[timesteps[index]].item(), alphas[timesteps[index - 1]].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        return a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_t

    for index in range(len(timesteps) - 1, 0, -1):
        e_t = stand_in_eps(x, timesteps[index])
        if not old_eps:
            e_next = stand_in_eps(step_with(e_t, index), timesteps[index - 1])
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step_with(e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x.float()


def scheduler_run(sampler: str, x: torch.Tensor, steps: int, config: dict = SD15_SCHEDULER,
                  shape: ScheduleShape = ScheduleShape()) -> torch.Tensor:
    """The scheduler as the pipeline runs a txt2img pass: every timestep it sets, from unit noise."""
    scheduler = make_scheduler(config, sampler, "Automatic", pass_steps=steps, from_noise=True, shape=shape)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(stand_in_eps(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 4, 10, 20, 30, 45])
@pytest.mark.parametrize("sampler, a1111", [("DDIM", a1111_ddim), ("PLMS", a1111_plms)])
def test_ddim_and_plms_run_a1111s_timesteps_and_steps(sampler, a1111, steps):
    """A pasted A1111 infotext with DDIM or PLMS makes A1111's picture: its levels (30 steps: 31 levels, 30 calls
    from t=991; 20 steps: 19 calls from t=951 to t=51) and its step formulas."""
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(scheduler_run(sampler, start, steps), a1111(start, steps), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [4, 10, 20, 30])
@pytest.mark.parametrize("sampler, a1111", [("DDIM", a1111_ddim), ("PLMS", a1111_plms)])
def test_always_discard_next_to_last_sigma_runs_ddim_and_plms_on_the_levels_of_one_step_more(sampler, a1111, steps):
    """A1111's get_timesteps adds a step where the option is on (at 20 steps: 21 calls from t=988)."""
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    discarding = ScheduleShape(discard_penultimate=True)
    torch.testing.assert_close(scheduler_run(sampler, start, steps, shape=discarding), a1111(start, steps + 1),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [2, 8, 26, 35, 36, 100, 110])
def test_always_discard_changes_nothing_where_a1111_clips_the_table_of_one_step_more(steps):
    """There the option kept diffusers' layout for the steps asked, off A1111's, while the infotext said it discarded
    (found by review): the steps asked keep A1111's layout, and no infotext key is written."""
    from webui.schemas import GenerationRequest

    def timesteps(shape):
        scheduler = make_scheduler(SD15_SCHEDULER, "DDIM", "Automatic", pass_steps=steps, from_noise=True, shape=shape)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()

    assert a1111_timestep_levels(steps + 1)[-1] >= 1000  # (clipped)
    assert timesteps(ScheduleShape(discard_penultimate=True)) == timesteps(ScheduleShape())
    asked = GenerationRequest(prompt="", sampler_name="DDIM", steps=steps, always_discard_next_to_last_sigma=True)
    assert not asked.discard_changes_a_pass
    assert asked.model_copy(update={"init_image": "0" * 40}).discard_changes_a_pass  # img2img lays it out still


def a1111_img2img_start(picture: torch.Tensor, noise: torch.Tensor, steps: int, t_enc: int) -> torch.Tensor:
    """sd_samplers_timesteps.sample_img2img's start: the picture noised to the level at t_enc."""
    timesteps, alphas = a1111_timestep_run(steps)
    alpha = alphas[timesteps[t_enc]].item()
    return (picture.double() * alpha ** 0.5 + noise.double() * (1 - alpha) ** 0.5).float()


@pytest.mark.parametrize("schedule, pass_steps", [(20, 16), (20, 4), (26, 20), (45, 3), (10, 10)])
@pytest.mark.parametrize("sampler, a1111", [("DDIM", a1111_ddim), ("PLMS", a1111_plms)])
def test_img2img_ddim_and_plms_run_a1111s_levels_below_t_enc(sampler, a1111, schedule, pass_steps):
    """An img2img (or hires) pass of `pass_steps` (A1111's t_enc + 1) of a `schedule`: A1111 noises the picture to
    the level at t_enc and calls the model from the one below (20 steps at strength 0.75: t=751, then t=701 to 51)."""
    from types import SimpleNamespace

    from webui.engine.generate import _noised_latents

    picture, noise = (torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) for seed in (3, 7))
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, "Automatic", pass_steps=pass_steps)
    scheduler.set_timesteps(schedule)
    # the engine's start: the pipeline hands it the first call's timestep
    x = _noised_latents(SimpleNamespace(scheduler=scheduler), noise, 0.0, picture, scheduler.timesteps[:1])
    t_enc = pass_steps - 1
    torch.testing.assert_close(x, a1111_img2img_start(picture, noise, schedule, t_enc), atol=1e-6, rtol=1e-6)
    for t in scheduler.timesteps:
        x = scheduler.step(stand_in_eps(x, int(t)), t, x).prev_sample
    expected = a1111(a1111_img2img_start(picture, noise, schedule, t_enc), schedule, t_enc)
    torch.testing.assert_close(x, expected, atol=2e-5, rtol=1e-5)


def test_a1111s_timesteps_only_on_a_model_laid_out_as_sd_and_where_a1111_calls_the_model():
    """img2img's and the hires fix's passes run A1111's levels below t_enc too (its sample_img2img); a model made
    for another spacing (the embedded model's "trailing") keeps its own; so do step counts A1111's layout cannot be
    stepped at, and passes of two steps or fewer, where A1111 makes no call."""
    def timesteps(config, from_noise, steps=20, pass_steps=20):
        scheduler = make_scheduler(config, "DDIM", "Automatic", pass_steps=pass_steps, from_noise=from_noise)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()

    assert timesteps(SD15_SCHEDULER, True) == list(range(951, 50, -50))
    assert timesteps(SD15_SCHEDULER, False) == list(range(901, 50, -50))  # noised to t=951, t_enc 19
    assert timesteps(SD15_SCHEDULER, False, pass_steps=16) == list(range(701, 50, -50))
    assert timesteps(SD15_SCHEDULER, False, pass_steps=2) == list(range(951, 0, -50))  # diffusers': 20 calls to t=1
    assert timesteps(SD15_SCHEDULER | {"timestep_spacing": "trailing"}, True) == list(range(999, 0, -50))
    # where A1111 clips its top level to t=999 (27 steps: 1000 would be next), no step of k reaches it: diffusers'
    assert timesteps(SD15_SCHEDULER, True, steps=27) == list(range(1 + 26 * 37, 0, -37))
    assert len(timesteps(SD15_SCHEDULER, True, steps=1)) == 1  # A1111's one level would make no call at all


@pytest.mark.parametrize("steps, calls", [(20, 19), (51, 52), (150, 166)])
def test_a_pass_on_a1111s_timesteps_counts_a_step_a_call(steps, calls):
    """As A1111 reads its prompt schedule (and times ControlNet) by the call: at 51 steps it makes 52 calls, and
    [cat:dog:15] switches after the 15th, not after the 16th as a count in proportion had it; the last call ends
    the steps (at 20 steps, 19 calls)."""
    from webui.engine.samplers import sampler_steps_done

    scheduler = make_scheduler(SD15_SCHEDULER, "DDIM", "Automatic", pass_steps=steps, from_noise=True)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == calls
    done = [sampler_steps_done(call, calls, steps, scheduler) for call in range(1, calls + 1)]
    assert done[:15] == list(range(1, 16)) and done[-1] == steps and done == sorted(done)
    heun = make_scheduler(SD15_SCHEDULER, "Heun", "Automatic", from_noise=True)
    heun.set_timesteps(10)  # two calls a step but the last: in proportion
    assert [sampler_steps_done(call, 19, 10, heun) for call in (1, 2, 18, 19)] == [0, 1, 9, 10]
