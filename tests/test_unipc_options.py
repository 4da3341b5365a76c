"""A1111's UniPC settings (uni_pc_variant, uni_pc_order, uni_pc_lower_order_final): the scheduler they build, the
pictures, the infotext and its paste, the page, the X/Y/Z plot's UniPC Order and the API's override_settings."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import finished_job
from webui.engine.samplers import UniPCOptions, make_scheduler
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext

QUICK = {"prompt": "a lighthouse", "steps": 6, "seed": 11, "width": 64, "height": 64, "sampler_name": "UniPC"}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("unipc") / "outputs")


def test_the_settings_reach_unipcs_scheduler_and_no_other(engine):
    config = engine.pipe.scheduler.config
    default = make_scheduler(config, "UniPC").config
    assert (default.solver_type, default.solver_order, default.lower_order_final) == ("bh1", 3, True)  # A1111's
    changed = make_scheduler(config, "UniPC", unipc=UniPCOptions("bh2", 2, False)).config
    assert (changed.solver_type, changed.solver_order, changed.lower_order_final) == ("bh2", 2, False)
    assert dict(make_scheduler(config, "DPM++ 2M", unipc=UniPCOptions("bh2", 1, False)).config) == dict(
        make_scheduler(config, "DPM++ 2M").config)


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    return np.asarray(engine.generate(request, [request.seed])[0].image, dtype=np.int16)


def test_each_setting_changes_the_picture_and_the_same_settings_give_it_again(engine):
    plain = pixels(engine)
    assert np.array_equal(plain, pixels(engine))
    for fields in ({"uni_pc_variant": "bh2"}, {"uni_pc_order": 1}, {"uni_pc_lower_order_final": False}):
        assert np.abs(pixels(engine, **fields) - plain).mean() > 0.05, fields
    assert np.array_equal(pixels(engine, sampler_name="Euler"), pixels(engine, sampler_name="Euler", uni_pc_order=1))


def test_the_infotext_has_those_not_at_their_default_where_unipc_ran_and_a_paste_puts_them_back(services):
    job = finished_job(services, QUICK | {"uni_pc_variant": "bh2", "uni_pc_order": 2, "uni_pc_lower_order_final": False})
    text = job.images[0].infotext
    assert "UniPC variant: bh2, UniPC order: 2, UniPC lower order final: False," in text
    pasted = request_fields_from_infotext(text)
    assert (pasted["uni_pc_variant"], pasted["uni_pc_order"], pasted["uni_pc_lower_order_final"]) == ("bh2", 2, False)
    plain = finished_job(services, QUICK).images[0].infotext
    assert "UniPC" not in plain.replace("Sampler: UniPC", "")  # A1111's defaults: no keys
    again = request_fields_from_infotext(plain)  # and a paste of it puts the defaults back
    assert (again["uni_pc_variant"], again["uni_pc_order"], again["uni_pc_lower_order_final"]) == ("bh1", 3, True)
    euler = finished_job(services, QUICK | {"sampler_name": "Euler", "uni_pc_order": 2}).images[0].infotext
    assert "UniPC order" not in euler  # not read by Euler: not written
    hires = finished_job(services, QUICK | {"sampler_name": "Euler", "uni_pc_order": 2, "enable_hr": True,
                                            "hr_scale": 1.5, "hr_sampler_name": "UniPC", "denoising_strength": 0.5})
    assert "UniPC order: 2," in hires.images[0].infotext  # the hires pass ran UniPC


def test_the_api_and_the_tabs_take_them(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app
    from webui.ui.blocks import create_ui
    from webui.ui.generation import Session
    from webui.xyz_plot import plan, read_axis

    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 3, "sampler_name": "UniPC"}
    with TestClient(create_api_app(services)) as client:
        override = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"uni_pc_order": 2}})
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"uni_pc_variant": "vary_coeff"}})
    assert override.status_code == 200 and "UniPC order: 2," in override.json()["info"], override.text[:300]
    assert refused.status_code == 422 and "override_settings.uni_pc_variant: Input should be 'bh1' or 'bh2'" in \
        refused.json()["detail"]
    ui = create_ui(services)
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        for name, value in (("uni_pc_variant", "bh1"), ("uni_pc_order", 3), ("uni_pc_lower_order_final", True)):
            assert (tab.widgets[name].elem_id, tab.widgets[name].value) == (f"{kind}_{name}", value)
            assert name in tab.field_names
    *_, last = ui.txt2img.actions.generate(Session(), "a lighthouse", sampler_name="UniPC", steps=3, width=64,
                                           height=64, seed=3, uni_pc_variant="bh2")
    assert "UniPC variant: bh2," in last[4], last[2]
    axes = [read_axis("X", "UniPC Order", "1, 2"), read_axis("Y", "Nothing", ""), read_axis("Z", "Nothing", "")]
    cells = plan(body, axes).cells
    assert [cell.request["uni_pc_order"] for cell in cells] == [1, 2]
