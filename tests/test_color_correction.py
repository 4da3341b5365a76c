"""img2img's colour correction (A1111's setting): histogram matching in CIELAB, the result's luminosity kept; and
the request field through the worker, the infotext, the page and the API."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import finished_job, noise_picture
from webui.engine.color_correction import match_colors, match_histogram, with_luminosity
from webui.storage.infotext import request_fields_from_infotext

LUMA = np.array([0.3, 0.59, 0.11])


def tinted(seed: int, weights: tuple[float, float, float], size: int = 64) -> Image.Image:
    """Noise whose channels are the same grey scaled by `weights`: a picture with a colour cast."""
    grey = np.asarray(noise_picture(seed, size, size).convert("L"), float)
    return Image.fromarray(np.stack([grey * w for w in weights], axis=-1).round().astype(np.uint8))


def test_histogram_matching_gives_each_value_the_reference_value_of_its_rank():
    rng = np.random.default_rng(0)
    source = rng.permutation(100)
    reference = rng.permutation(1000 + 2 * np.arange(100))
    matched = match_histogram(source, reference)
    assert np.array_equal(matched, 1000 + 2 * source)  # rank r gets the r-th smallest reference value
    assert np.array_equal(np.sort(matched), np.sort(reference))


def test_the_luminosity_blend_takes_the_lightness_and_keeps_the_hue():
    colours = np.array([[[200.0, 50.0, 50.0], [40.0, 90.0, 160.0], [128.0, 128.0, 128.0]]])
    light = np.array([[[100.0, 100.0, 100.0], [30.0, 30.0, 30.0], [250.0, 250.0, 250.0]]])
    blended = with_luminosity(colours, light)
    assert np.allclose(blended @ LUMA, light @ LUMA, atol=0.01)
    assert blended[0, 0, 0] > blended[0, 0, 1] == pytest.approx(blended[0, 0, 2])  # still red
    assert np.allclose(blended[0, 2], 250)  # a grey stays grey
    assert (blended >= 0).all() and (blended <= 255).all()


def test_a_picture_takes_the_references_colours_and_keeps_its_lightness():
    reddish, bluish = tinted(1, (1.0, 0.5, 0.3)), tinted(2, (0.3, 0.5, 1.0))
    corrected = np.asarray(match_colors(reddish, bluish), float)
    before = np.asarray(reddish, float)
    assert corrected[..., 2].mean() > corrected[..., 0].mean() + 20  # blue now leads
    assert before[..., 0].mean() > before[..., 2].mean() + 20
    assert abs((corrected @ LUMA).mean() - (before @ LUMA).mean()) < 2
    same = np.asarray(match_colors(reddish, reddish), float)
    assert np.abs(same - before).mean() < 3  # matched to itself: as it was, but for rounding


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("colours") / "outputs")


QUICK = {"prompt": "a red apple", "steps": 2, "seed": 5, "denoising_strength": 0.6, "width": 64, "height": 64}


def test_an_img2img_job_with_colour_correction_has_the_pictures_colours(services):
    bluish = tinted(3, (0.3, 0.6, 1.0))
    plain = np.asarray(finished_job(services, QUICK, init_image=bluish).images[0].image, float)
    job = finished_job(services, QUICK | {"color_correction": True}, init_image=bluish)
    corrected = np.asarray(job.images[0].image, float)
    assert np.array_equal(corrected, np.asarray(match_colors(Image.fromarray(plain.astype(np.uint8)), bluish)))
    assert "Color correction: True" in job.images[0].infotext
    assert request_fields_from_infotext(job.images[0].infotext)["color_correction"] is True
    assert "Color correction" not in finished_job(services, QUICK, init_image=bluish).images[0].infotext
    assert request_fields_from_infotext(finished_job(services, QUICK, init_image=bluish).images[0].infotext)[
        "color_correction"] is False
    txt2img = finished_job(services, {"prompt": "a", "steps": 1, "width": 64, "height": 64, "color_correction": True})
    assert "Color correction" not in txt2img.images[0].infotext  # no picture to match: nothing was done


def test_the_img2img_tab_sends_it_and_a_pasted_infotext_sets_it(services):
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS
    from webui.ui.blocks import create_ui

    assert "color_correction" in IMG2IMG_FIELDS and "color_correction" not in TXT2IMG_FIELDS
    tab = create_ui(services).img2img
    assert tab.widgets["color_correction"].elem_id == "img2img_color_correction"
    assert "color_correction" in tab.field_names


def test_the_api_takes_a1111s_override_setting(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    buffer = io.BytesIO()
    tinted(4, (1.0, 0.4, 0.2)).save(buffer, format="PNG")
    body = QUICK | {"init_images": [base64.b64encode(buffer.getvalue()).decode()]}
    with TestClient(create_api_app(services)) as client:
        on = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_color_correction": True}})
        off = client.post("/sdapi/v1/img2img", json=body)
    assert on.status_code == 200 and off.status_code == 200, on.text[:300]
    assert "Color correction: True" in on.json()["info"]
    assert "Color correction" not in off.json()["info"]
    assert on.json()["images"][0] != off.json()["images"][0]


def test_the_override_setting_is_read_as_a_boolean_and_refused_under_its_name(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    buffer = io.BytesIO()
    tinted(4, (1.0, 0.4, 0.2)).save(buffer, format="PNG")
    body = QUICK | {"init_images": [base64.b64encode(buffer.getvalue()).decode()]}
    with TestClient(create_api_app(services)) as client:
        off = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_color_correction": "false"}})
        bad = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_color_correction": "maybe"}})
    assert off.status_code == 200, off.text[:300]
    assert "Color correction" not in off.json()["info"]  # "false" is false, not a non-empty text
    assert bad.status_code == 422 and "override_settings.img2img_color_correction:" in bad.json()["detail"], bad.text
