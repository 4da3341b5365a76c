"""A1111's Always discard next-to-last sigma (and DPM2's own discard), Noise schedule for sampling (Zero Terminal
SNR) and the Compatibility options Use old karras scheduler sigmas and Downcast model alphas_cumprod to fp16: the
schedules against A1111's formulas, and the options through the engine, the infotext, the API, the X/Y/Z plot and the
page."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from diffusers import UNet2DConditionModel
from fastapi.testclient import TestClient

from tests.helpers import api_infotext, finished_job
from tests.test_samplers import (SD15_SCHEDULER, a1111_exponential, a1111_karras, a1111_uniform, log_linear_sigma,
                                 sd15_sigmas)
from webui.api import create_api_app
from webui.engine.samplers import ScheduleShape, make_scheduler
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext
from webui.xyz_plot import AXIS_TYPES

QUICK = {"prompt": "a red apple", "steps": 3, "seed": 21, "width": 64, "height": 64, "save_images": False}
DISCARD = ScheduleShape(discard_penultimate=True)
ZERO_SNR = ScheduleShape(noise_schedule="Zero Terminal SNR")


def a1111_discarded(formula, steps: int) -> torch.Tensor:
    """A1111's get_sigmas with the discard: the schedule of steps + 1, then its last level before the 0 left out."""
    return formula(steps + 1, sd15_sigmas())[:-1]


def a1111_sgm_uniform(steps, table):  # sd_schedulers.sgm_uniform: steps timesteps of steps + 1 from 999 towards 0
    return log_linear_sigma(table, torch.linspace(len(table) - 1, 0, steps + 1, dtype=torch.float64)[:-1])


def sigmas_of(sampler: str, schedule: str, steps: int, shape: ScheduleShape = DISCARD) -> torch.Tensor:
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, schedule, shape=shape)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


@pytest.mark.parametrize("sampler, schedule, formula", [
    ("Euler", "Karras", a1111_karras), ("DPM++ 2M", "Karras", a1111_karras), ("LMS", "Uniform", a1111_uniform),
    ("Euler", "Automatic", a1111_uniform),  # A1111's Automatic for Euler is k-diffusion's own (uniform) schedule
    ("DPM++ 2M", "SGM Uniform", a1111_sgm_uniform)])
@pytest.mark.parametrize("steps", [20, 7])
def test_the_discard_runs_a1111s_schedule_of_one_step_more_without_its_next_to_last_level(sampler, schedule, formula,
                                                                                         steps):
    ours = sigmas_of(sampler, schedule, steps)
    expected = a1111_discarded(formula, steps)
    assert len(ours) == steps + 1 and float(ours[-1]) == 0, ours
    torch.testing.assert_close(ours[:-1], expected, rtol=1e-3, atol=0)
    assert not torch.allclose(sigmas_of(sampler, schedule, steps, ScheduleShape())[:-1], expected, rtol=1e-3)


def test_a_second_order_sampler_keeps_its_midpoints_around_the_discarded_schedule():
    ours = sigmas_of("Heun", "Karras", 10)
    expected = a1111_discarded(a1111_karras, 10)
    for level in expected:  # Heun repeats each level but the first for its second model call
        assert torch.isclose(ours, level, rtol=1e-3).any(), float(level)
    assert not torch.isclose(ours, a1111_karras(11, sd15_sigmas())[-1], rtol=1e-3).any()  # the discarded level


def test_euler_a_discards_from_the_schedule_euler_does():
    """Euler a's Automatic schedule is Euler's (uniform); discarding, it runs A1111's uniform levels of one step
    more without the next-to-last, on Euler's scheduler with the ancestral step, as Euler does."""
    euler_a, euler = (make_scheduler(SD15_SCHEDULER, name, shape=DISCARD) for name in ("Euler a", "Euler"))
    for scheduler in (euler_a, euler):
        scheduler.set_timesteps(10)
    assert type(euler_a).__name__ == "EulerDiscreteScheduler" and len(euler_a.timesteps) == 10
    assert torch.equal(euler_a.sigmas, euler.sigmas) and torch.equal(euler_a.timesteps, euler.timesteps)
    plain = make_scheduler(SD15_SCHEDULER, "Euler a")
    plain.set_timesteps(11)
    torch.testing.assert_close(euler_a.sigmas, torch.cat([plain.sigmas[:-2], plain.sigmas[-1:]]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sampler", ["DPM2", "DPM2 a", "DPM++ 3M SDE"])
def test_dpm2_and_dpmpp_3m_sde_discard_whatever_the_option_says_as_in_a1111(sampler):
    """A1111's sampler table discards for them; the option changes nothing, so A1111 writes no infotext key."""
    assert torch.equal(sigmas_of(sampler, "Karras", 12, ScheduleShape()), sigmas_of(sampler, "Karras", 12))
    torch.testing.assert_close(sigmas_of(sampler, "Exponential", 12, ScheduleShape())[:1], torch.tensor(
        [float(sd15_sigmas()[-1])], dtype=torch.float64), rtol=1e-3, atol=0)
    assert not GenerationRequest(prompt="", sampler_name=sampler,
                                 always_discard_next_to_last_sigma=True).discard_changes_a_pass


@pytest.mark.parametrize("sampler", ["DDIM", "UniPC", "PLMS", "LCM"])
def test_samplers_that_are_not_k_diffusions_ignore_it_but_ddim_and_plms_on_a1111s_timesteps(sampler):
    """DDIM and PLMS take it on A1111's timesteps alone (a pass's own calls: tests/test_samplers.py), not on a
    schedule diffusers lays out (no pass given, another Schedule type)."""
    plain, asked = (make_scheduler(SD15_SCHEDULER, sampler, shape=shape) for shape in (ScheduleShape(), DISCARD))
    plain.set_timesteps(8)
    asked.set_timesteps(8)
    assert torch.equal(plain.timesteps, asked.timesteps)
    for img2img in (None, "0" * 40):  # txt2img, img2img (a picture's sha1)
        assert GenerationRequest(prompt="", sampler_name=sampler, init_image=img2img,
                                 always_discard_next_to_last_sigma=True
                                 ).discard_changes_a_pass == (sampler in ("DDIM", "PLMS"))
    if sampler != "LCM":  # (LCM takes Automatic alone)
        assert not GenerationRequest(prompt="", sampler_name=sampler, scheduler="SGM Uniform",
                                     always_discard_next_to_last_sigma=True).discard_changes_a_pass


def test_the_request_says_whether_the_option_changed_a_pass():
    def changed(**fields) -> bool:
        return GenerationRequest(prompt="", **fields).discard_changes_a_pass

    assert not changed(sampler_name="Euler")
    assert changed(sampler_name="Euler", always_discard_next_to_last_sigma=True)
    assert not changed(sampler_name="Euler", enable_hr=True, hr_sampler_name="DPM2")  # DPM2's own discard
    assert changed(sampler_name="DPM2", enable_hr=True, hr_sampler_name="Euler", always_discard_next_to_last_sigma=True)
    assert changed(sampler_name="DDIM", enable_hr=True, always_discard_next_to_last_sigma=True)  # its first pass
    assert changed(sampler_name="UniPC", enable_hr=True, hr_sampler_name="DDIM",
                   always_discard_next_to_last_sigma=True)  # the hires pass's, on A1111's timesteps too
    assert not changed(sampler_name="UniPC", enable_hr=True, hr_sampler_name="LCM", always_discard_next_to_last_sigma=True)


def a1111_zero_snr_alpha_bars() -> torch.Tensor:
    """sd_models.rescale_zero_terminal_snr_abar on SD's alpha bars."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bars = root ** 2
    alpha_bars[-1] = 4.8973451890853435e-08
    return alpha_bars


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "LMS", "DDIM", "UniPC", "DPM2", "LCM"])
def test_zero_terminal_snr_gives_every_sampler_a1111s_rescaled_noise_levels(sampler):
    scheduler = make_scheduler(SD15_SCHEDULER, sampler, shape=ZERO_SNR)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), a1111_zero_snr_alpha_bars(), rtol=2e-4, atol=0)
    default = make_scheduler(SD15_SCHEDULER, sampler)
    assert float(default.alphas_cumprod[-1]) == pytest.approx(0.0047, rel=0.01)  # SD's own: sigma 14.6


def test_zero_terminal_snr_starts_karras_at_its_largest_sigma():
    expected = math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08)  # 4518.8
    assert float(sigmas_of("Euler", "Karras", 10, ZERO_SNR)[0]) == pytest.approx(expected, rel=1e-3)


def test_a_schedule_range_is_checked_against_the_noise_schedule_it_runs_on(services):
    from webui.schemas import InvalidRequest

    high = QUICK | {"sampler_name": "Euler", "scheduler": "Karras", "sigma_min": 20}  # above SD's largest, 14.6
    with pytest.raises(InvalidRequest, match="sigma_min: 20 is not below this model's largest sigma 14.6"):
        services.worker.check(high)
    assert services.worker.check(high | {"sd_noise_schedule": "Zero Terminal SNR"}).sigma_min == 20  # below 4519


@pytest.fixture
def unet_calls(monkeypatch):
    """(sample, timestep) of every UNet call from now on."""
    seen, real = [], UNet2DConditionModel.forward

    def forward(self, sample, timestep, *args, **kwargs):
        seen.append((sample.detach().clone(), float(timestep.flatten()[0]) if torch.is_tensor(timestep) else timestep))
        return real(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return seen


def draw(engine, **fields):
    return engine.generate(GenerationRequest(**QUICK | fields), [21])


def test_a_discarding_run_has_the_steps_asked_on_other_timesteps(engine, unet_calls):
    draw(engine, sampler_name="Euler", scheduler="Karras")
    plain = [timestep for _, timestep in unet_calls]
    unet_calls.clear()
    draw(engine, sampler_name="Euler", scheduler="Karras", always_discard_next_to_last_sigma=True)
    discarding = [timestep for _, timestep in unet_calls]
    assert len(discarding) == len(plain) == 3 and discarding[0] == plain[0] == 999
    assert discarding[1:] != plain[1:]


def test_a_zero_terminal_snr_run_starts_from_its_larger_sigma(engine, unet_calls):
    """Euler gives the UNet sigma0 x noise over sqrt(sigma0² + 1): 0.9977 of the noise at SD's sigma0, all of it
    (to 1e-8) at the rescaled one."""
    draw(engine, sampler_name="Euler")
    plain = unet_calls[0][0]
    unet_calls.clear()
    draw(engine, sampler_name="Euler", sd_noise_schedule="Zero Terminal SNR")
    rescaled = unet_calls[0][0]
    default_sigma = float(sd15_sigmas()[-1])
    zero_snr_sigma = math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08)

    def kept(sigma):
        return sigma / math.sqrt(sigma ** 2 + 1)

    torch.testing.assert_close(rescaled, plain * (kept(zero_snr_sigma) / kept(default_sigma)), rtol=1e-4, atol=1e-5)
    assert unet_calls[0][1] == 999


def test_the_infotext_says_so_and_a_paste_reads_it_back(services):
    text = finished_job(services, QUICK | {"sampler_name": "Euler", "always_discard_next_to_last_sigma": True,
                                           "sd_noise_schedule": "Zero Terminal SNR"}).images[0].infotext
    assert ", Discard penultimate sigma: True," in text and ", Noise Schedule: Zero Terminal SNR," in text
    pasted = request_fields_from_infotext(text)
    assert pasted["always_discard_next_to_last_sigma"] is True and pasted["sd_noise_schedule"] == "Zero Terminal SNR"
    plain = finished_job(services, QUICK | {"sampler_name": "Euler"}).images[0].infotext
    assert "Discard penultimate sigma" not in plain and "Noise Schedule" not in plain
    pasted = request_fields_from_infotext(plain)
    assert pasted["always_discard_next_to_last_sigma"] is False and pasted["sd_noise_schedule"] == "Default"
    dpm2 = finished_job(services, QUICK | {"sampler_name": "DPM2", "always_discard_next_to_last_sigma": True})
    assert "Discard penultimate sigma" not in dpm2.images[0].infotext  # its own discard: A1111 writes no key
    odd = request_fields_from_infotext("x\nSteps: 3, Sampler: Euler, Noise Schedule: Cosine")
    assert odd["sd_noise_schedule"] == "Default"  # a value this server lacks is skipped


def test_the_api_takes_them_by_override_settings_options_and_infotext(services):
    body = QUICK | {"sampler_name": "Euler"}
    with TestClient(create_api_app(services)) as client:
        infotext = partial(api_infotext, client, body)
        assert "Discard penultimate sigma" not in infotext()
        on = infotext(override_settings={"always_discard_next_to_last_sigma": True})
        assert "Discard penultimate sigma: True" in on
        assert "Discard penultimate sigma: True" in infotext(infotext=on)
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sd_noise_schedule": "Cosine"}})
        assert refused.status_code == 422 and "override_settings.sd_noise_schedule" in refused.text
        assert client.post("/sdapi/v1/options", json={"sd_noise_schedule": "Zero Terminal SNR"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_noise_schedule"] == "Zero Terminal SNR"
        assert "Noise Schedule: Zero Terminal SNR" in infotext()
        assert "Noise Schedule" not in infotext(override_settings={"sd_noise_schedule": "Default"})


def test_the_xyz_plot_has_a1111s_discard_axis():
    request = {}
    AXIS_TYPES["Always discard next-to-last sigma"].apply(request, "True")
    assert request == {"always_discard_next_to_last_sigma": True}


def test_both_pages_have_the_controls_and_send_them(services):
    from webui.ui.blocks import create_ui
    from webui.ui.session import Session

    ui = create_ui(services)
    for tab in (ui.txt2img, ui.img2img):
        assert tab.widgets["always_discard_next_to_last_sigma"].label == "Always discard next-to-last sigma"
        assert tab.widgets["sd_noise_schedule"].choices == [("Default", "Default"),
                                                            ("Zero Terminal SNR", "Zero Terminal SNR")]
    fields = {name: value for name, value in QUICK.items() if name != "save_images"}
    outputs = list(ui.txt2img.actions.generate(Session(), **fields, sampler_name="Euler",
                                               always_discard_next_to_last_sigma=True,
                                               sd_noise_schedule="Zero Terminal SNR"))
    assert "Discard penultimate sigma: True" in outputs[-1][4] and "Noise Schedule: Zero Terminal SNR" in outputs[-1][4]


# A1111's Compatibility options Use old karras scheduler sigmas and Downcast model alphas_cumprod to fp16
OLD_KARRAS = ScheduleShape(old_karras_sigmas=True)
DOWNCAST = ScheduleShape(downcast_alpha_bar=True)


def old_range_table() -> torch.Tensor:
    """A table whose ends are A1111's old Karras range, for the formulas that read a table's ends."""
    return torch.tensor([0.1, 10.0], dtype=torch.float64)


@pytest.mark.parametrize("schedule, formula", [("Karras", a1111_karras), ("Exponential", a1111_exponential)])
def test_old_karras_sigmas_run_the_range_schedules_from_10_to_0_1(schedule, formula):
    """As A1111 1.10's get_sigmas: the option sets the default ends of every schedule that takes them."""
    ours = sigmas_of("Euler", schedule, 12, OLD_KARRAS)
    torch.testing.assert_close(ours[:-1], formula(12, old_range_table()), rtol=1e-4, atol=0)
    assert float(sigmas_of("Euler", schedule, 12, ScheduleShape())[0]) == pytest.approx(14.61, rel=1e-3)


def test_old_karras_sigmas_leave_a_set_end_and_the_table_schedules_alone():
    half_set = sigmas_of("Euler", "Karras", 12, ScheduleShape(sigma_min=0.5, old_karras_sigmas=True))
    torch.testing.assert_close(half_set[:-1], a1111_karras(12, torch.tensor([0.5, 10.0], dtype=torch.float64)),
                               rtol=1e-4, atol=0)
    for sampler, schedule in (("Euler", "Uniform"), ("Euler", "Automatic"), ("DPM++ 2M", "Align Your Steps")):
        plain = sigmas_of(sampler, schedule, 9, ScheduleShape())
        assert torch.equal(sigmas_of(sampler, schedule, 9, OLD_KARRAS), plain)


def test_old_karras_sigmas_check_a_lone_end_against_their_range():
    assert OLD_KARRAS.range_problem(sd15_sigmas().numpy()) is None
    problem = ScheduleShape(sigma_min=12, old_karras_sigmas=True).range_problem(sd15_sigmas().numpy())
    assert problem == "sigma_min: 12 is not below the old Karras range's largest sigma 10; lower it (0: 0.1 to 10)"
    assert ScheduleShape(sigma_min=12).range_problem(sd15_sigmas().numpy()) is None  # below the model's 14.6


def sd15_alpha_bars() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM", "UniPC"])
def test_downcast_rounds_the_models_alpha_bars_to_fp16_as_a1111(sampler):
    """sd_models.apply_alpha_schedule_override: alphas_cumprod.half(), from the model's float32 buffer."""
    downcast = make_scheduler(SD15_SCHEDULER, sampler, shape=DOWNCAST).alphas_cumprod.double()
    expected = sd15_alpha_bars().float().half().double()
    torch.testing.assert_close(downcast, expected, rtol=2e-6, atol=0)
    plain = make_scheduler(SD15_SCHEDULER, sampler).alphas_cumprod.double()
    assert not torch.allclose(plain, expected, rtol=1e-4, atol=0)  # the rounding shows


def test_downcast_comes_before_the_zero_terminal_snr_rescale_which_runs_in_fp16_then():
    """sd_models.rescale_zero_terminal_snr_abar on the half alphas_cumprod, in its order of operations: its last
    alpha bar rounds to 2^-24, a largest sigma of 4096 rather than 4519."""
    both = make_scheduler(SD15_SCHEDULER, "Euler", shape=ScheduleShape(noise_schedule="Zero Terminal SNR",
                                                                       downcast_alpha_bar=True))
    root = sd15_alpha_bars().float().half().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    expected = root ** 2
    expected[-1] = 4.8973451890853435e-08
    torch.testing.assert_close(both.alphas_cumprod.double(), expected.double(), rtol=2e-4, atol=0)
    assert float(both.alphas_cumprod[-1]) == pytest.approx(2 ** -24, rel=1e-3)
    assert not torch.allclose(both.alphas_cumprod.double()[:-1], a1111_zero_snr_alpha_bars()[:-1], rtol=2e-5, atol=0)


def test_downcast_keeps_a_models_own_zero_terminal_snr():
    config = SD15_SCHEDULER | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    own = make_scheduler(config, "Euler").alphas_cumprod
    downcast = make_scheduler(config, "Euler", shape=DOWNCAST).alphas_cumprod
    assert float(own[-1]) < 1e-6 and float(downcast[-1]) < 1e-6  # not SD's 0.0047
    assert not torch.equal(own, downcast)


def test_the_infotext_records_them_so_a_paste_makes_the_same_picture(services):
    karras = QUICK | {"sampler_name": "Euler", "scheduler": "Karras"}
    old = finished_job(services, karras | {"use_old_karras_scheduler_sigmas": True}).images[0]
    assert ", Schedule min sigma: 0.1, Schedule max sigma: 10," in old.infotext  # A1111 writes nothing
    pasted = request_fields_from_infotext(old.infotext)
    assert (pasted["sigma_min"], pasted["sigma_max"], pasted["use_old_karras_scheduler_sigmas"]) == (0.1, 10.0, False)
    again = finished_job(services, karras | {"sigma_min": pasted["sigma_min"], "sigma_max": pasted["sigma_max"]})
    assert again.images[0].image.tobytes() == old.image.tobytes()
    assert finished_job(services, karras).images[0].image.tobytes() != old.image.tobytes()
    uniform = finished_job(services, QUICK | {"sampler_name": "Euler", "use_old_karras_scheduler_sigmas": True})
    assert "Schedule m" not in uniform.images[0].infotext  # its schedule reads no range

    downcast = finished_job(services, karras | {"use_downcasted_alpha_bar": True}).images[0].infotext
    assert ", Downcast alphas_cumprod: True" in downcast
    assert request_fields_from_infotext(downcast)["use_downcasted_alpha_bar"] is True
    assert request_fields_from_infotext(old.infotext)["use_downcasted_alpha_bar"] is False


def test_the_api_takes_them_by_override_settings_options_and_infotext_too(services):
    body = QUICK | {"sampler_name": "Euler", "scheduler": "Karras"}
    with TestClient(create_api_app(services)) as client:
        infotext = partial(api_infotext, client, body)
        assert "Schedule max sigma" not in infotext() and "Downcast" not in infotext()
        assert "Schedule max sigma: 10" in infotext(override_settings={"use_old_karras_scheduler_sigmas": True})
        downcast = infotext(override_settings={"use_downcasted_alpha_bar": True})
        assert "Downcast alphas_cumprod: True" in downcast
        assert "Downcast alphas_cumprod: True" in infotext(infotext=downcast)
        old_a1111 = "a red apple\nSteps: 3, Sampler: Euler, Seed: 21, Size: 64x64, Version: v1.6.0"
        assert "Downcast alphas_cumprod: True" in infotext(infotext=old_a1111)  # its backward compatibility
        assert client.post("/sdapi/v1/options", json={"use_downcasted_alpha_bar": True}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["use_downcasted_alpha_bar"] is True
        assert "Downcast alphas_cumprod: True" in infotext()
        assert "Downcast" not in infotext(override_settings={"use_downcasted_alpha_bar": False})
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {
            "use_old_karras_scheduler_sigmas": True, "sigma_min": 11}})
        assert refused.status_code == 422 and "old Karras range" in refused.text
        assert client.post("/sdapi/v1/options", json={"use_downcasted_alpha_bar": False}).status_code == 200


def test_both_pages_have_the_compatibility_boxes_and_send_them(services):
    from webui.ui.blocks import create_ui
    from webui.ui.session import Session

    ui = create_ui(services)
    for tab in (ui.txt2img, ui.img2img):
        assert tab.widgets["use_old_karras_scheduler_sigmas"].label == "Use old karras scheduler sigmas (0.1 to 10)"
        assert tab.widgets["use_downcasted_alpha_bar"].value is False
    fields = {name: value for name, value in QUICK.items() if name != "save_images"}
    outputs = list(ui.txt2img.actions.generate(Session(), **fields, sampler_name="Euler", scheduler="Karras",
                                               use_old_karras_scheduler_sigmas=True, use_downcasted_alpha_bar=True))
    assert "Schedule min sigma: 0.1" in outputs[-1][4] and "Downcast alphas_cumprod: True" in outputs[-1][4]


@pytest.mark.parametrize("version, old_timelines, downcast", [
    ("v1.5.1", True, True), ("v1.6.0", False, True), ("v1.7.0-RC-58-gabc123", False, True), ("v1.7.0", False, True),
    ("v1.8.0", False, False), ("v1.10.1", False, False),
    ("f2.0.1v1.10.1-previous-669-gdfdcbab6", False, False),  # Forge's: no A1111 version to read
    ("diffusers-webui 0.1.0", False, False)])  # ours writes what it did
def test_an_older_a1111s_infotext_implies_how_it_made_the_picture(version, old_timelines, downcast):
    """A1111's Automatic backward compatibility (infotext_versions.backcompat)."""
    fields = request_fields_from_infotext(f"a [cat:dog:1.0]\nSteps: 20, Sampler: Euler, Seed: 1, Version: {version}")
    assert (fields.get("use_old_scheduling", False), fields["use_downcasted_alpha_bar"]) == (old_timelines, downcast)
    assert ("use_old_scheduling" in fields["recorded_settings"]) == old_timelines  # offered as an override
    plain = request_fields_from_infotext(f"a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: {version}")
    assert "use_old_scheduling" not in plain  # no brackets: no timelines to change, the Settings tab's stands
    refined = request_fields_from_infotext(f"a cat\nSteps: 20, Seed: 1, Refiner: xl-refiner, Version: {version}")
    assert refined.get("refiner_switch_by_sample_steps", False) == (version in ("v1.5.1", "v1.6.0", "v1.7.0",
                                                                                "v1.7.0-RC-58-gabc123"))
    assert "refiner_switch_by_sample_steps" not in plain  # no refiner, nothing implied
    written = request_fields_from_infotext(f"a [cat:dog:1.0]\nSteps: 20, Seed: 1, Downcast alphas_cumprod: False, "
                                           f"Version: {version}")
    assert written["use_downcasted_alpha_bar"] is False  # a key written wins
    from webui.storage.infotext import parse_infotext
    from webui.ui.pnginfo import parameters_table

    text = f"a [cat:dog:1.0]\nSteps: 20, Sampler: Euler, Seed: 1, Version: {version}"
    assert ("Downcast alphas_cumprod" in parse_infotext(text)[2]) == downcast  # as A1111's parse, for the API
    assert "Downcast" not in parameters_table(text)  # PNG Info shows what the file says


def test_a_downcast_models_sigma_table_is_worked_out_in_fp16_as_a1111s():
    """k-diffusion's ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 on A1111's half alpha bars: its ends, 0.03125
    and 14.609375, start and end Karras."""
    half = sd15_alpha_bars().float().half()
    table = ((1 - half) / half) ** 0.5
    karras = sigmas_of("Euler", "Karras", 6, DOWNCAST)
    assert (float(table[0]), float(table[-1])) == (0.03125, 14.609375)
    assert float(karras[0]) == pytest.approx(14.609375, rel=1e-6)
    assert float(karras[-2]) == pytest.approx(0.03125, rel=1e-6)
    both = ScheduleShape(noise_schedule="Zero Terminal SNR", downcast_alpha_bar=True)
    zero_snr = sigmas_of("Euler", "Karras", 6, both)
    assert float(zero_snr[0]) == pytest.approx(4096, rel=1e-4)  # not fp16's infinity
