"""A1111's Soft inpainting: its maths against values worked out here, the engine's run with it (unmasked pixels kept,
different from hard inpainting, equal to it where all is drawn and every change shows), its infotext keys written and
pasted back, its always-on script on the API, and its controls on the img2img tab."""
import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import TINY
from tests.helpers import noise_picture, reported_steps, running_services, wait_for
from tests.test_ui import event, uploaded
from webui.api import create_api_app
from webui.engine.img2img import image_sha1
from webui.engine.inpaint import prepare_inpainting, read_mask
from webui.engine.soft_inpainting import (SoftInpainting, blend_latents, gaussian_kernel, sigma_of,
                                          weighted_percentile_filter)
from webui.schemas import GenerationRequest, InvalidRequest, JobState, parse_request
from webui.storage.infotext import request_fields_from_infotext
from webui.ui.blocks import create_ui
from webui.ui.generation import Session
from webui.ui.params import IMG2IMG_FIELDS, fields_from_history

SOFT_FIELDS = ("soft_inpainting_schedule_bias", "soft_inpainting_preservation_strength",
               "soft_inpainting_transition_contrast_boost", "soft_inpainting_mask_influence",
               "soft_inpainting_difference_threshold", "soft_inpainting_difference_contrast")
# A1111's (extensions-builtin/soft-inpainting): defaults, and its sliders' ranges.
A1111_DEFAULTS = (1, 0.5, 4, 0, 0.5, 2)
A1111_RANGES = ((0, 8), (0, 8), (1, 32), (0, 1), (0, 8), (0, 8))
A1111_KEYS = ("Soft inpainting enabled", "Soft inpainting schedule bias", "Soft inpainting preservation strength",
              "Soft inpainting transition contrast boost", "Soft inpainting mask influence",
              "Soft inpainting difference threshold", "Soft inpainting difference contrast")


def left_mask(size=(64, 64), right=24) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, right, size[1]))
    return mask


def pixels(picture) -> np.ndarray:
    return np.asarray(picture, np.int16)


# --- the request ------------------------------------------------------------------------------------------------
def test_the_fields_start_at_a1111s_defaults_and_keep_to_its_ranges():
    fields = GenerationRequest.model_fields
    assert fields["soft_inpainting"].default is False
    assert tuple(fields[name].default for name in SOFT_FIELDS) == A1111_DEFAULTS
    for name, (low, high) in zip(SOFT_FIELDS, A1111_RANGES):
        parse_request({name: low})
        parse_request({name: high})
        with pytest.raises(InvalidRequest, match=name):
            parse_request({name: high + 0.5})
        with pytest.raises(InvalidRequest, match=name):
            parse_request({name: low - 0.5})


# --- the maths ------------------------------------------------------------------------------------------------
def test_the_step_weight_follows_the_mask_by_the_noise_level():
    drawn = torch.tensor([0.0, 0.5, 1.0])
    assert SoftInpainting().step_weight(drawn, 2.0).tolist() == [0.0, 0.5, 1.0]  # 0.5 ** (2 ** 1 x 0.5)
    biased = SoftInpainting(schedule_bias=2, preservation_strength=0.25).step_weight(drawn, 3.0)
    assert biased[1].item() == pytest.approx(2 ** -2.25)  # 0.5 ** (3 ** 2 x 0.25)
    assert biased[0] == 0 and biased[2] == 1
    # Late in the run (low noise) a half-masked pixel goes almost all the run's way; early, the picture's.
    assert SoftInpainting().step_weight(drawn, 0.05)[1] > 0.98 and SoftInpainting().step_weight(drawn, 14)[1] < 0.01
    assert SoftInpainting(preservation_strength=0).step_weight(drawn, 5.0).tolist() == [1.0, 1.0, 1.0]


def vectors(*values) -> torch.Tensor:
    """One latent pixel per value: (batch 1, 4 channels, 1, n)."""
    return torch.tensor(values, dtype=torch.float32).T[None, :, None, :]


def test_the_blend_interpolates_and_keeps_the_vectors_lengths_up():
    picture, run = vectors([3, 0, 0, 0]), vectors([0, 4, 0, 0])
    half = torch.full((1, 1, 1, 1), 0.5)
    # Boost 1: the plain mean of the lengths, (3 + 4) / 2 = 3.5, on the linear mix (1.5, 2), whose length is 2.5.
    assert blend_latents(picture, run, half, 1.0)[0, :, 0, 0].tolist() == pytest.approx([2.1, 2.8, 0, 0], rel=1e-4)
    # Boost 2: the lengths' root mean square, sqrt((9 + 16) / 2).
    scale = math.sqrt(12.5) / 2.5
    assert blend_latents(picture, run, half, 2.0)[0, :, 0, 0].tolist() == pytest.approx(
        [1.5 * scale, 2 * scale, 0, 0], rel=1e-4)
    for weight, expected in ((0.0, picture), (1.0, run)):
        assert torch.allclose(blend_latents(picture, run, torch.full((1, 1, 1, 1), weight), 4.0), expected, rtol=1e-4)


def test_sigma_of_a_timestep_is_k_diffusions_and_interpolates_between_timesteps():
    class Scheduler:
        alphas_cumprod = torch.tensor([0.8, 0.5, 0.2])

    assert sigma_of(Scheduler(), 1) == pytest.approx(1.0)  # sqrt(0.5 / 0.5)
    assert sigma_of(Scheduler(), 2) == pytest.approx(2.0)  # sqrt(0.8 / 0.2)
    assert sigma_of(Scheduler(), 1.5) == pytest.approx(math.sqrt(2))  # half way in log sigma


def naive_filter(values, low, high, min_width=1.0):
    """The weighted percentile filter, pixel by pixel, as its definition reads."""
    kernel, out = gaussian_kernel(), np.empty_like(values)
    for y, x in np.ndindex(values.shape):
        found = sorted((values[y + dy, x + dx], kernel[dy + 2, dx + 2]) for dy in range(-2, 3) for dx in range(-2, 3)
                       if 0 <= y + dy < values.shape[0] and 0 <= x + dx < values.shape[1])
        total = sum(weight for _, weight in found)
        start, end = total * low, total * high
        if end - start < min_width:
            start, end = (start + end - min_width) / 2, (start + end + min_width) / 2
            if end > total:
                start, end = total - min_width, total
            if start < 0:
                start, end = 0, min_width
        summed = weights = 0.0
        bottom = 0.0
        for value, weight in found:
            overlap = max(0.0, min(end, bottom + weight) - max(start, bottom))
            summed, weights, bottom = summed + value * overlap, weights + overlap, bottom + weight
        out[y, x] = summed / weights
    return out


@pytest.mark.parametrize("low, high", [(0.9, 1.0), (0.25, 0.75), (0.0, 1.0)])
def test_the_percentile_filter_matches_its_definition(low, high):
    values = np.random.default_rng(3).random((6, 9))
    assert np.allclose(weighted_percentile_filter(values, low, high), naive_filter(values, low, high))


def test_the_kernel_is_1_in_the_middle_and_tapers_towards_0_past_its_radius():
    kernel = gaussian_kernel()
    assert kernel.shape == (5, 5) and kernel[2, 2] == 1
    at_zero = math.exp(-9 / 2.25)  # 3 pixels out, stddev 1.5
    assert kernel[2, 4] == pytest.approx((math.exp(-4 / 2.25) - at_zero) / (1 - at_zero))


def differing_by(distance: float, size=(4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Picture latents, and final ones `distance` away at every latent pixel."""
    picture = torch.zeros(1, 4, *size)
    final = picture.clone()
    final[:, 0] = distance
    return picture, final


@pytest.mark.parametrize("distance, settings, expected", [
    (0.0, {}, 0),  # unchanged: all the picture's pixels
    (0.5, {}, 127),  # at the threshold: 1 / (1 + 1) = 0.5, smootherstep 0.5, 255 x 0.5 cut down
    (1.0, {}, 240),  # 1 / (1 + 2^2) = 0.2, smootherstep 0.05792, 255 x 0.94208 = 240.2
    (0.25, {"soft_inpainting_difference_contrast": 1}, 53),  # 1 / (1 + 0.5) = 2/3, smootherstep 64/81
    (0.01, {"soft_inpainting_difference_threshold": 0}, 255),  # no threshold: every change shows the run's
])
def test_the_pixel_mask_follows_how_far_the_latents_moved(distance, settings, expected):
    soft = SoftInpainting(*(settings.get(name, default) for name, default in zip(SOFT_FIELDS, A1111_DEFAULTS)))
    picture, final = differing_by(distance)
    [mask] = soft.pixel_masks(picture, final, torch.ones(1, 1, 4, 4), (32, 32))
    assert mask.size == (32, 32) and abs(pixels(mask) - expected).max() <= 1


def test_mask_influence_lets_the_mask_decide_where_it_is_sure():
    soft = SoftInpainting(mask_influence=1)
    picture, final = differing_by(0.5, (4, 8))
    drawn = torch.zeros(1, 1, 4, 8)
    drawn[..., :4] = 1
    [mask] = soft.pixel_masks(picture, final, drawn, (64, 32))
    shown = pixels(mask)
    assert shown[:, :8].min() == 255  # fully drawn: the threshold is 0, the run's pixels
    assert shown[:, -8:].max() == 0  # fully kept: the threshold is far, the picture's pixels
    [plain] = SoftInpainting().pixel_masks(picture, final, drawn, (64, 32))
    assert abs(pixels(plain) - 127).max() <= 1  # no influence: the change alone decides, the same everywhere


def test_a_step_blends_the_noised_picture_in_by_the_weight_of_that_calls_noise_level():
    from diffusers import EulerDiscreteScheduler

    from webui.engine.generate import _MaskedStart

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)

    class Pipe:
        num_timesteps = 4

    Pipe.scheduler = scheduler
    keep = torch.zeros(1, 1, 2, 2)
    keep[..., 0] = 0.5  # half masked on the left, drawn on the right
    masked = _MaskedStart(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), keep, SoftInpainting(transition_contrast_boost=1))
    run = torch.full((1, 4, 2, 2), 2.0)
    after = masked.put_back(Pipe(), 1, run)  # after the second call: the picture noised to the third sigma
    sigma_call, sigma_next = scheduler.sigmas[1].item(), scheduler.sigmas[2].item()
    weight = 0.5 ** (sigma_call * 0.5)
    # Parallel vectors of one sign: the length blend at boost 1 is the linear one.
    assert after[0, 0, 0, 0].item() == pytest.approx((1 - weight) * sigma_next + weight * 2, rel=1e-3)
    assert after[0, 0, 0, 1].item() == pytest.approx(2.0, rel=1e-4)
    assert masked.finish(run) is run  # no hard blend at the end


# --- the engine ---------------------------------------------------------------------------------------------------
def inpaint(engine, picture, mask, on_step=None, **fields) -> np.ndarray:
    request = GenerationRequest(**{"prompt": "a red apple", "steps": 6, "denoising_strength": 0.75, "mask_blur": 8,
                                   "sampler_name": "Euler"} | fields)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    return pixels(engine.generate(request, [5], on_step, init_image=start, inpainting=inpainting)[0].image)


def test_soft_inpainting_draws_otherwise_and_keeps_the_picture_away_from_the_mask(engine, monkeypatch):
    picture = noise_picture(4, 128, 64)
    mask = left_mask((128, 64), 32)
    reported = reported_steps(monkeypatch)
    soft = inpaint(engine, picture, mask, lambda step, total, latents: None, soft_inpainting=True)
    steps = [latents for latents, _ in reported]
    hard = inpaint(engine, picture, mask)
    assert np.abs(soft - hard)[:, :64].mean() > 2  # the drawn part and its edge differ
    assert (soft[:, 96:] == pixels(picture)[:, 96:]).all()  # far from the mask: the picture's own pixels
    assert np.abs(soft[:, :24] - pixels(picture)[:, :24]).mean() > 5  # under the mask: drawn again
    with torch.inference_mode():
        start = engine.encode(picture)
    # Where the blurred mask is 0, the latents after the last step are the picture's (up to the blend's 1e-5).
    right = start.shape[-1] * 3 // 4  # the latents' right quarter, far from the mask whatever the VAE's scale
    assert torch.allclose(steps[-1][..., right:], start[..., right:], atol=1e-4)
    assert not torch.allclose(steps[-1][..., :right // 3], start[..., :right // 3], atol=0.1)


def test_with_all_drawn_and_every_change_shown_it_draws_as_hard_inpainting(engine):
    picture = noise_picture(5)
    everything = Image.new("L", (64, 64), 255)
    soft = inpaint(engine, picture, everything, mask_blur=0, soft_inpainting=True,
                   soft_inpainting_difference_threshold=0)
    hard = inpaint(engine, picture, everything, mask_blur=0)
    assert np.abs(soft - hard).max() <= 1  # the blend's length factor differs by 1e-5 at most


def test_only_masked_soft_inpainting_keeps_the_picture_outside_the_region(engine):
    picture = noise_picture(6, 160, 96)
    mask = Image.new("L", (160, 96), 0)
    mask.paste(255, (60, 30, 90, 60))
    fields = {"soft_inpainting": True, "inpaint_full_res": True, "inpaint_full_res_padding": 0, "mask_blur": 2,
              "width": 64, "height": 64}
    result = inpaint(engine, picture, mask, **fields)
    left, top, right, bottom = prepare_inpainting(picture, mask, GenerationRequest(**fields))[3].box
    assert result.shape == (96, 160, 3) and left > 0 and right < 160
    outside = np.ones((96, 160), bool)
    outside[top:bottom, left:right] = False
    assert (result[outside] == pixels(picture)[outside]).all()
    assert np.abs(result[38:52, 68:82] - pixels(picture)[38:52, 68:82]).mean() > 5


# --- a model made for inpainting -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inpainting_engine(tmp_path_factory):
    """The tiny model with a 9-channel UNet, recording what its UNet reads."""
    from tests.helpers import inpainting_model_engine

    return inpainting_model_engine(tmp_path_factory.mktemp("models"))


def test_an_inpainting_model_reads_the_masks_shades_as_a1111_gives_them_with_soft_inpainting(inpainting_engine):
    picture = noise_picture(10, 128, 64)
    result = inpaint(inpainting_engine, picture, left_mask((128, 64), 32), soft_inpainting=True)
    mask_channel = inpainting_engine.unet_inputs[0][0, 4]
    shades = mask_channel[(mask_channel > 0.05) & (mask_channel < 0.95)]
    assert shades.numel() > 0  # the blurred edge, not rounded to 0 or 1
    assert (result[:, 96:] == pixels(picture)[:, 96:]).all()
    inpainting_engine.unet_inputs.clear()
    inpaint(inpainting_engine, picture, left_mask((128, 64), 32))
    hard = inpainting_engine.unet_inputs[0][0, 4]
    assert set(hard.unique().tolist()) == {0.0, 1.0}  # without it, rounded as before


def test_the_masked_picture_is_greyed_as_far_as_the_mask_covers_it_when_not_rounded():
    from webui.engine.inpainting_model import masked_picture_input

    picture, mask = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("L", (8, 8), 200)

    def as_tensor(image):  # stands in for the VAE: the pixels themselves, -1 to 1
        return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    channels = masked_picture_input(as_tensor, (8, 8), picture, mask, rounded=False)
    assert torch.allclose(channels[0, 0], torch.tensor(200 / 255))
    # red 255 and grey 128, 200/255 of the way to grey: 155.4, or 0.22 in -1..1
    assert torch.allclose(channels[0, 1], torch.tensor(155 / 127.5 - 1), atol=0.01)


# --- infotext, the worker ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("soft-out"))


def finished(services, picture, mask, **fields):
    job = services.worker.submit({"prompt": "a red apple", "steps": 3, "seed": 4, "denoising_strength": 0.6,
                                  **fields}, init_image=picture, mask=mask)
    wait_for(lambda: job.state.finished, what="the job")
    assert job.state == JobState.DONE, job.error
    return job


def parameters(infotext: str) -> dict[str, str]:
    return dict(pair.split(": ", 1) for pair in infotext.splitlines()[-1].split(", "))


def test_a_soft_inpainting_job_writes_a1111s_keys_which_paste_back(services):
    job = finished(services, noise_picture(7), left_mask(), soft_inpainting=True,
                   soft_inpainting_schedule_bias=1.5, soft_inpainting_difference_contrast=3)
    params = parameters(job.images[0].infotext)
    assert [params[key] for key in A1111_KEYS] == ["True", "1.5", "0.5", "4", "0", "0.5", "3"]
    pasted = request_fields_from_infotext(job.images[0].infotext)
    assert pasted["soft_inpainting"] is True
    assert tuple(pasted[name] for name in SOFT_FIELDS) == (1.5, 0.5, 4, 0, 0.5, 3)
    wait_for(lambda: job.images[0].history_id is not None, what="the history row")
    from_history = fields_from_history(services.history.get_image(job.images[0].history_id))
    assert from_history["soft_inpainting"] is True and from_history["soft_inpainting_schedule_bias"] == 1.5


def test_without_a_mask_or_switched_off_no_keys_are_written_and_paste_turns_it_off(services):
    plain = finished(services, noise_picture(8), None, soft_inpainting=True)  # img2img: nothing to soften
    hard = finished(services, noise_picture(8), left_mask())
    for job in (plain, hard):
        assert "Soft inpainting" not in job.images[0].infotext
        assert request_fields_from_infotext(job.images[0].infotext)["soft_inpainting"] is False


def test_a_pasted_infotext_missing_or_garbling_a_number_gets_a1111s_default():
    text = ("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Mask blur: 8, Soft inpainting enabled: True, "
            "Soft inpainting schedule bias: nan, Soft inpainting mask influence: 0.25")
    pasted = request_fields_from_infotext(text)
    assert pasted["soft_inpainting"] is True
    assert tuple(pasted[name] for name in SOFT_FIELDS) == (1, 0.5, 4, 0.25, 0.5, 2)


# --- the API ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_api_app(services)) as test_client:
        yield test_client


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


BODY = {"prompt": "a red apple", "steps": 2, "seed": 3, "width": 64, "height": 64, "sampler_name": "Euler",
        "denoising_strength": 0.6}


def img2img_body(args, mask=True, key="soft inpainting") -> dict:
    return BODY | {"init_images": [b64(noise_picture(9))], "alwayson_scripts": {key: {"args": args}},
                   **({"mask": b64(left_mask()), "mask_blur": 8} if mask else {})}


def test_the_api_runs_a1111s_always_on_script_from_its_args(client):
    r = client.post("/sdapi/v1/img2img", json=img2img_body([True, 2, 0.75, 8, 0.5, 1, 4], key="Soft Inpainting"))
    assert r.status_code == 200, r.text
    params = parameters(json.loads(r.json()["info"])["infotexts"][0])
    assert [params[key] for key in A1111_KEYS] == ["True", "2", "0.75", "8", "0.5", "1", "4"]
    short = client.post("/sdapi/v1/img2img", json=img2img_body([True, 3]))  # the rest: A1111's defaults
    params = parameters(json.loads(short.json()["info"])["infotexts"][0])
    assert [params[key] for key in A1111_KEYS] == ["True", "3", "0.5", "4", "0", "0.5", "2"]
    off = client.post("/sdapi/v1/img2img", json=img2img_body([False, 3]))
    assert "Soft inpainting" not in json.loads(off.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("body, kind, message", [
    (img2img_body([True, 9]), "img2img",
     "alwayson_scripts.soft inpainting.args[1] (schedule bias): 9 is out of range; use 0 to 8"),
    (img2img_body([True, 1, 0.5, 0.5]), "img2img",
     "alwayson_scripts.soft inpainting.args[3] (transition contrast boost): 0.5 is out of range; use 1 to 32"),
    (img2img_body(["yes"]), "img2img", "alwayson_scripts.soft inpainting.args[0] (soft inpainting): expected true"),
    (img2img_body([True, 1, 1, 4, "much"]), "img2img", "args[4] (mask influence): expected a number"),
    (BODY | {"alwayson_scripts": {"soft inpainting": {"args": [True]}}}, "txt2img",
     "alwayson_scripts.soft inpainting: soft inpainting is an img2img script"),
    (BODY | {"init_images": [b64(noise_picture(9))], "alwayson_scripts": {"soft inpainting": [True]}}, "img2img",
     'alwayson_scripts.soft inpainting: send {"args"'),
    (BODY | {"alwayson_scripts": {"adetailer": {"args": []}}}, "txt2img", "no always-on script but ControlNet"),
])
def test_the_api_refuses_bad_args_naming_them(client, body, kind, message):
    r = client.post(f"/sdapi/v1/{kind}", json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_the_api_says_when_there_was_no_mask_to_soften(client):
    r = client.post("/sdapi/v1/img2img", json=img2img_body([True], mask=False))
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Soft inpainting" not in info["infotexts"][0]
    assert any("no mask was sent, so soft inpainting did not run" in note for note in info["warnings"])


def test_the_api_lists_it_as_an_img2img_always_on_script(client):
    assert "soft inpainting" in client.get("/sdapi/v1/scripts").json()["img2img"]
    assert "soft inpainting" not in client.get("/sdapi/v1/scripts").json()["txt2img"]
    [info] = [item for item in client.get("/sdapi/v1/script-info").json() if item["name"] == "soft inpainting"]
    assert info["is_alwayson"] and info["is_img2img"]
    assert [arg["value"] for arg in info["args"]] == [False, *A1111_DEFAULTS]
    assert [(arg["minimum"], arg["maximum"]) for arg in info["args"][1:]] == list(A1111_RANGES)


# --- the img2img tab --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui(services):
    return create_ui(services)


def test_the_tab_has_a1111s_switch_and_sliders_under_inpainting(ui):
    widgets = ui.img2img.widgets
    assert widgets["soft_inpainting"].value is False and widgets["soft_inpainting"].label == "Soft inpainting"
    sliders = [widgets[name] for name in SOFT_FIELDS]
    assert [slider.label for slider in sliders] == [key.removeprefix("Soft inpainting ").capitalize()
                                                    for key in A1111_KEYS[1:]]
    assert [(slider.minimum, slider.maximum) for slider in sliders] == list(A1111_RANGES)
    assert tuple(slider.value for slider in sliders) == A1111_DEFAULTS


def test_a_pasted_infotext_sets_the_switch_and_sliders_and_generate_sends_them(ui, services, tmp_path):
    text = ("a castle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.5, "
            "Mask blur: 8, Soft inpainting enabled: True, Soft inpainting schedule bias: 2, "
            "Soft inpainting preservation strength: 0.5, Soft inpainting transition contrast boost: 4, "
            "Soft inpainting mask influence: 0.25, Soft inpainting difference threshold: 1, "
            "Soft inpainting difference contrast: 2")
    noise_picture(11).save(tmp_path / "castle.png")
    _, _, _, _, *values, _ = event(ui, "pnginfo_to_inpaint")(uploaded(tmp_path / "castle.png"), text)
    fields = dict(zip(IMG2IMG_FIELDS, values))
    assert fields["soft_inpainting"] is True
    assert tuple(fields[name] for name in SOFT_FIELDS) == (2, 0.5, 4, 0.25, 1, 2)
    mask = left_mask()
    chosen = {name: fields[name] for name in ("soft_inpainting", *SOFT_FIELDS)}
    [*_, (session, *_)] = list(event(ui, "img2img")(
        Session(), "a castle", steps=3, width=64, height=64, seed=7, model=TINY, denoising_strength=0.5,
        img2img_mode="Inpaint upload", inpaint_image=noise_picture(11), mask=mask, mask_blur=8, **chosen))
    job = services.worker.get(session.job_id)
    assert job.state == JobState.DONE, job.error
    assert "Soft inpainting enabled: True, Soft inpainting schedule bias: 2" in job.images[0].infotext
    assert "Soft inpainting mask influence: 0.25, Soft inpainting difference threshold: 1" in job.images[0].infotext
