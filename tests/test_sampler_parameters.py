"""A1111's sampler parameters: Skip Early CFG and NGMS (Negative Guidance minimum sigma), which model calls leave
the negative prompt out and the UNet hooks that do it; img2img's Noise multiplier; and their request fields through
the engine, the worker, the infotext, the page and the API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import finished_job, noise_picture

from webui.engine.composable import composed_guidance
from webui.engine.img2img import image_sha1
from webui.engine.uncond_skip import SkipCalls, UncondSkip, sigmas_at, skip_plan, skipping_uncond
from webui.schemas import GenerationRequest, JobState
from webui.storage.infotext import request_fields_from_infotext


def sd_alphas_cumprod() -> torch.Tensor:
    """SD 1.x's schedule (scaled linear betas from 0.00085 to 0.012 over 1000 steps), worked out here."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return torch.tensor(np.cumprod(1 - betas))


def test_a_sigma_is_the_noise_to_signal_ratio_of_the_timestep():
    alphas = sd_alphas_cumprod()
    for t in (0, 250, 999):
        a = float(alphas[t])
        assert sigmas_at([t], alphas)[0] == pytest.approx(((1 - a) / a) ** 0.5)
    assert sigmas_at([999], alphas)[0] == pytest.approx(14.6146, abs=1e-3)  # SD's largest sigma, as A1111 shows it
    low, mid, high = sigmas_at([100, 100.5, 101], alphas)
    assert low < mid < high and mid == pytest.approx((low * high) ** 0.5, rel=1e-6)  # between, on a log scale


def test_skip_early_cfg_skips_the_first_part_of_the_calls():
    alphas = sd_alphas_cumprod()
    timesteps = list(range(999, -1, -100))  # ten calls
    assert skip_plan(UncondSkip(early=0.3), timesteps, alphas) == [True] * 4 + [False] * 6  # 0/10 ... 3/10
    assert skip_plan(UncondSkip(early=1.0), timesteps, alphas) == [True] * 10
    assert skip_plan(UncondSkip(), timesteps, alphas) == [False] * 10


def test_ngms_skips_every_other_call_below_its_sigma_or_every_call_with_all_steps():
    alphas = sd_alphas_cumprod()
    timesteps = list(range(999, -1, -100))
    sigmas = [((1 - float(alphas[t])) / float(alphas[t])) ** 0.5 for t in timesteps]
    below = [sigma < 1.0 for sigma in sigmas]
    assert any(below) and not all(below)
    assert skip_plan(UncondSkip(min_sigma=1.0), timesteps, alphas) == [b and i % 2 == 1 for i, b in enumerate(below)]
    assert skip_plan(UncondSkip(min_sigma=1.0, all_steps=True), timesteps, alphas) == below


class RowUNet(torch.nn.Module):
    """A stand-in UNet whose prediction for a row depends on that row's text alone; it records its batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, sample, timestep, encoder_hidden_states=None):
        self.batches.append(sample.shape[0])
        return (sample + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)


def guided(unet, sample, states, cfg):
    """What a diffusers pipeline does with a guided batch: uncond + cfg * (cond - uncond)."""
    uncond, cond = unet(torch.cat([sample, sample]), 0, encoder_hidden_states=states)[0].chunk(2)
    return uncond + cfg * (cond - uncond)


def test_a_skipped_call_runs_the_positive_rows_alone_and_gives_their_prediction():
    unet, sample = RowUNet(), torch.zeros(2, 4, 8, 8)
    negative, positive = torch.full((2, 3, 5), 1.0), torch.stack([torch.full((3, 5), 2.0), torch.full((3, 5), 3.0)])
    states = torch.cat([negative, positive])
    with skipping_uncond(unet, SkipCalls([True, False], images=2)):
        skipped = guided(unet, sample, states, cfg=7.0)
        kept = guided(unet, sample, states, cfg=7.0)
    assert unet.batches == [2, 4]
    assert torch.equal(skipped[:, 0, 0, 0], torch.tensor([2.0, 3.0]))  # the positive prediction, unguided
    assert torch.equal(kept[:, 0, 0, 0], torch.tensor([1 + 7 * 1.0, 1 + 7 * 2.0]))
    unet.batches.clear()
    guided(unet, sample, states, cfg=7.0)  # outside: the hooks are gone
    assert unet.batches == [4]


def test_an_unguided_batch_is_left_alone():
    unet = RowUNet()
    with skipping_uncond(unet, SkipCalls([True], images=2)):
        out = unet(torch.zeros(2, 4, 8, 8), 0, encoder_hidden_states=torch.ones(2, 3, 5))[0]
    assert unet.batches == [2] and torch.equal(out, torch.ones(2, 4, 8, 8))


def test_a_composed_prompt_skipped_takes_a1111s_guidance_at_scale_one():
    # Two parts weighted 1 and 0.5; A1111 stands the first part's prediction in for the negative one and combines
    # at scale 1: c0 + 1 * (c0 - c0) + 0.5 * (c1 - c0).
    unet, sample = RowUNet(), torch.zeros(1, 4, 8, 8)
    negative = torch.full((1, 6, 5), 1.0)
    parts = torch.cat([torch.full((1, 3, 5), 2.0), torch.full((1, 3, 5), 4.0)], dim=1)  # parts along the tokens
    with composed_guidance(unet, [1.0, 0.5]), skipping_uncond(unet, SkipCalls([True], images=1)):
        out = guided(unet, sample, torch.cat([negative, parts]), cfg=7.0)
    assert unet.batches == [2]  # the two parts' rows, no negative row
    assert out[0, 0, 0, 0].item() == pytest.approx(2.0 + 0.5 * (4.0 - 2.0))


QUICK = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 4, "seed": 11, "width": 64, "height": 64,
         "cfg_scale": 7.0, "sampler_name": "Euler"}


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    return np.asarray(engine.generate(request, [request.seed])[0].image, dtype=np.int16)


def test_skipping_every_call_draws_the_picture_guidance_1_draws(engine):
    unguided = pixels(engine, cfg_scale=1.0)
    assert np.array_equal(pixels(engine, skip_early_cond=1.0), unguided)
    # NGMS above the largest sigma, every step: every call too
    assert np.array_equal(pixels(engine, s_min_uncond=15.0, s_min_uncond_all=True), unguided)


def test_skipping_some_calls_changes_the_picture_and_reproduces(engine):
    plain, unguided = pixels(engine), pixels(engine, cfg_scale=1.0)
    early = pixels(engine, skip_early_cond=0.5)
    assert not np.array_equal(early, plain) and not np.array_equal(early, unguided)
    assert np.array_equal(pixels(engine, skip_early_cond=0.5), early)
    ngms = pixels(engine, s_min_uncond=15.0)  # every other call
    assert not np.array_equal(ngms, plain) and not np.array_equal(ngms, unguided)
    assert np.array_equal(pixels(engine), plain)  # the hooks left nothing behind


def test_the_hires_pass_skips_too(engine):
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    assert np.array_equal(pixels(engine, skip_early_cond=1.0, **hires), pixels(engine, cfg_scale=1.0, **hires))


def test_skip_early_cfg_counts_a_second_order_samplers_steps_twice_as_a1111(engine):
    """A1111 measures Skip Early CFG against its sampler's expected calls, steps x 2 for Heun (6 for 3 steps), though
    Heun's last step calls the model once (5 calls): at 0.5, calls 0/6 to 3/6 skip, four of the five."""
    rows = []
    # a forward hook sees the inputs the pre-hooks laid out: the rows the UNet ran
    handle = engine.pipe.unet.register_forward_hook(lambda _module, args, _out: rows.append(args[0].shape[0]))
    try:
        pixels(engine, steps=3, sampler_name="Heun", skip_early_cond=0.5)
    finally:
        handle.remove()
    assert rows == [1, 1, 1, 1, 2]


def test_ngms_plans_on_the_calls_the_pass_makes_with_its_eta(engine):
    """DPM++ 2S a's midpoint calls move with Eta: at 0 its second call is at sigma 6.8, not eta 1's 3.2, so NGMS at 5
    (every call) keeps the negative prompt there."""
    rows, sigmas = [], []

    def seen(_module, args, _out):
        rows.append(args[0].shape[0])
        sigmas.extend(sigmas_at([float(args[1])], engine.pipe.scheduler.alphas_cumprod))

    handle = engine.pipe.unet.register_forward_hook(seen)
    try:
        pixels(engine, sampler_name="DPM++ 2S a", eta_ancestral=0.0, s_min_uncond=5.0, s_min_uncond_all=True)
    finally:
        handle.remove()
    assert rows == [1 if sigma < 5.0 else 2 for sigma in sigmas]
    assert rows[:3] == [2, 2, 1] and sigmas[1] > 6


@pytest.mark.parametrize("fields, problem", [({"skip_early_cond": 1.5}, "skip_early_cond"),
                                             ({"s_min_uncond": -1}, "s_min_uncond"),
                                             ({"s_min_uncond": 16}, "s_min_uncond")])
def test_values_out_of_range_are_refused_by_name(fields, problem):
    from webui.schemas import InvalidRequest, parse_request

    with pytest.raises(InvalidRequest, match=problem):
        parse_request(QUICK | fields)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("uncond") / "outputs")


def test_the_infotext_says_so_in_a1111s_keys_and_a_paste_puts_them_back(services):
    job = finished_job(services, QUICK | {"skip_early_cond": 0.25, "s_min_uncond": 2.5, "s_min_uncond_all": True})
    infotext = job.images[0].infotext
    assert "Skip Early CFG: 0.25" in infotext and "NGMS: 2.5" in infotext and "NGMS all steps: True" in infotext
    pasted = request_fields_from_infotext(infotext)
    assert (pasted["skip_early_cond"], pasted["s_min_uncond"], pasted["s_min_uncond_all"]) == (0.25, 2.5, True)
    plain = finished_job(services, QUICK).images[0].infotext
    assert "Skip Early CFG" not in plain and "NGMS" not in plain
    assert request_fields_from_infotext(plain)["s_min_uncond"] == 0.0  # a paste turns them off again


def test_the_api_takes_the_field_and_a1111s_override_settings(services):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
    with TestClient(create_api_app(services)) as client:
        given = client.post("/sdapi/v1/txt2img", json=body | {"s_min_uncond": 1.5, "override_settings": {
            "skip_early_cond": 0.5, "s_min_uncond_all": True}})
        overridden = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"s_min_uncond": 2}})
        bad = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"skip_early_cond": 3}})
        hires = client.post("/sdapi/v1/txt2img", json=body | {"enable_hr": True, "hr_scale": 1.5, "override_settings": {
            "img2img_extra_noise": 0.25}})
        bad_noise = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"img2img_extra_noise": 2}})
    assert given.status_code == 200, given.text[:300]
    info = given.json()["info"]
    assert "NGMS: 1.5" in info and "NGMS all steps: True" in info and "Skip Early CFG: 0.5" in info
    assert "NGMS: 2" in overridden.json()["info"]
    assert bad.status_code == 422 and "override_settings.skip_early_cond:" in bad.json()["detail"], bad.text
    assert hires.status_code == 200 and "Extra noise: 0.25" in hires.json()["info"], hires.text[:300]
    assert bad_noise.status_code == 422 and "override_settings.img2img_extra_noise:" in bad_noise.json()["detail"]


def test_the_tabs_have_the_controls_and_the_plot_an_axis(services):
    from webui.ui.blocks import create_ui
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS
    from webui.xyz_plot import plan, read_axis

    ui = create_ui(services)
    assert ui.img2img.widgets["initial_noise_multiplier"].elem_id == "img2img_initial_noise_multiplier"
    assert ui.txt2img.widgets["img2img_extra_noise"].elem_id == "txt2img_img2img_extra_noise"
    assert "initial_noise_multiplier" not in ui.txt2img.widgets
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        assert tab.widgets["s_min_uncond"].elem_id == f"{kind}_s_min_uncond"
        assert tab.widgets["skip_early_cond"].elem_id == f"{kind}_skip_early_cond"
        assert {"s_min_uncond", "s_min_uncond_all", "skip_early_cond"} <= set(tab.field_names)
    assert "s_min_uncond" in TXT2IMG_FIELDS and "s_min_uncond" in IMG2IMG_FIELDS
    axes = [read_axis("X", "Negative Guidance minimum sigma", "0, 2.5"), read_axis("Y", "Nothing", ""),
            read_axis("Z", "Nothing", "")]
    cells = plan(QUICK, axes).cells
    assert [cell.request["s_min_uncond"] for cell in cells] == [0.0, 2.5]


# --- img2img's Noise multiplier ---------------------------------------------------------------------------------

def first_model_input(engine, multiplier: float) -> torch.Tensor:
    """The latents img2img's first UNet call is given, at this noise multiplier."""
    seen = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        picture = noise_picture(4)
        request = GenerationRequest(**(QUICK | {"denoising_strength": 0.6, "initial_noise_multiplier": multiplier,
                                                "init_image": image_sha1(picture)}))
        engine.generate(request, [request.seed], init_image=picture)
    finally:
        handle.remove()
    return seen[0]


def test_the_noise_multiplier_scales_the_noise_the_picture_starts_with(engine):
    none, half, full = (first_model_input(engine, m) for m in (0.0, 0.5, 1.0))
    assert not torch.allclose(none, full)
    # the start is the picture's latents plus the noise times the multiplier: linear in it
    assert torch.allclose(full - half, half - none, atol=1e-5)


def test_the_noise_multiplier_goes_through_infotext_page_and_api(services):
    import base64
    import io

    from fastapi.testclient import TestClient
    from webui.api import create_api_app
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS

    job = services.worker.submit(QUICK | {"initial_noise_multiplier": 0.8}, init_image=noise_picture(4))
    assert job.wait(120) and job.state is JobState.DONE, job.error
    assert "Noise multiplier: 0.8" in job.images[0].infotext
    assert request_fields_from_infotext(job.images[0].infotext)["initial_noise_multiplier"] == 0.8
    assert "Noise multiplier" not in finished_job(services, QUICK | {"initial_noise_multiplier": 0.8}).images[0].infotext
    assert "initial_noise_multiplier" in IMG2IMG_FIELDS and "initial_noise_multiplier" not in TXT2IMG_FIELDS
    buffer = io.BytesIO()
    noise_picture(4).save(buffer, format="PNG")
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3,
            "init_images": [base64.b64encode(buffer.getvalue()).decode()]}
    with TestClient(create_api_app(services)) as client:
        given = client.post("/sdapi/v1/img2img", json=body | {"initial_noise_multiplier": 0.5})
        overridden = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"initial_noise_multiplier": 0.7}})
        plain = client.post("/sdapi/v1/img2img", json=body)
    assert given.status_code == 200, given.text[:300]
    assert "Noise multiplier: 0.5" in given.json()["info"] and "Noise multiplier: 0.7" in overridden.json()["info"]
    assert "Noise multiplier" not in plain.json()["info"]
    assert given.json()["images"][0] != plain.json()["images"][0]


def test_the_noise_multiplier_leaves_the_latent_noise_fill_as_drawn(engine):
    """A1111 fills an inpainted part with the seed's noise (masked content "latent noise") as drawn, and scales only
    the noise the start is noised with: at multiplier 0 that part starts from noise, not from nothing."""
    from tests.test_inpaint import inpaint, square_mask

    picture, mask = noise_picture(5), square_mask()
    noise_fill, nothing = (inpaint(engine, picture, mask, inpainting_fill=fill, mask_blur=0, denoising_strength=0.6,
                                   initial_noise_multiplier=0.0)[0] for fill in (2, 3))
    inside = np.asarray(mask) > 0
    assert np.abs(noise_fill[inside] - nothing[inside]).mean() > 1


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_the_latent_noise_fill_is_each_seeds_own_noise_whatever_the_variation_seed_and_seed_resize(engine, monkeypatch,
                                                                                                   source):
    """A1111 fills from the seeds alone (create_random_tensors(shape, seeds)); the fill was the start noise, moved
    by the variation seed and drawn at the seed resize's size (found by review)."""
    from tests.test_inpaint import request_for, square_mask
    from webui.engine.img2img import image_sha1
    from webui.engine.inpaint import prepare_inpainting, read_mask
    from webui.engine.noise import start_noise
    from webui.engine.philox import make_generator

    fills = []
    masked_start = engine._masked_start
    monkeypatch.setattr(engine, "_masked_start", lambda picture, noise, inpainting, fill=None, soft=None: (
        fills.append(fill), masked_start(picture, noise, inpainting, fill, soft))[1])
    picture, mask = noise_picture(5), square_mask()
    request = request_for(inpainting_fill=2, mask_blur=0, steps=2, denoising_strength=0.6, subseed_strength=0.5,
                          seed_resize_from_w=48, seed_resize_from_h=48, randn_source=source)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    engine.generate(request, [5, 6], subseeds=[9, 10], init_image=start, inpainting=inpainting)
    expected = start_noise([make_generator(source, seed) for seed in (5, 6)], tuple(fills[0].shape[1:]),
                           fills[0].dtype, source=source)
    assert torch.equal(fills[0], expected)


def test_an_api_infotext_brings_its_keys_as_a1111_reads_them_into_override_settings(services):
    """A1111's API takes an `infotext`'s NGMS, NGMS all steps, Skip Early CFG and Noise multiplier as overrides of
    their options: used where neither the request's field nor its override_settings gives one."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    pasted = ("a lighthouse\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Skip Early CFG: 0.25, "
              "NGMS: 2.5, NGMS all steps: True, Noise multiplier: 0.7")
    buffer = io.BytesIO()
    noise_picture(4).save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_api_app(services)) as client:
        as_pasted = client.post("/sdapi/v1/txt2img", json={"infotext": pasted})
        own = client.post("/sdapi/v1/txt2img", json={"infotext": pasted, "s_min_uncond": 1.5,
                                                      "override_settings": {"skip_early_cond": 0.5}})
        img2img = client.post("/sdapi/v1/img2img", json={"infotext": pasted, "init_images": [picture]})
        out_of_range = client.post("/sdapi/v1/txt2img", json={"infotext": pasted.replace("NGMS: 2.5", "NGMS: 20")})
    assert as_pasted.status_code == 200, as_pasted.text[:300]
    info = as_pasted.json()["info"]
    assert "Skip Early CFG: 0.25" in info and "NGMS: 2.5" in info and "NGMS all steps: True" in info
    info = own.json()["info"]
    assert "Skip Early CFG: 0.5" in info and "NGMS: 1.5" in info and "NGMS all steps: True" in info
    assert img2img.status_code == 200 and "Noise multiplier: 0.7" in img2img.json()["info"], img2img.text[:300]
    assert out_of_range.status_code == 422 and "infotext (NGMS)" in out_of_range.json()["detail"], out_of_range.text


# --- Extra noise (img2img and the hires fix) -------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_extra_noise_adds_the_start_noise_again_counted_in_sigmas(sampler):
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from webui.engine.generate import _noised_latents
    from webui.engine.samplers import make_scheduler

    config = json.loads((Path("webui/engine/model_configs/sd-v1/scheduler/scheduler_config.json")).read_text())
    scheduler = make_scheduler(config, sampler, "Automatic")
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4:5]
    pipe = SimpleNamespace(scheduler=scheduler)
    generator = torch.Generator().manual_seed(0)
    picture, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    plain = _noised_latents(pipe, noise, 0.0, picture, t)
    extra = _noised_latents(pipe, noise, 0.3, picture, t)
    # Euler's latents are the picture plus sigma x noise; DDIM's are that times sqrt(alpha-bar), worked out here.
    alpha = float(sd_alphas_cumprod()[int(t)]) if sampler == "DDIM" else 1.0
    assert torch.allclose(extra - plain, 0.3 * alpha ** 0.5 * noise, atol=1e-5)


def test_extra_noise_changes_img2img_and_the_hires_pass_and_says_so(services):
    picture = noise_picture(4)
    img2img = [finished_job(services, QUICK | {"img2img_extra_noise": e}, init_image=picture).images[0] for e in (0.0, 0.4)]
    assert "Extra noise: 0.4" in img2img[1].infotext and "Extra noise" not in img2img[0].infotext
    assert not np.array_equal(np.asarray(img2img[0].image), np.asarray(img2img[1].image))
    assert request_fields_from_infotext(img2img[1].infotext)["img2img_extra_noise"] == 0.4
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    made = [finished_job(services, QUICK | hires | {"img2img_extra_noise": e}).images[0] for e in (0.0, 0.4)]
    assert "Extra noise: 0.4" in made[1].infotext
    assert not np.array_equal(np.asarray(made[0].image), np.asarray(made[1].image))
    plain = finished_job(services, QUICK | {"img2img_extra_noise": 0.4}).images[0]  # no pass starts from a picture
    assert "Extra noise" not in plain.infotext
