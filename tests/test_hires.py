"""Hires fix: A1111's sizes and step counts, the second pass through the worker, its infotext, refusals."""
import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.hires import crop_center, crop_center_picture, hires_size, schedule_steps, upscale_latents
from webui.engine.img2img import pipeline_strength
from webui.schemas import GenerationRequest, InvalidRequest, JobState, parse_request
from webui.storage.infotext import request_fields_from_infotext


@pytest.mark.parametrize("size, scale, resize, upscaled, final", [
    ((512, 768), 1.5, (0, 0), (768, 1152), (768, 1152)),
    ((512, 512), 1.7, (0, 0), (864, 864), (864, 864)),  # 870.4 -> 870 -> a multiple of 8
    ((512, 768), 2, (1024, 0), (1024, 1536), (1024, 1536)),  # one side: the shape stays
    ((512, 768), 2, (0, 1024), (680, 1024), (680, 1024)),
    ((512, 768), 2, (1024, 1024), (1024, 1536), (1024, 1024)),  # both: fill, then cut the overflow
    ((768, 512), 2, (1024, 1024), (1536, 1024), (1024, 1024)),
])
def test_the_hires_size_follows_a1111s_rule(size, scale, resize, upscaled, final):
    result = hires_size(*size, scale, *resize)
    assert result.upscaled == upscaled and result.final == final


def test_the_second_pass_runs_exactly_the_hires_steps_from_a1111s_schedule():
    assert schedule_steps(10, 0.7) == 14 and schedule_steps(20, 1.0) == 20  # A1111: int(steps / min(d, 0.999))
    for steps in range(1, 151):
        for strength in np.arange(0.01, 1.0001, 0.01):
            schedule = schedule_steps(steps, float(strength))
            # diffusers' img2img runs the last min(int(n * strength), n) of n steps
            assert min(int(schedule * pipeline_strength(steps, schedule)), schedule) == steps, (steps, strength)


def test_latents_are_enlarged_then_cut_to_the_middle():
    import torch

    latents = torch.arange(16.0).reshape(1, 1, 4, 4)
    bigger = upscale_latents(latents, "Latent (nearest)", (8, 8))
    assert bigger.shape == (1, 1, 8, 8) and bigger[0, 0, 0, 0] == 0 and bigger[0, 0, 7, 7] == 15
    assert crop_center(bigger, (4, 8))[0, 0, 0].tolist() == [1, 1, 2, 2]  # columns 2-5 of 0 0 1 1 2 2 3 3


QUICK = {"prompt": "a red apple", "steps": 3, "seed": 5, "enable_hr": True, "denoising_strength": 0.5}


def test_a_hires_job_makes_the_larger_picture_in_two_passes(services):
    job = services.worker.submit(QUICK | {"hr_scale": 1.5, "hr_second_pass_steps": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.images[0].image.size == (96, 96)
    assert job.progress.step == job.progress.total_steps == 5  # 3 steps, then 2 at the larger size
    text = job.images[0].infotext
    assert ("Size: 64x64, Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent,"
            in text)
    pasted = request_fields_from_infotext(text)
    assert {key: pasted[key] for key in ("enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler",
                                         "denoising_strength", "width")} == {
        "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "hr_upscaler": "Latent",
        "denoising_strength": 0.5, "width": 64}


def test_the_hires_picture_is_reproducible_and_follows_its_settings(services):
    def picture(**fields):
        job = services.worker.submit(QUICK | {"save_images": False} | fields)
        assert job.wait(60) and job.state is JobState.DONE, job.error
        return np.asarray(job.images[0].image, np.int16)

    first = picture(hr_resize_x=96, hr_resize_y=80)
    assert first.shape == (80, 96, 3)
    assert (picture(hr_resize_x=96, hr_resize_y=80) == first).all()
    assert np.abs(picture(hr_resize_x=96, hr_resize_y=80, denoising_strength=0.9) - first).mean() > 1
    assert np.abs(picture(hr_resize_x=96, hr_resize_y=80, hr_upscaler="Lanczos") - first).mean() > 1


@pytest.mark.parametrize("fields, message", [
    ({"hr_scale": 4, "width": 768, "height": 768}, "hr_scale: 768x768 enlarged comes to 3072x3072"),
    # the fields the client set the size with (found by a probe: hr_scale was named)
    ({"hr_resize_x": 50, "hr_resize_y": 50}, "^hr_resize_x, hr_resize_y: 64x64 enlarged comes to 48x48"),
    ({"hr_resize_x": 40}, "^hr_resize_x: 64x64 enlarged comes to 40x40"),
    ({"denoising_strength": 0}, "denoising_strength: hires fix needs a denoising strength above 0"),
    ({"hr_second_pass_steps": 150, "denoising_strength": 0.1}, "make a schedule of 1500 steps, and Euler a takes at"),
    ({"sampler_name": "LCM", "hr_second_pass_steps": 30}, "make a schedule of 60 steps, and LCM takes at most 50"),
    # The second pass's schedule is its own sampler's: LCM there, after Euler.
    ({"sampler_name": "Euler", "hr_sampler_name": "LCM", "hr_second_pass_steps": 30},
     "make a schedule of 60 steps, and LCM takes at most 50"),
    ({"hr_upscaler": "4x-UltraSharp"}, "hr_upscaler: there is no upscaler '4x-UltraSharp' on this server; choose one "
                                       "of None, Lanczos, Nearest"),
])
def test_what_the_hires_fix_cannot_do_is_refused_before_queueing(services, fields, message):
    with pytest.raises(InvalidRequest, match=message):
        services.worker.submit(QUICK | fields)
    assert services.worker.queue_length() == 0


def test_an_lcm_first_pass_does_not_limit_a_hires_pass_with_its_own_sampler():
    request = GenerationRequest(prompt="x", sampler_name="LCM", hr_sampler_name="Euler", enable_hr=True,
                                hr_second_pass_steps=30, denoising_strength=0.5)
    request.check_hires(64, 64)  # a schedule of 60 Euler steps: fine


def test_hires_fix_is_refused_for_img2img():
    request = GenerationRequest(init_image="0" * 40, enable_hr=True, width=64, height=64)
    with pytest.raises(InvalidRequest, match="enable_hr: hires fix is for txt2img"):
        request.check_hires(64, 64)


def test_a_compiled_model_is_told_both_sizes_the_hires_fix_runs(services):
    engine = services.engine
    engine.load("tiny-sd")
    factor = engine.pipe.vae_scale_factor
    latent = GenerationRequest(**QUICK)  # 64 -> 128, decoded at 128 only
    unet = {key[:2] for key in engine._shape_keys(latent, 1)["UNet"]}
    decoder = {key[:2] for key in engine._shape_keys(latent, 1)["VAE decoder"]}
    assert unet == {(64 // factor,) * 2, (128 // factor,) * 2} and decoder == {(128 // factor,) * 2}
    pictures = GenerationRequest(**QUICK, hr_upscaler="Lanczos")  # decodes the first pass too
    assert {key[:2] for key in engine._shape_keys(pictures, 1)["VAE decoder"]} == unet


def test_the_second_passs_prompt_editing_counts_on_from_the_first_as_in_a1111():
    from webui.engine.prompt_schedule import prompt_phases

    def hires(prompt):  # a first pass of 20 steps, then 10 hires steps
        return [(phase.last_step, phase.prompt) for phase in prompt_phases(prompt, "", 10, first_pass_steps=20)]

    assert hires("a [b:c:0.5]") == [(10, "a c")]  # halfway through the first pass: long past
    assert hires("a [b:c:1.5]") == [(5, "a b"), (10, "a c")]  # halfway through the second
    assert hires("a [b:c:25]") == [(5, "a b"), (10, "a c")]  # step 25 of 30


def test_a_full_variation_is_the_variation_seeds_own_picture_in_both_passes(services):
    def picture(**fields):
        job = services.worker.submit(QUICK | {"save_images": False, "sampler_name": "Euler", "hr_scale": 1.5}
                                     | fields)
        assert job.wait(60) and job.state is JobState.DONE, job.error
        return np.asarray(job.images[0].image, np.int16)

    own = picture(seed=7)
    assert (picture(seed=3, subseed=7, subseed_strength=1.0) == own).all()  # the second pass's noise too
    assert np.abs(picture(seed=3, subseed=7, subseed_strength=0.5) - own).mean() > 1


def test_a1111s_none_upscaler_is_a_plain_resize():
    assert GenerationRequest(enable_hr=True, hr_upscaler="None").hr_upscaler == "Lanczos"
    assert GenerationRequest(enable_hr=True, hr_upscaler=None).hr_upscaler == "Latent"


def test_zerogpu_budgets_the_second_pass_at_its_size():
    from webui.zerogpu import gpu_seconds

    plain = GenerationRequest(steps=20, width=512, height=512)
    hires = GenerationRequest(steps=20, width=512, height=512, enable_hr=True, hr_scale=2)
    # 10 s, and 0.15 s a step of 512x512 an image: 20 steps; then 20 more at four times the pixels
    assert gpu_seconds(plain, [1] * 4) == 22 and gpu_seconds(hires, [1] * 4) == 70


def test_a_hires_prompt_is_kept_only_where_it_differs_from_the_prompt():
    def kept(**fields):
        request = GenerationRequest(**(QUICK | fields))
        return request.hr_prompt, request.hr_negative_prompt, request.hires_prompts

    assert kept(negative_prompt="blurry") == (None, None, ("a red apple", "blurry"))
    assert kept(hr_prompt="", hr_negative_prompt="") == (None, None, ("a red apple", ""))  # A1111's "same"
    assert kept(hr_prompt="a red apple", negative_prompt="n", hr_negative_prompt="n") == (None, None,
                                                                                       ("a red apple", "n"))
    assert kept(hr_prompt="a green pear", hr_negative_prompt="dull") == ("a green pear", "dull",
                                                                         ("a green pear", "dull"))
    assert kept(enable_hr=False, hr_prompt="a green pear")[0] is None  # no second pass, no second prompt
    assert kept(hr_prompt="  ", hr_negative_prompt="\n")[:2] == (None, None)  # blank: an infotext keeps no spaces
    with pytest.raises(InvalidRequest, match="hr_prompt: .*control character U\\+0000"):
        parse_request(QUICK | {"hr_prompt": "a\x00b"})
    with pytest.raises(InvalidRequest, match="hr_negative_prompt: .*at most 2000 characters"):
        parse_request(QUICK | {"hr_negative_prompt": "x" * 2001})


def test_the_second_pass_reads_the_hires_prompts():
    from webui.engine.generate import _hires_phases, _phases

    request = GenerationRequest(**QUICK, negative_prompt="blurry", hr_prompt="a [green:red:2] pear <lora:x:0.5>",
                                hr_negative_prompt="dull")
    assert [(phase.prompt, phase.negative) for phase in _phases(request)] == [("a red apple", "blurry")]
    assert [(phase.prompt, phase.negative) for phase in _hires_phases(request)] == [("a red pear ", "dull")]
    at_cfg_1 = GenerationRequest(**QUICK, cfg_scale=1, hr_negative_prompt="dull")  # no negative prompt is read
    assert [phase.negative for phase in _hires_phases(at_cfg_1)] == [""]


def test_a_hires_prompt_changes_only_the_second_pass_and_is_written_and_read_back(services):
    def job(**fields):
        done = services.worker.submit(QUICK | {"save_images": False, "hr_scale": 1.5, "negative_prompt": "dull"}
                                      | fields)
        assert done.wait(60) and done.state is JobState.DONE, done.error
        return done

    plain = np.asarray(job().images[0].image, np.int16)
    assert (np.asarray(job(hr_prompt="a red apple", hr_negative_prompt="").images[0].image, np.int16)
            == plain).all()
    own = job(hr_prompt="a green pear, on a table", hr_negative_prompt="blurry")
    # The tiny test model reads its prompt weakly: any change is the hires prompt's (the same texts gave the same).
    assert (np.asarray(own.images[0].image, np.int16) != plain).any()
    text = own.images[0].infotext
    assert 'Hires prompt: "a green pear, on a table", Hires negative prompt: blurry,' in text
    pasted = request_fields_from_infotext(text)
    assert (pasted["hr_prompt"], pasted["hr_negative_prompt"]) == ("a green pear, on a table", "blurry")
    # An infotext without them had none, with or without the hires fix: a paste clears what the page held.
    pasted = request_fields_from_infotext(job().images[0].infotext)
    assert "Hires prompt" not in job().images[0].infotext
    assert (pasted["enable_hr"], pasted["hr_prompt"], pasted["hr_negative_prompt"]) == (True, "", "")
    plain = request_fields_from_infotext("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64")
    assert (plain["enable_hr"], plain["hr_prompt"], plain["hr_negative_prompt"]) == (False, "", "")


def test_a_hires_prompt_must_name_the_prompts_loras_as_a1111_would_run_them(services):
    """A1111 runs the second pass with the hires prompt's LoRAs alone; one set serves both passes here."""
    from tests.test_lora import kohya_state, lora_pairs, write_lora
    from webui.engine.lora import LoraError

    path = write_lora(services.settings.lora_folder, "detail", kohya_state(lora_pairs()))  # the session's models
    try:
        lora = {"prompt": "a red apple <lora:detail:0.5>"}
        for hires_prompt in ("a green pear <lora:other:1>", "a green pear",  # A1111: no LoRA in the second pass
                             "a green pear <lora:detail:1>"):  # another weight
            with pytest.raises(LoraError, match="hr_prompt: its <lora:...> tags must be the prompt's"):
                services.worker.submit(QUICK | lora | {"hr_prompt": hires_prompt})
        with pytest.raises(LoraError, match="hr_prompt: <lora::0.5> names no LoRA"):
            services.worker.submit(QUICK | {"hr_prompt": "a green pear <lora::0.5>"})
        assert services.worker.queue_length() == 0
        job = services.worker.submit(QUICK | lora | {"hr_prompt": "a green pear <lora:detail:0.5>",
                                                     "save_images": False})
        assert job.wait(60) and job.state is JobState.DONE, job.error
    finally:
        path.unlink()


def test_styles_join_the_hires_prompts_too(services):
    from webui.storage.styles import Style

    services.styles.save(Style("Film", "film still of {prompt}", "cartoon"))
    try:
        styled = services.worker.check(QUICK | {"styles": ["Film"], "hr_prompt": "a green pear"})
        assert styled.hires_prompts == ("film still of a green pear", "cartoon")
        plain = services.worker.check(QUICK | {"styles": ["Film"]})
        assert (plain.prompt, plain.hr_prompt, plain.hires_prompts) == (
            "film still of a red apple", None, ("film still of a red apple", "cartoon"))
    finally:
        services.settings.styles_path.unlink()


def test_the_second_pass_draws_from_fresh_generators_as_a1111(services, monkeypatch):
    """A1111 makes new generators from the seeds for the hires pass: its start noise comes first from them, then an
    ancestral sampler's noise, whatever the first pass drew."""
    import torch

    from webui.engine.generate import Engine

    engine = services.engine
    engine.load("tiny-sd")
    states = []
    denoise = Engine._denoise

    def spy(self, pipe, request, run, *args, **kwargs):
        states.append([generator.get_state() for generator in run.generators])
        return denoise(self, pipe, request, run, *args, **kwargs)

    monkeypatch.setattr(Engine, "_denoise", spy)
    request = GenerationRequest(**QUICK | {"sampler_name": "Euler a", "hr_scale": 1.5})
    engine.generate(request, [21, 22])
    assert len(states) == 2  # the two passes
    channels, factor = engine.pipe.vae.config.latent_channels, engine.pipe.vae_scale_factor
    for seed, state in zip((21, 22), states[1]):
        fresh = torch.Generator("cpu").manual_seed(seed)
        torch.randn((1, channels, 96 // factor, 96 // factor), generator=fresh)  # the hires start noise
        assert torch.equal(state, fresh.get_state())


def test_a_cropped_hires_picture_is_the_part_whose_latents_are_kept():
    """The hires pass gives an inpainting model the enlarged picture cropped as its latents are cropped."""
    factor, blocks = 8, (10, 7)  # a picture of 10 x 7 blocks, each block one latent
    columns, rows = np.meshgrid(np.arange(blocks[0]), np.arange(blocks[1]))
    pixels = np.stack([columns * 20, rows * 30, np.zeros_like(columns)], -1).astype(np.uint8)
    picture = Image.fromarray(pixels.repeat(factor, 0).repeat(factor, 1))
    latents = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    kept = crop_center(latents, (4, 3))[0].permute(1, 2, 0).numpy()
    cropped = crop_center_picture(picture, (4 * factor, 3 * factor), factor)
    assert cropped.size == (32, 24)
    assert (np.asarray(cropped)[::factor, ::factor] == kept).all()
