"""The Beta schedule type's alpha and beta (A1111's beta_dist_alpha, beta_dist_beta options): the sigmas they give,
and the request fields through the engine, the infotext, the page and the API."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from tests.helpers import finished_job

from webui.engine.samplers import ScheduleShape, make_scheduler
from webui.schemas import GenerationRequest, InvalidRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext

SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
QUICK = {"prompt": "a lighthouse", "steps": 4, "seed": 11, "width": 64, "height": 64, "sampler_name": "Euler",
         "scheduler": "Beta"}


@pytest.mark.parametrize("alpha, beta", [(0.6, 0.6), (0.2, 0.9), (1.0, 0.05)])
def test_the_sigmas_follow_the_beta_distribution_of_that_shape(alpha, beta):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    low, high = ((1 - alphas_cumprod[[0, -1]]) / alphas_cumprod[[0, -1]]) ** 0.5
    steps = 9
    expected = low + scipy.stats.beta.ppf(np.linspace(1, 0, steps), alpha, beta) * (high - low)
    scheduler = make_scheduler(SD_SCHEDULE, "DPM++ 2M", "Beta", shape=ScheduleShape(alpha, beta))
    scheduler.set_timesteps(steps)
    assert np.allclose(scheduler.sigmas.numpy()[:-1], expected, rtol=1e-3)


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    return np.asarray(engine.generate(request, [request.seed])[0].image, dtype=np.int16)


def test_the_shape_changes_a_beta_run_and_no_other(engine):
    plain = pixels(engine)
    assert not np.array_equal(pixels(engine, beta_dist_alpha=0.3), plain)
    assert not np.array_equal(pixels(engine, beta_dist_beta=0.3), plain)
    assert np.array_equal(pixels(engine, scheduler="Karras", beta_dist_alpha=0.3), pixels(engine, scheduler="Karras"))


def test_the_skip_plans_read_the_same_sigmas_as_the_run(engine):
    """Negative Guidance minimum sigma picks its calls from the pass's sigmas: the shape moves them."""
    def skipped(**fields):
        request = GenerationRequest(**(QUICK | {"cfg_scale": 7.0, "s_min_uncond": 2.0, "steps": 8} | fields))
        return engine._uncond_skips(request, 8, 8, (request.sampler_name, request.scheduler), 1, False).plan

    assert skipped() != skipped(beta_dist_alpha=0.05, beta_dist_beta=1.0)


@pytest.mark.parametrize("fields, problem", [({"beta_dist_alpha": 0}, "beta_dist_alpha"),
                                             ({"beta_dist_beta": 1.5}, "beta_dist_beta")])
def test_values_out_of_range_are_refused_by_name(fields, problem):
    with pytest.raises(InvalidRequest, match=problem):
        parse_request(QUICK | fields)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("beta") / "outputs")


def test_the_infotext_has_the_shape_with_the_beta_schedule_only_and_a_paste_puts_it_back(services):
    infotext = finished_job(services, QUICK | {"beta_dist_alpha": 0.4}).images[0].infotext
    assert "Schedule type: Beta," in infotext
    assert "Beta schedule alpha: 0.4," in infotext and "Beta schedule beta: 0.6," in infotext
    pasted = request_fields_from_infotext(infotext)
    assert (pasted["beta_dist_alpha"], pasted["beta_dist_beta"]) == (0.4, 0.6)
    karras = finished_job(services, QUICK | {"scheduler": "Karras", "beta_dist_alpha": 0.4}).images[0].infotext
    assert "Beta schedule" not in karras
    assert request_fields_from_infotext(karras)["beta_dist_alpha"] == 0.6  # left out: the default again
    hires = finished_job(services, QUICK | {"scheduler": "Karras", "enable_hr": True, "hr_scale": 1.5,
                                            "hr_second_pass_steps": 2, "hr_sampler_name": "Euler",
                                            "hr_scheduler": "Beta", "beta_dist_beta": 0.2}).images[0].infotext
    assert "Hires schedule type: Beta" in hires and "Beta schedule beta: 0.2," in hires


def test_the_api_takes_them_from_overrides_options_and_an_infotext(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
            "scheduler": "beta"}
    with TestClient(create_api_app(services)) as client:
        override = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"beta_dist_alpha": 0.3}})
        pasted = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 2, Sampler: Euler, Schedule type: "
                                                                   "Beta, Seed: 4, Size: 64x64, Beta schedule beta: 0.7"})
        bad = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"beta_dist_beta": 2}})
        refused = client.post("/sdapi/v1/options", json={"beta_dist_alpha": 0})
        applied = client.post("/sdapi/v1/options", json={"beta_dist_alpha": 0.5})
        by_option = client.post("/sdapi/v1/txt2img", json=body)
        client.post("/sdapi/v1/options", json={"beta_dist_alpha": 0.6})  # the module's other tests see the default
    assert override.status_code == 200, override.text[:300]
    assert "Beta schedule alpha: 0.3," in override.json()["info"]
    assert "Beta schedule beta: 0.7," in pasted.json()["info"], pasted.text[:300]
    assert bad.status_code == 422 and "override_settings.beta_dist_beta:" in bad.json()["detail"]
    assert refused.status_code == 422 and "beta_dist_alpha" in refused.json()["detail"]
    assert applied.status_code == 200 and "beta_dist_alpha" in applied.json()["applied"]
    assert "Beta schedule alpha: 0.5," in by_option.json()["info"]


def test_the_tabs_have_the_sliders(services):
    from webui.ui.blocks import create_ui

    ui = create_ui(services)
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        for name in ("beta_dist_alpha", "beta_dist_beta"):
            assert tab.widgets[name].elem_id == f"{kind}_{name}" and name in tab.field_names
            assert (tab.widgets[name].minimum, tab.widgets[name].maximum, tab.widgets[name].value) == (0.01, 1, 0.6)


def test_a_scheduler_made_for_the_run_is_not_shared(engine):
    """Two requests' shapes never meet: each run builds its own scheduler."""
    first = engine._scheduler("Euler", "Beta", shape=ScheduleShape(0.2, 0.2))
    second = engine._scheduler("Euler", "Beta")
    for scheduler in (first, second):
        scheduler.set_timesteps(6)
    assert not torch.allclose(first.sigmas, second.sigmas)
