"""A1111's sigma_min, sigma_max and rho options ("Schedule min sigma", "Schedule max sigma", "Schedule rho"): the
request fields through the engine, the infotext, the page, the X/Y/Z plot and the API. Their sigmas: test_samplers.py."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import finished_job
from webui.schemas import GenerationRequest, InvalidRequest, parse_request
from webui.storage.infotext import request_fields_from_infotext

QUICK = {"prompt": "a lighthouse", "steps": 4, "seed": 11, "width": 64, "height": 64, "sampler_name": "Euler",
         "scheduler": "Karras"}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("range") / "outputs")


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    return np.asarray(engine.generate(request, [request.seed])[0].image, dtype=np.int16)


def test_the_range_and_rho_change_a_karras_run_and_not_a_uniform_one(engine):
    plain = pixels(engine)
    for fields in ({"sigma_min": 0.5}, {"sigma_max": 5.0}, {"rho": 2.0}):
        assert not np.array_equal(pixels(engine, **fields), plain), fields
    uniform = pixels(engine, scheduler="Uniform")
    assert np.array_equal(pixels(engine, scheduler="Uniform", sigma_min=0.5, sigma_max=5.0, rho=2.0), uniform)


@pytest.mark.parametrize("fields, problem", [({"sigma_min": -1}, "sigma_min"), ({"rho": 1000}, "rho"),
                                             ({"sigma_min": 3, "sigma_max": 2}, "sigma_min: 3 is not below")])
def test_values_that_cannot_run_are_refused_by_name(fields, problem):
    with pytest.raises(InvalidRequest, match=problem):
        parse_request(QUICK | fields)


def test_one_end_past_the_models_other_end_is_refused_before_the_job_is_queued(services):
    for fields, says in (({"sigma_min": 20}, "sigma_min: 20 is not below"), ({"sigma_max": 0.01}, "sigma_max: 0.01")):
        with pytest.raises(InvalidRequest, match=says):
            services.worker.submit(QUICK | fields)
    uniform = finished_job(services, QUICK | {"scheduler": "Uniform", "sigma_min": 20})  # read by no pass: runs
    assert "Schedule min sigma" not in uniform.images[0].infotext


def test_the_infotext_has_the_options_a_pass_read_and_a_paste_puts_them_back(services):
    infotext = finished_job(services, QUICK | {"sigma_min": 0.25, "sigma_max": 9.5, "rho": 5}).images[0].infotext
    assert "Schedule min sigma: 0.25, Schedule max sigma: 9.5, Schedule rho: 5," in infotext
    pasted = request_fields_from_infotext(infotext)
    assert (pasted["sigma_min"], pasted["sigma_max"], pasted["rho"]) == (0.25, 9.5, 5.0)
    exponential = finished_job(services, QUICK | {"scheduler": "Exponential", "sigma_min": 0.25, "rho": 5})
    assert "Schedule min sigma: 0.25," in exponential.images[0].infotext
    assert "Schedule rho" not in exponential.images[0].infotext  # Exponential has no rho
    poly = finished_job(services, QUICK | {"scheduler": "Polyexponential", "rho": 2.5}).images[0]
    assert "Schedule type: Polyexponential," in poly.infotext and "Schedule rho: 2.5," in poly.infotext
    assert request_fields_from_infotext(poly.infotext)["scheduler"] == "Polyexponential"
    at_one = finished_job(services, QUICK | {"scheduler": "Polyexponential", "rho": 1}).images[0]
    assert "Schedule rho" not in at_one.infotext  # its own 1
    assert poly.image.tobytes() != at_one.image.tobytes()
    uniform = finished_job(services, QUICK | {"scheduler": "Uniform", "sigma_min": 0.25}).images[0].infotext
    assert "Schedule min sigma" not in uniform
    assert request_fields_from_infotext(uniform)["sigma_min"] == 0  # left out: the model's own again
    hires = finished_job(services, QUICK | {"scheduler": "Uniform", "enable_hr": True, "hr_scale": 1.5,
                                            "hr_second_pass_steps": 2, "hr_sampler_name": "Euler",
                                            "hr_scheduler": "Karras", "sigma_max": 7}).images[0].infotext
    assert "Hires schedule type: Karras" in hires and "Schedule max sigma: 7," in hires


def test_the_api_takes_them_from_overrides_options_and_an_infotext(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
            "scheduler": "karras"}
    with TestClient(create_api_app(services)) as client:
        override = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sigma_min": 0.3}})
        pasted = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 2, Sampler: Euler, Schedule type: "
                                                                   "Karras, Seed: 4, Size: 64x64, Schedule rho: 4"})
        bad = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sigma_max": -2}})
        applied = client.post("/sdapi/v1/options", json={"sigma_max": 6})
        by_option = client.post("/sdapi/v1/txt2img", json=body)
        client.post("/sdapi/v1/options", json={"sigma_max": 0})  # the module's other tests see the default
    assert override.status_code == 200, override.text[:300]
    assert "Schedule min sigma: 0.3," in override.json()["info"]
    assert "Schedule rho: 4," in pasted.json()["info"], pasted.text[:300]
    assert bad.status_code == 422 and "override_settings.sigma_max:" in bad.json()["detail"]
    assert applied.status_code == 200 and "sigma_max" in applied.json()["applied"]
    assert "Schedule max sigma: 6," in by_option.json()["info"]


def test_the_tabs_have_the_boxes_and_a_plot_axis_each(services):
    from webui.ui.blocks import create_ui
    from webui.xyz_plot import plan, read_axis

    ui = create_ui(services)
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        for name, label in (("sigma_min", "Schedule min sigma"), ("sigma_max", "Schedule max sigma"),
                            ("rho", "Schedule rho")):
            widget = tab.widgets[name]
            assert (widget.elem_id, widget.label, widget.value) == (f"{kind}_{name}", label, 0)
            assert name in tab.field_names
    axes = [read_axis("X", "Schedule rho", "3, 9"), read_axis("Y", "Schedule min sigma", "0.1"),
            read_axis("Z", "Schedule max sigma", "8")]
    cells = plan(QUICK, axes).cells
    assert [(c.request["rho"], c.request["sigma_min"], c.request["sigma_max"]) for c in cells] == [
        (3, 0.1, 8), (9, 0.1, 8)]
