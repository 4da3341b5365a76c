"""The Restart sampler (webui/engine/restart.py) against A1111's, from its steps to the engine, the infotext and the API."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.restart import RestartScheduler
from webui.engine.samplers import ScheduleShape, make_scheduler
from webui.engine.step_options import StepOptions, draws_noise
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext
from tests.test_samplers import SD15_SCHEDULER


def karras(steps: int, smallest: float, largest: float) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras (rho 7, float32, a final 0 appended)."""
    ramp = torch.linspace(0, 1, steps)
    levels = (largest ** (1 / 7) + ramp * (smallest ** (1 / 7) - largest ** (1 / 7))) ** 7
    return torch.cat([levels, torch.zeros(1)])


def a1111_restart_steps(levels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (from, to) pairs A1111's restart_sampler (modules/sd_samplers_extra.py) builds with its automatic restart
    list: from 20 steps, Karras again over the given ends with fewer steps, and after the step that lands at the level
    nearest 0.1, 9 steps (steps // 4 twice from 36 steps) of a Karras schedule from the level nearest 2 down to it."""
    count = len(levels) - 1
    restarts = {}
    if count >= 20:
        each, times = (count // 4, 2) if count >= 36 else (9, 1)
        levels = karras(count - each * times, levels[-2].item(), levels[0].item())
        restarts = {int(torch.argmin((levels - 0.1).abs())): (each + 1, times, 2.0)}
    pairs = []
    for i in range(len(levels) - 1):
        pairs.append((levels[i], levels[i + 1]))
        if i + 1 in restarts:
            length, times, top_level = restarts[i + 1]
            top = int(torch.argmin((levels - top_level).abs()))
            if top < i + 1:
                down = karras(length, levels[i + 1].item(), levels[top].item())[:-1]
                pairs += list(zip(down[:-1], down[1:])) * times
    return pairs


def a1111_restart(levels: torch.Tensor, x: torch.Tensor, eps, draws) -> torch.Tensor:
    """A1111's Restart on a model whose noise estimate at (x, sigma) is eps(x, sigma): Heun steps (Euler to 0), and
    before a step that starts above where the last ended, noise to bring the picture up there."""
    last = None
    for start, end in a1111_restart_steps(levels):
        if last is not None and last < start:
            x = x + next(draws) * (start ** 2 - last ** 2) ** 0.5
        slope = eps(x, start)
        if end == 0:
            x = x + slope * (end - start)
        else:
            probe = x + slope * (end - start)
            x = x + (slope + eps(probe, end)) / 2 * (end - start)
        last = end
    return x


def heun_levels(steps: int, shape: ScheduleShape = ScheduleShape()) -> torch.Tensor:
    """The schedule A1111 hands its sampler: Karras's levels (as our Heun lays them out), with the final 0."""
    heun = make_scheduler(SD15_SCHEDULER, "Heun", "Karras", shape=shape)
    heun.set_timesteps(steps)
    return torch.cat([heun.sigmas[:1], heun.sigmas[1::2]])


def run(scheduler: RestartScheduler, start: torch.Tensor, eps, noise_seed: int = 9,
        first: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Step the scheduler from model call `first` on (img2img's tail), as diffusers' pipelines do; the result and the
    levels of its model calls."""
    scheduler.set_begin_index(first)
    generator = torch.Generator().manual_seed(noise_seed)
    sample, levels = start.clone(), []
    for timestep in scheduler.timesteps[first:]:
        sigma = scheduler.sigmas[first if scheduler.step_index is None else scheduler.step_index].double()
        levels.append(float(sigma))
        sample = scheduler.step(eps(sample, sigma), timestep, sample, generator=generator).prev_sample
    return sample, levels


def model(seed: int = 5):
    weights = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda x, sigma: torch.tanh(x / (1 + sigma ** 2) ** 0.5 + weights)  # depends on its input and level


def draws(seed: int = 9):
    generator = torch.Generator().manual_seed(seed)
    return iter([torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64) for _ in range(4)])


@pytest.mark.parametrize("steps, restarts", [(12, 0), (25, 1), (40, 2)])
def test_restart_steps_as_a1111s_and_keeps_the_step_count(steps, restarts):
    scheduler = make_scheduler(SD15_SCHEDULER, "Restart")  # Automatic: Karras, as A1111's
    scheduler.set_timesteps(steps)
    eps = model()
    start = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 14.6
    ours, called = run(scheduler, start, eps)
    expected = a1111_restart(heun_levels(steps), start, eps, draws())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert len(called) == 2 * steps - 1  # two calls a step, one for the last: the steps asked for
    climbs = sum(1 for before, after in zip(called, called[1:]) if after > before * 1.5)
    assert climbs == restarts
    if restarts:  # the restarts go back up from about 0.1 to about 2
        assert max(level for level in called[len(called) // 2:]) == pytest.approx(2.0, rel=0.35)
        assert not torch.allclose(ours, a1111_restart(heun_levels(steps), start, eps, draws(10)), atol=1e-3)


def test_below_20_steps_restart_is_heun_on_karras():
    steps = 15
    restart, heun = (make_scheduler(SD15_SCHEDULER, sampler, "Karras") for sampler in ("Restart", "Heun"))
    for scheduler in (restart, heun):
        scheduler.set_timesteps(steps)
    assert torch.equal(restart.timesteps, heun.timesteps) and torch.equal(restart.sigmas, heun.sigmas)


def test_restart_takes_no_eta_or_sigma_noise_as_a1111s_and_draws_noise_for_ensd():
    """A1111 passes Restart none of its sampler parameters (its function is not in sampler_extra_params)."""
    assert StepOptions(s_noise=0.5, eta_ancestral=0.5, s_churn=2.0).followed("Restart") == {}
    assert draws_noise("Restart", StepOptions(), 20) and not draws_noise("Restart", StepOptions(), 19)  # no restart


def test_a_pass_over_the_schedules_tail_plans_its_restarts_over_that_tail():
    """img2img and the hires fix: A1111 hands Restart the tail's levels; diffusers starts from the tail's first call."""
    schedule, steps = 30, 24
    scheduler = make_scheduler(SD15_SCHEDULER, "Restart", pass_steps=steps)
    scheduler.set_timesteps(schedule)
    assert len(scheduler.timesteps) == 2 * schedule - 1  # where diffusers' img2img counts the tail from
    first = (schedule - steps) * scheduler.order
    tail = heun_levels(schedule)[schedule - steps:]
    eps = model()
    start = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * float(tail[0])
    ours, called = run(scheduler, start, eps, first=first)
    assert len(called) == 2 * steps - 1
    torch.testing.assert_close(ours, a1111_restart(tail, start, eps, draws()), rtol=1e-5, atol=1e-5)
    whole = make_scheduler(SD15_SCHEDULER, "Restart")
    whole.set_timesteps(schedule)
    assert not torch.equal(whole.sigmas[first:], scheduler.sigmas[first:])  # not the whole schedule's tail


def test_a_restart_after_the_last_step_runs_its_steps_to_0_as_euler():
    """With Schedule min sigma above 0.2 the level nearest 0.1 is the final 0: A1111 restarts after the last step, and
    its last restart step goes to 0 again (one model call)."""
    shape = ScheduleShape(sigma_min=0.5)
    scheduler = make_scheduler(SD15_SCHEDULER, "Restart", shape=shape)
    scheduler.set_timesteps(22)
    eps = model()
    start = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 14.6
    ours, called = run(scheduler, start, eps)
    assert len(called) == 2 * 22 - 2 and called.count(float(scheduler.sigmas[0])) == 1
    torch.testing.assert_close(ours, a1111_restart(heun_levels(22, shape), start, eps, draws()), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours).all()


# --- through the engine --------------------------------------------------------------------------------------------
QUICK = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 20, "seed": 11, "width": 64, "height": 64,
         "cfg_scale": 7.0, "sampler_name": "Restart"}


def pixels(engine, init_image=None, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields | ({"init_image": "0" * 40} if init_image else {})))
    return np.asarray(engine.generate(request, [request.seed], init_image=init_image)[0].image, dtype=np.int16)


def test_the_engine_runs_restart_reproducibly_and_its_noise_follows_ensd(engine):
    plain = pixels(engine)
    assert np.array_equal(pixels(engine), plain)
    assert not np.array_equal(pixels(engine, eta_noise_seed_delta=31337), plain)
    assert np.array_equal(pixels(engine, s_noise=0.5, eta_ancestral=0.5), plain)  # A1111's Restart takes neither
    heun = pixels(engine, steps=8, sampler_name="Heun", scheduler="Karras")
    assert np.array_equal(pixels(engine, steps=8), heun)  # below 20 steps: Heun, no noise drawn, ENSD changes nothing
    assert np.array_equal(pixels(engine, steps=8, eta_noise_seed_delta=31337), heun)


def test_img2img_plans_the_restarts_over_the_steps_it_runs(engine, monkeypatch):
    called = []
    step = RestartScheduler.step

    def recording(self, model_output, timestep, sample, *args, **kwargs):
        called.append(float(self.sigmas[self.step_index if self.step_index is not None else self.begin_index]))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(RestartScheduler, "step", recording)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    pixels(engine, init_image=picture, steps=30, denoising_strength=0.8)
    tail = 24 + 1  # A1111's int(30 x 0.8) + 1 steps of the 30
    levels = heun_levels(30)[30 - tail:]  # the embedded model's table is SD's
    expected = [float(start) for start, end in a1111_restart_steps(levels) for start in ((start, end) if end > 0
                                                                                          else (start,))]
    assert len(called) == len(expected) == 2 * tail - 1
    np.testing.assert_allclose(called, expected, rtol=1e-4)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("restart") / "outputs")


def test_the_infotext_and_the_api_name_restart(services):
    from tests.helpers import finished_job

    image = finished_job(services, QUICK | {"s_noise": 0.9, "eta_noise_seed_delta": 5}).images[0]
    assert "Sampler: Restart" in image.infotext and "Schedule type: Karras" in image.infotext
    assert "Sigma noise" not in image.infotext and "ENSD: 5" in image.infotext
    below = finished_job(services, QUICK | {"steps": 8, "eta_noise_seed_delta": 5}).images[0]
    assert "ENSD" not in below.infotext  # it drew no noise for ENSD to change
    pasted = request_fields_from_infotext(image.infotext)
    assert (pasted["sampler_name"], pasted["eta_noise_seed_delta"]) == ("Restart", 5)
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:
        listed = {item["name"]: item for item in client.get("/sdapi/v1/samplers").json()}
        made = client.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "steps": 20, "width": 64, "height": 64,
                                                       "seed": 3, "sampler_name": "restart"})
    assert listed["Restart"]["aliases"] == ["restart"] and listed["Restart"]["options"] == {"scheduler": "karras"}
    assert made.status_code == 200 and "Sampler: Restart" in made.json()["info"]
