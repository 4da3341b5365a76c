"""A1111's SGM noise multiplier: txt2img on a k-diffusion sampler starts from noise of sqrt(1 + sigma0²) rather than
sigma0; through the engine, the infotext, the page's field, the API and the X/Y/Z plot."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from fastapi.testclient import TestClient

from tests.helpers import api_infotext, finished_job, noise_picture
from webui.api import create_api_app
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext
from webui.xyz_plot import AXIS_TYPES

QUICK = {"prompt": "a red apple", "steps": 3, "seed": 21, "width": 64, "height": 64, "save_images": False}


def first_sigma() -> float:
    """The tiny model's largest sigma (t=999), from its schedule as SD's: scaled_linear betas 0.00085 to 0.012."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)[-1]
    return math.sqrt((1 - alpha_bar) / alpha_bar)


@pytest.fixture
def first_unet_input(monkeypatch):
    """The sample of every UNet call from now on (a run's first is its first)."""
    seen, real = [], UNet2DConditionModel.forward

    def forward(self, sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return real(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return seen


def draw(engine, **fields):
    return engine.generate(GenerationRequest(**QUICK | fields), [21])


def test_euler_starts_from_sqrt_1_plus_sigma_squared_times_the_noise(engine, first_unet_input):
    draw(engine, sampler_name="Euler")
    plain = first_unet_input[0]
    first_unet_input.clear()
    draw(engine, sampler_name="Euler", sgm_noise_multiplier=True)
    sgm = first_unet_input[0]
    sigma = first_sigma()
    # The UNet sees the start latents over sqrt(sigma0² + 1): sigma0 x noise before, sqrt(1 + sigma0²) x noise now.
    torch.testing.assert_close(sgm, plain * (math.sqrt(1 + sigma ** 2) / sigma), rtol=1e-5, atol=1e-6)
    assert not torch.equal(sgm, plain)


def test_dpm_2m_which_steps_unit_variance_latents_starts_from_the_same_unit_noise(engine, first_unet_input):
    # Its scheduler steps x / sqrt(1 + sigma²) and gives the UNet that unscaled: SGM's start is the unit noise itself,
    # which Euler with the multiplier gives its UNet too (sqrt(1 + sigma0²) x noise over sqrt(sigma0² + 1)).
    draw(engine, sampler_name="Euler", sgm_noise_multiplier=True)
    euler = first_unet_input[0]
    first_unet_input.clear()
    draw(engine, sampler_name="DPM++ 2M", sgm_noise_multiplier=True)
    torch.testing.assert_close(first_unet_input[0], euler, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_without_it_dpm_2m_starts_from_sigma0_times_the_noise_as_a1111s_k_diffusion(engine, first_unet_input, sampler):
    """A1111 starts every k-diffusion sampler from sigma0 x noise: Euler's UNet sees that over sqrt(sigma0² + 1), and
    so must DPM++ 2M's, whose diffusers scheduler would start from the unit noise (SGM's start)."""
    draw(engine, sampler_name="Euler")
    euler = first_unet_input[0]
    first_unet_input.clear()
    draw(engine, sampler_name=sampler, scheduler="Exponential")  # from the model's largest sigma, as Euler
    torch.testing.assert_close(first_unet_input[0], euler, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", [{"sampler_name": "DDIM"}, {"sampler_name": "UniPC"},
                                    {"sampler_name": "Euler", "denoising_strength": 0.6}])
def test_samplers_of_timesteps_and_img2img_are_left_as_they_were(engine, first_unet_input, fields):
    request = GenerationRequest(**QUICK | fields | ({"init_image": "0" * 40} if "denoising_strength" in fields else {}))
    picture = noise_picture(3) if request.is_img2img else None
    engine.generate(request, [21], init_image=picture)
    plain = first_unet_input[0]
    first_unet_input.clear()
    engine.generate(request.model_copy(update={"sgm_noise_multiplier": True}), [21], init_image=picture)
    assert torch.equal(first_unet_input[0], plain)
    assert not request.model_copy(update={"sgm_noise_multiplier": True}).uses_sgm_noise_multiplier


def test_the_infotext_says_so_where_it_applied_and_a_paste_reads_it_back(services):
    on = finished_job(services, QUICK | {"sampler_name": "Euler", "sgm_noise_multiplier": True})
    text = on.images[0].infotext
    assert ", SGM noise multiplier: True," in text
    assert request_fields_from_infotext(text)["sgm_noise_multiplier"] is True
    off = finished_job(services, QUICK | {"sampler_name": "Euler"}).images[0].infotext
    assert "SGM noise multiplier" not in off and request_fields_from_infotext(off)["sgm_noise_multiplier"] is False
    ddim = finished_job(services, QUICK | {"sampler_name": "DDIM", "sgm_noise_multiplier": True}).images[0].infotext
    assert "SGM noise multiplier" not in ddim  # A1111 writes it where it changed the start only


def test_the_api_takes_it_by_override_settings_options_and_infotext(services):
    body = QUICK | {"sampler_name": "Euler"}
    with TestClient(create_api_app(services)) as client:
        infotext = partial(api_infotext, client, body)
        assert "SGM noise multiplier" not in infotext()
        on = infotext(override_settings={"sgm_noise_multiplier": True})
        assert "SGM noise multiplier: True" in on
        assert "SGM noise multiplier: True" in infotext(infotext=on)
        refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sgm_noise_multiplier": "maybe"}})
        assert refused.status_code == 422 and "override_settings.sgm_noise_multiplier" in refused.text
        assert client.post("/sdapi/v1/options", json={"sgm_noise_multiplier": True}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sgm_noise_multiplier"] is True
        assert "SGM noise multiplier: True" in infotext()
        assert "SGM noise multiplier" not in infotext(override_settings={"sgm_noise_multiplier": False})


def test_the_xyz_plots_axis_takes_true_and_false_as_a1111_writes_them():
    axis = AXIS_TYPES["SGM noise multiplier"]
    request = {}
    axis.apply(request, "True")
    assert request == {"sgm_noise_multiplier": True}
    axis.apply(request, " false")
    assert request == {"sgm_noise_multiplier": False}
    with pytest.raises(ValueError, match="neither True nor False"):
        axis.apply(request, "maybe")


def test_the_txt2img_page_has_the_checkbox_and_sends_it(services):
    from webui.ui.blocks import create_ui
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS

    from webui.ui.session import Session

    ui = create_ui(services)
    assert ui.txt2img.widgets["sgm_noise_multiplier"].label == "SGM noise multiplier"
    assert "sgm_noise_multiplier" not in ui.img2img.widgets  # A1111 applies it to txt2img alone
    assert "sgm_noise_multiplier" in TXT2IMG_FIELDS and "sgm_noise_multiplier" not in IMG2IMG_FIELDS
    fields = {name: value for name, value in QUICK.items() if name != "save_images"}
    outputs = list(ui.txt2img.actions.generate(Session(), **fields, sampler_name="Euler", sgm_noise_multiplier=True))
    assert "SGM noise multiplier: True" in outputs[-1][4]
