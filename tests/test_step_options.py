"""A1111's eta and sigma options and its Eta noise seed delta (webui/engine/step_options.py), from a scheduler's step
through the engine, the infotext, the page and the API."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from tests.helpers import finished_job

from webui.engine.step_options import StepOptions, use_step_options
from webui.schemas import GenerationRequest, InvalidRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext

SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def denoise(scheduler, steps: int = 5, seeds=(1, 2), step_kwargs: dict | None = None,
            **options) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Latents after a few steps of a stand-in model that predicts a fixed share of its input as noise."""
    if options:
        use_step_options(scheduler, options.pop("sampler"), StepOptions(**options))
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = torch.randn(len(seeds), 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        prediction = 0.3 * scheduler.scale_model_input(latents, timestep) + 0.05
        latents = scheduler.step(prediction, timestep, latents, generator=generators, **(step_kwargs or {})).prev_sample
    return latents, generators


def test_euler_a_at_eta_1_is_diffusers_own_step_and_draws_the_same_noise():
    own, own_generators = denoise(EulerAncestralDiscreteScheduler(**SD_SCHEDULE))
    # eta 1 is the default, which installs nothing: ask for an eta a hair off to run ours
    ours, our_generators = denoise(EulerAncestralDiscreteScheduler(**SD_SCHEDULE), sampler="Euler a",
                                   eta_ancestral=1.0 - 1e-9)
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(own_generators, our_generators))


@pytest.mark.parametrize("schedule, eta", [("Karras", 1.0), ("Exponential", 0.5), ("Beta", 1.0)])
def test_euler_a_on_a_custom_schedule_steps_as_k_diffusions_euler_ancestral(schedule, eta):
    """A1111 runs Euler a on any schedule type (Euler a Karras is a common pick); diffusers' Euler a takes no custom
    sigmas, so ours runs on Euler's scheduler with the ancestral step: k-diffusion's sample_euler_ancestral here."""
    from tests.test_samplers import SD15_SCHEDULER
    from webui.engine.samplers import make_scheduler

    scheduler = make_scheduler(SD15_SCHEDULER, "Euler a", schedule)
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and scheduler.config.use_karras_sigmas
    ours, _ = denoise(scheduler, steps=6, sampler="Euler a", eta_ancestral=eta)

    sigmas = scheduler.sigmas.double()  # the schedule's levels (A1111's, as tested elsewhere), then 0
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    x = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma).double()
    for sigma, sigma_to in zip(sigmas[:-1], sigmas[1:]):
        epsilon = 0.3 * x / (sigma ** 2 + 1) ** 0.5 + 0.05  # the stand-in model of denoise()
        denoised = x - sigma * epsilon
        sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        noise = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in generators]).double()
        x = x + noise * sigma_up
    torch.testing.assert_close(ours, x.float(), atol=1e-4, rtol=1e-4)


def test_euler_a_at_eta_0_is_a_plain_euler():
    plain, _ = denoise(EulerDiscreteScheduler(**SD_SCHEDULE))
    eta_0, _ = denoise(EulerAncestralDiscreteScheduler(**SD_SCHEDULE), sampler="Euler a", eta_ancestral=0.0)
    torch.testing.assert_close(eta_0, plain, atol=1e-5, rtol=0)


def test_an_ancestral_step_with_eta_follows_k_diffusion():
    """One step worked out here by k-diffusion's formulas: down to sigma_down, then sigma_up of noise."""
    eta = 0.5
    scheduler = EulerAncestralDiscreteScheduler(**SD_SCHEDULE)
    use_step_options(scheduler, "Euler a", StepOptions(eta_ancestral=eta))
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    timestep = scheduler.timesteps[0]
    scheduler.scale_model_input(sample, timestep)
    epsilon = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    stepped = scheduler.step(epsilon, timestep, sample, generator=[torch.Generator().manual_seed(7)]).prev_sample

    sigma, sigma_to = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    sigma_up = eta * (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = sample + epsilon * (sigma_down - sigma) + noise * sigma_up  # epsilon is the slope
    torch.testing.assert_close(stepped, expected, atol=1e-4, rtol=1e-5)


def test_ddim_takes_its_eta_over_the_pipelines():
    # diffusers' pipeline passes eta=0 to every step itself
    deterministic, _ = denoise(DDIMScheduler(**SD_SCHEDULE), step_kwargs={"eta": 0.0})
    noisy, _ = denoise(DDIMScheduler(**SD_SCHEDULE), step_kwargs={"eta": 0.0}, sampler="DDIM", eta_ddim=0.7)
    assert not torch.allclose(noisy, deterministic, atol=1e-3)
    again, _ = denoise(DDIMScheduler(**SD_SCHEDULE), step_kwargs={"eta": 0.0}, sampler="DDIM", eta_ddim=0.7)
    assert torch.equal(again, noisy)


def test_only_the_samplers_that_follow_an_option_get_it():
    options = StepOptions(eta_ddim=0.3, eta_ancestral=0.5, s_churn=2.0, s_noise=0.9)
    assert options.followed("Euler a") == {"eta_ancestral": 0.5}  # A1111's Euler a takes no sigma noise
    assert options.followed("DDIM") == {"eta_ddim": 0.3}
    assert options.followed("Euler") == {"s_churn": 2.0, "s_noise": 0.9}
    assert options.followed("DPM++ 2M") == {}
    assert StepOptions().followed("Euler a") == {}  # defaults are left out


QUICK = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 4, "seed": 11, "width": 64, "height": 64,
         "cfg_scale": 7.0, "sampler_name": "Euler a"}


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    return np.asarray(engine.generate(request, [request.seed])[0].image, dtype=np.int16)


def test_the_engine_runs_euler_a_at_eta_0_as_euler(engine):
    assert np.abs(pixels(engine, eta_ancestral=0.0) - pixels(engine, sampler_name="Euler")).max() <= 1
    assert not np.array_equal(pixels(engine, eta_ancestral=0.5), pixels(engine))


def test_euler_churns_within_its_sigmas_only(engine):
    plain = pixels(engine, sampler_name="Euler")
    churned = pixels(engine, sampler_name="Euler", s_churn=20.0)
    assert not np.array_equal(churned, plain)
    assert np.array_equal(pixels(engine, sampler_name="Euler", s_churn=20.0), churned)  # the seed's noise
    # below every sigma of the schedule: no step churns
    assert np.array_equal(pixels(engine, sampler_name="Euler", s_churn=20.0, s_tmax=0.001), plain)
    # from sigma 10 up: the first step alone churns
    first = pixels(engine, sampler_name="Euler", s_churn=20.0, s_tmin=10.0)
    assert not np.array_equal(first, plain) and not np.array_equal(first, churned)


def test_ddim_eta_changes_the_picture_and_reproduces(engine):
    plain = pixels(engine, sampler_name="DDIM")
    noisy = pixels(engine, sampler_name="DDIM", eta_ddim=1.0)
    assert not np.array_equal(noisy, plain)
    assert np.array_equal(pixels(engine, sampler_name="DDIM", eta_ddim=1.0), noisy)


def test_ensd_changes_only_the_noise_drawn_as_the_sampler_steps(engine):
    plain, delta = pixels(engine), pixels(engine, eta_noise_seed_delta=31337)
    assert not np.array_equal(delta, plain)
    assert np.array_equal(pixels(engine, eta_noise_seed_delta=31337), delta)
    # a sampler that draws no noise as it steps: the same picture
    assert np.array_equal(pixels(engine, sampler_name="DPM++ 2M", eta_noise_seed_delta=31337),
                          pixels(engine, sampler_name="DPM++ 2M"))
    assert np.array_equal(pixels(engine, eta_ancestral=0.0, eta_noise_seed_delta=5), pixels(engine, eta_ancestral=0.0))


def test_dpmpp_2s_a_draws_fresh_noise_each_step_from_the_seed_or_seed_plus_delta(engine):
    """A1111's DPM++ 2S a is ancestral (uses_ensd): its step noise follows ENSD and the NV source as DPM2 a's."""
    plain = pixels(engine, sampler_name="DPM++ 2S a")
    assert np.array_equal(pixels(engine, sampler_name="DPM++ 2S a"), plain)
    assert not np.array_equal(pixels(engine, sampler_name="DPM++ 2S a", eta_noise_seed_delta=31337), plain)
    nv = pixels(engine, sampler_name="DPM++ 2S a", randn_source="NV")
    assert np.array_equal(pixels(engine, sampler_name="DPM++ 2S a", randn_source="NV"), nv)
    assert not np.array_equal(nv, plain)


@pytest.mark.parametrize("sampler", ["DPM2 a", "DPM++ 2S a"])
def test_dpm2_a_and_dpmpp_2s_a_follow_the_ancestral_eta_as_a1111s(engine, sampler):
    """Their levels move with eta; at 0 they add no noise, so ENSD changes nothing."""
    full = pixels(engine, sampler_name=sampler)
    half = pixels(engine, sampler_name=sampler, eta_ancestral=0.5)
    assert not np.array_equal(half, full)
    assert np.array_equal(pixels(engine, sampler_name=sampler, eta_ancestral=0.5), half)
    still = pixels(engine, sampler_name=sampler, eta_ancestral=0.0)
    assert np.array_equal(pixels(engine, sampler_name=sampler, eta_ancestral=0.0, eta_noise_seed_delta=7), still)
    request = parse_request(QUICK | {"sampler_name": sampler, "eta_ancestral": 0.5})
    assert StepOptions.of(request).followed(sampler) == {"eta_ancestral": 0.5}  # the infotext's Eta


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM2 a"])
def test_the_sde_samplers_and_dpm2_a_take_eta_and_sigma_noise_as_a1111s(engine, sampler):
    """A1111 hands them both (their k-diffusion functions take eta; its sampler_extra_params lists s_noise)."""
    plain = pixels(engine, sampler_name=sampler)
    for options in ({"eta_ancestral": 0.5}, {"s_noise": 0.5}):
        changed = pixels(engine, sampler_name=sampler, **options)
        assert not np.array_equal(changed, plain) and np.array_equal(pixels(engine, sampler_name=sampler, **options),
                                                                     changed)
    assert StepOptions(eta_ancestral=0.5, s_noise=0.9, s_churn=1.0).followed(sampler) == {"eta_ancestral": 0.5,
                                                                                         "s_noise": 0.9}


def test_ensd_is_the_ancestral_noise_of_seed_plus_delta(engine, monkeypatch):
    """With ENSD, the start noise is the seed's and the steps' noise that of seed + delta: drawn from a generator of
    that seed, it is what a run of seed + delta would draw after its start noise."""
    drawn = []
    import webui.engine.step_options as step_options

    def recording(like, generator):
        drawn.append(generator[0].initial_seed())
        return original(like, generator)

    original = step_options._draw
    monkeypatch.setattr(step_options, "_draw", recording)
    pixels(engine, eta_ancestral=0.5, eta_noise_seed_delta=100)
    assert drawn and set(drawn) == {QUICK["seed"] + 100}


@pytest.mark.parametrize("fields, problem", [({"eta_ddim": 1.5}, "eta_ddim"), ({"eta_ancestral": -0.1}, "eta_ancestral"),
                                             ({"s_churn": 101}, "s_churn"), ({"s_noise": 2}, "s_noise"),
                                             ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta")])
def test_values_out_of_range_are_refused_by_name(fields, problem):
    with pytest.raises(InvalidRequest, match=problem):
        parse_request(QUICK | fields)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("steps") / "outputs")


def test_the_infotext_records_what_the_sampler_followed_and_a_paste_puts_it_back(services):
    infotext = finished_job(services, QUICK | {"eta_ancestral": 0.5, "eta_ddim": 0.3,
                                               "eta_noise_seed_delta": 31337}).images[0].infotext
    assert "Eta: 0.5" in infotext and "ENSD: 31337" in infotext and "Eta DDIM" not in infotext
    pasted = request_fields_from_infotext(infotext)
    assert (pasted["eta_ancestral"], pasted["eta_noise_seed_delta"], pasted["eta_ddim"]) == (0.5, 31337, 0.0)
    deterministic = finished_job(services, QUICK | {"sampler_name": "DPM++ 2M", "eta_ancestral": 0.5,
                                                    "eta_noise_seed_delta": 31337}).images[0].infotext
    assert "Eta" not in deterministic and "ENSD" not in deterministic
    churned = finished_job(services, QUICK | {"sampler_name": "Euler", "s_churn": 1.5, "s_tmax": 10.0}).images[0]
    assert "Sigma churn: 1.5" in churned.infotext and "Sigma tmax: 10," in churned.infotext
    pasted = request_fields_from_infotext(churned.infotext)
    assert (pasted["s_churn"], pasted["s_tmax"], pasted["eta_ancestral"], pasted["eta_noise_seed_delta"]) == (
        1.5, 10.0, 1.0, 0)  # the keys left out are the defaults again


def test_the_api_takes_a1111s_fields_overrides_and_infotext(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler a"}
    with TestClient(create_api_app(services)) as client:
        eta = client.post("/sdapi/v1/txt2img", json=body | {"eta": 0.25, "override_settings": {
            "eta_noise_seed_delta": 31337}})
        ddim = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "DDIM", "eta": 0.25})
        euler = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "Euler", "s_churn": 3, "override_settings": {
            "s_noise": 0.5}})
        pasted = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 2, Sampler: Euler a, Seed: 4, "
                                                                   "Size: 64x64, Eta: 0.75, ENSD: 7"})
        bad = client.post("/sdapi/v1/txt2img", json=body | {"eta": 2})
        bad_override = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"s_tmin": -1}})
    assert eta.status_code == 200, eta.text[:300]
    assert "Eta: 0.25" in eta.json()["info"] and "ENSD: 31337" in eta.json()["info"]
    assert "Eta DDIM: 0.25" in ddim.json()["info"]
    assert "Sigma churn: 3" in euler.json()["info"] and "Sigma noise: 0.5" in euler.json()["info"]
    assert "Eta: 0.75" in pasted.json()["info"] and "ENSD: 7" in pasted.json()["info"], pasted.text[:300]
    assert bad.status_code == 422 and "eta:" in bad.json()["detail"], bad.text
    assert bad_override.status_code == 422 and "override_settings.s_tmin:" in bad_override.json()["detail"]


def test_the_tabs_have_the_controls_and_the_plot_the_axes(services):
    from webui.ui.blocks import create_ui
    from webui.xyz_plot import plan, read_axis

    ui = create_ui(services)
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        for name in ("eta_ddim", "eta_ancestral", "s_churn", "s_tmin", "s_tmax", "s_noise", "eta_noise_seed_delta"):
            assert tab.widgets[name].elem_id == f"{kind}_{name}"
            assert name in tab.field_names
    axes = [read_axis("X", "Eta", "0, 0.5"), read_axis("Y", "Sigma Churn", "1"), read_axis("Z", "Nothing", "")]
    cells = plan(QUICK, axes).cells
    assert [(cell.request["eta_ddim"], cell.request["eta_ancestral"]) for cell in cells] == [(0.0, 0.0), (0.5, 0.5)]
    assert {cell.request["s_churn"] for cell in cells} == {1.0}


def test_post_options_sets_them_for_api_requests_that_give_none(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler a"}
    with TestClient(create_api_app(services)) as client:
        assert client.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 0
        refused = client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": -5, "eta_ancestral": 0.5})
        unchanged = client.get("/sdapi/v1/options").json()
        applied = client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337, "eta_ancestral": 0.5})
        options = client.get("/sdapi/v1/options").json()
        by_option = client.post("/sdapi/v1/txt2img", json=body)
        own = client.post("/sdapi/v1/txt2img", json=body | {"eta": 0.25, "override_settings": {
            "eta_noise_seed_delta": 0}})
        pasted = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 2, Sampler: Euler a, Seed: 4, "
                                                                   "Size: 64x64, Eta: 0.75"})
    assert refused.status_code == 422 and "eta_noise_seed_delta" in refused.json()["detail"]
    assert (unchanged["eta_noise_seed_delta"], unchanged["eta_ancestral"]) == (0, 1.0)  # nothing changed
    assert applied.status_code == 200 and {"eta_noise_seed_delta", "eta_ancestral"} <= set(applied.json()["applied"])
    assert (options["eta_noise_seed_delta"], options["eta_ancestral"]) == (31337, 0.5)
    assert "ENSD: 31337" in by_option.json()["info"] and "Eta: 0.5" in by_option.json()["info"]
    assert "ENSD" not in own.json()["info"] and "Eta: 0.25" in own.json()["info"]
    # as A1111: an infotext's keys override the options, and the options stand for the keys it lacks
    assert "Eta: 0.75" in pasted.json()["info"] and "ENSD: 31337" in pasted.json()["info"]


def test_the_api_warns_when_the_sampler_here_cannot_follow_what_a1111s_would(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
    with TestClient(create_api_app(services)) as client:
        sde = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "DPM++ 2M SDE", "eta": 0.5})
        heun = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "Heun", "s_churn": 1})
        followed = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "Euler a", "eta": 0.5})
        plain = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "DPM++ 2M", "eta": 0.5})
    infos = [json.loads(response.json()["info"]) for response in (sde, heun, followed, plain)]
    assert not infos[0]["warnings"] and "Eta: 0.5" in infos[0]["infotexts"][0]  # A1111's SDE samplers take eta, ours too
    assert any("s_churn: Heun here takes no s_churn" in warning for warning in infos[1]["warnings"])
    assert not infos[2]["warnings"] and not infos[3]["warnings"]  # A1111's DPM++ 2M takes no eta either


def test_the_engine_runs_euler_a_on_karras_with_its_noise_from_the_seed(engine):
    karras = pixels(engine, scheduler="Karras")
    assert np.array_equal(pixels(engine, scheduler="Karras"), karras)  # reproduces
    assert not np.array_equal(karras, pixels(engine))  # not its Automatic schedule
    assert not np.array_equal(karras, pixels(engine, sampler_name="Euler", scheduler="Karras"))  # nor Euler's step
    assert not np.array_equal(pixels(engine, scheduler="Karras", eta_noise_seed_delta=31337), karras)  # ENSD's noise
    nv = pixels(engine, scheduler="Karras", randn_source="NV")
    assert np.array_equal(pixels(engine, scheduler="Karras", randn_source="NV"), nv) and not np.array_equal(nv, karras)
    # eta 0: no noise, Euler's step on the same schedule
    assert np.abs(pixels(engine, scheduler="Karras", eta_ancestral=0.0)
                  - pixels(engine, sampler_name="Euler", scheduler="Karras")).max() <= 1
