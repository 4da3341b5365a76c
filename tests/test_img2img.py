"""img2img's core: fitting the picture, the engine's run from its latents, and the worker's jobs."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.img2img import fit_image, image_sha1, pipeline_strength, scaled_size, size_from_image
from webui.schemas import GenerationRequest, InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext
from webui.storage.outputs import read_infotext
from tests.helpers import noise_picture


def halves(width=40, height=20) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


# --- fitting the picture -------------------------------------------------------------------------
def test_just_resize_stretches_the_whole_picture():
    fitted = fit_image(halves(), 16, 16, 0)
    assert fitted.size == (16, 16)
    assert fitted.getpixel((1, 8))[0] > 200 and fitted.getpixel((14, 8))[2] > 200  # both halves kept


def test_crop_and_resize_fills_the_size_and_cuts_the_sides():
    # 40x20 into 10x20: the height fills, the middle 10 columns of 40 are kept, the outer ones cut.
    fitted = np.asarray(fit_image(halves(), 10, 20, 1), np.int16)
    assert fitted.shape == (20, 10, 3)
    assert fitted[:, :3, 0].min() > 200 and fitted[:, -3:, 2].min() > 200  # red left, blue right, no bars


def test_resize_and_fill_keeps_the_whole_picture_and_fills_the_bars_with_its_edges():
    fitted = np.asarray(fit_image(halves(), 40, 40, 2), np.int16)
    assert fitted.shape == (40, 40, 3)
    # The picture sits in the middle 20 rows; the bars above and below repeat its edge rows, not black.
    assert fitted[0, :15, 0].min() > 200 and fitted[-1, -15:, 2].min() > 200
    assert fitted[:, :, :].sum(axis=2).min() > 200


def test_the_latent_resize_keeps_the_picture_at_its_own_size_for_the_engine_to_stretch():
    assert fit_image(halves(100, 76), 64, 64, 3).size == (96, 72)  # multiples of 8, not the run's 64x64
    assert fit_image(halves(3000, 1000), 64, 64, 3).size == (2048, 680)  # within the size limits


@pytest.mark.parametrize("size, given, expected", [
    ((517, 301), (None, None), (512, 296)), ((30, 10), (None, None), (64, 64)),
    ((4000, 1000), (None, None), (2048, 512)),
    ((200, 100), (128, None), (128, 64)), ((400, 100), (None, 64), (256, 64)),  # one side given: the shape stays
    ((200, 100), (96, 200), (96, 200)),
])
def test_the_run_size_follows_the_picture_where_the_request_gives_none(size, given, expected):
    assert size_from_image(Image.new("RGB", size), *given) == expected


def test_the_init_image_hash_follows_the_pixels_not_the_file():
    picture = noise_picture(1, 16, 16)
    as_jpeg_then_png = io.BytesIO()
    picture.save(as_jpeg_then_png, format="PNG")
    assert image_sha1(Image.open(as_jpeg_then_png).convert("RGB")) == image_sha1(picture)
    assert image_sha1(noise_picture(2, 16, 16)) != image_sha1(picture)


@pytest.mark.parametrize("steps, strength, runs", [(20, 0.75, 16), (20, 0.56, 12), (20, 0.04, 1), (20, 0, 1),
                                                   (20, 1.0, 20), (3, 0.3, 1), (150, 0.999, 150)])
def test_img2img_runs_the_steps_a1111_runs(steps, strength, runs):
    """A1111 runs the last int(steps x strength) + 1 steps (the strength kept below 1), and diffusers does the same
    when given pipeline_strength."""
    assert GenerationRequest(steps=steps, denoising_strength=strength).denoising_steps == steps  # txt2img: all
    request = GenerationRequest(steps=steps, denoising_strength=strength, init_image="0" * 40)
    assert request.denoising_steps == runs
    assert min(int(steps * pipeline_strength(runs, steps)), steps) == runs


def test_the_infotext_gives_the_denoising_strength_back():
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.35"
    assert request_fields_from_infotext(text)["denoising_strength"] == 0.35


# --- the engine -----------------------------------------------------------------------------------
def img2img(engine, picture, seeds, strength=0.1, **fields) -> list[np.ndarray]:
    """The tiny model's random VAE gives latents of little weight against the noise: low strengths show the picture."""
    request = GenerationRequest(**{"prompt": "a red apple", "steps": 10, "denoising_strength": strength,
                                   "init_image": image_sha1(picture), "width": picture.width,
                                   "height": picture.height} | fields)
    return [np.asarray(r.image, np.int16) for r in engine.generate(request, seeds, init_image=picture)]


def test_the_picture_and_the_seed_both_decide_the_result(engine):
    first, second = noise_picture(1), halves(64, 64)  # two random-noise pictures would look alike to the model
    a, again, other_seed = img2img(engine, first, [5]), img2img(engine, first, [5]), img2img(engine, first, [6])
    other_picture = img2img(engine, second, [5])
    assert (a[0] == again[0]).all()
    assert np.abs(a[0] - other_seed[0]).mean() > 1
    assert np.abs(a[0] - other_picture[0]).mean() > 1


def test_euler_a_on_karras_runs_img2img_from_the_picture(engine):
    """Euler a on a custom schedule steps on Euler's scheduler: img2img finds its tail there too."""
    picture = noise_picture(1)
    karras = img2img(engine, picture, [5], 0.5, sampler_name="Euler a", scheduler="Karras")
    assert np.array_equal(img2img(engine, picture, [5], 0.5, sampler_name="Euler a", scheduler="Karras")[0], karras[0])
    assert not np.array_equal(img2img(engine, picture, [5], 0.5, sampler_name="Euler a")[0], karras[0])
    assert np.abs(img2img(engine, picture, [5], 0.5, sampler_name="Euler a", scheduler="Karras", eta_ancestral=0.0)[0]
                  - img2img(engine, picture, [5], 0.5, sampler_name="Euler", scheduler="Karras")[0]).max() <= 1


def test_a_low_strength_stays_closer_to_the_picture_than_a_full_one(engine):
    from webui.engine.generate import to_pil_images

    picture = noise_picture(3)
    with torch.inference_mode():  # the tiny VAE is random: compare with the picture as it decodes, not as given
        round_trip = np.asarray(to_pil_images(engine.decode(engine.encode(picture)))[0], np.int16)
    distance = {strength: np.abs(img2img(engine, picture, [9], strength)[0] - round_trip).mean()
                for strength in (0.0, 0.3, 1.0)}
    assert distance[0.0] < distance[0.3] and distance[0.0] < distance[1.0] * 0.75, distance


def test_image_i_of_an_img2img_batch_equals_a_single_run_with_its_seed(engine):
    picture = noise_picture(4)
    batch = img2img(engine, picture, [20, 21])
    for i, seed in enumerate([20, 21]):
        assert np.abs(batch[i] - img2img(engine, picture, [seed])[0]).max() <= 2


def test_the_engine_refuses_a_picture_without_an_img2img_request_and_the_reverse(engine):
    with pytest.raises(ValueError, match="init image"):
        engine.generate(GenerationRequest(prompt="x", steps=2), [1], init_image=noise_picture(1))
    with pytest.raises(ValueError, match="init image"):
        engine.generate(GenerationRequest(prompt="x", steps=2, init_image="0" * 40), [1])


# --- the worker -----------------------------------------------------------------------------------
QUICK = {"prompt": "a red apple", "steps": 4, "seed": 7, "denoising_strength": 0.5}


def test_an_img2img_job_takes_the_pictures_size_and_saves_where_a1111_does(services):
    picture = noise_picture(5, 90, 75)
    job = services.worker.submit(QUICK | {"batch_size": 2}, init_image=picture)
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.kind == "img2img" and job.request.init_image == image_sha1(picture)
    assert (job.request.width, job.request.height) == (88, 72) and job.images[0].image.size == (88, 72)
    assert job.progress.total_steps == 3 and job.progress.step == 3  # int(4 steps x 0.5) + 1
    assert "/img2img-images/" in job.images[0].path and "img2img-grids" in job.grid_path
    with Image.open(job.images[1].path) as png:
        text = read_infotext(png)
    assert "Steps: 4," in text and "Size: 88x72, Denoising strength: 0.5," in text
    rows, total = services.history.list_images()
    assert total == 2 and rows[0].path.startswith("img2img-images/")
    assert json.loads(services.history.get_job(job.id)["request_json"])["init_image"] == image_sha1(picture)


def test_a_given_size_fits_the_picture_by_the_resize_mode(services):
    job = services.worker.submit(QUICK | {"width": 64, "height": 64, "resize_mode": 1}, init_image=halves())
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.images[0].image.size == (64, 64)
    start = np.asarray(job.init_image, np.int16)  # cropped to its middle: red left, blue right, top to bottom
    assert start.shape == (64, 64, 3) and start[:, :20, 0].min() > 200 and start[:, -20:, 2].min() > 200


@pytest.mark.parametrize("mode, size, enlarged", [
    (0, (32, 16), (64, 64)),  # Just resize: to the run's size itself
    (1, (32, 16), (128, 64)),  # Crop and resize: to cover 64x64 (x4), then cut to it
    (2, (32, 16), (64, 32)),  # Resize and fill: to fit inside (x2), then filled
    (1, (128, 16), (512, 64)),  # wider than the run: covering still enlarges
])
def test_the_upscaler_for_img2img_enlarges_to_the_size_the_mode_scales_to(mode, size, enlarged):
    calls = []

    def enlarge(picture, target):
        calls.append((picture.size, target))
        return picture.resize(target, Image.Resampling.NEAREST)

    fitted = fit_image(noise_picture(1, *size), 64, 64, mode, enlarge=enlarge)
    assert calls == [(size, enlarged)] and fitted.size == (64, 64)
    assert fit_image(noise_picture(1, 128, 128), 64, 64, mode, enlarge=enlarge).size == (64, 64)
    assert len(calls) == 1  # a picture the mode shrinks is resampled alone, as A1111


def test_inpaintings_only_masked_part_is_enlarged_too_and_its_mask_never():
    from webui.engine.inpaint import prepare_inpainting

    calls = []

    def enlarge(picture, target):
        calls.append((picture.size, target))
        return picture.resize(target, Image.Resampling.NEAREST)

    mask = Image.new("L", (100, 100))
    mask.paste(255, (40, 40, 56, 56))
    request = GenerationRequest(prompt="", width=64, height=64, denoising_strength=0.5, inpaint_full_res=True,
                                inpaint_full_res_padding=0, mask_blur=0)
    prepare_inpainting(noise_picture(2, 100, 100), mask, request, enlarge)
    assert calls == [((16, 16), (64, 64))]  # the part drawn, 16x16, to the run's 64x64


def test_the_upscaler_for_img2img_runs_on_the_worker_from_the_settings_or_the_request(services):
    picture = noise_picture(3, 32, 32)
    plain = services.worker.submit(QUICK | {"width": 64, "height": 64}, init_image=picture)
    assert plain.wait(60) and plain.state is JobState.DONE, plain.error
    nearest = np.asarray(picture.resize((64, 64), Image.Resampling.NEAREST), np.int16)
    assert not (np.asarray(plain.init_image, np.int16) == nearest).all()  # Lanczos by default
    services.options.update({"upscaler_for_img2img": "Nearest"})
    job = services.worker.submit(QUICK | {"width": 64, "height": 64}, init_image=picture)
    assert job.request.upscaler_for_img2img == "Nearest"
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert (np.asarray(job.init_image, np.int16) == nearest).all() and job.unfitted is None
    assert not (np.asarray(job.images[0].image) == np.asarray(plain.images[0].image)).all()
    with pytest.raises(InvalidRequest, match="upscaler_for_img2img: .*4x-Nothing"):
        services.worker.submit(QUICK | {"upscaler_for_img2img": "4x-Nothing"}, init_image=picture)
    services.options.update({"upscaler_for_img2img": "None"})
    asked = services.worker.submit(QUICK | {"width": 64, "height": 64, "upscaler_for_img2img": "Nearest"},
                                   init_image=picture)  # the request's own, over the Settings tab's None
    assert asked.wait(60) and (np.asarray(asked.init_image, np.int16) == nearest).all()
    shrunk = services.worker.submit(QUICK | {"width": 64, "height": 64, "upscaler_for_img2img": "Nearest"},
                                    init_image=noise_picture(3, 128, 128))
    assert shrunk.unfitted is None  # nothing to enlarge: no second fit, no pictures held for it
    services.options.update({"upscaler_for_img2img": "4x-Gone"})  # a model file deleted since it was picked
    tiles = services.worker.submit(QUICK | {"sd_upscale": True, "sd_upscale_scale": 2.0, "sd_upscale_overlap": 8,
                                            "width": 64, "height": 64}, init_image=picture)
    assert tiles.wait(60) and tiles.error is None  # SD upscale never reads it, so is never refused over it
    assert shrunk.wait(60)


def test_a_transparent_start_is_laid_on_the_settings_fill_colour_or_the_requests(services):
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    services.options.update({"img2img_background_color": "#00ff00"})
    green = services.worker.submit(QUICK, init_image=clear)
    assert green.request.img2img_background_color == "#00ff00"
    assert green.init_image.getpixel((5, 5)) == (0, 255, 0)
    red = services.worker.submit(QUICK | {"img2img_background_color": "#FF0000"}, init_image=clear,
                                 color_reference=clear)  # Loopback's reference picture: laid on the same colour
    assert red.init_image.getpixel((5, 5)) == (255, 0, 0) and red.request.init_image != green.request.init_image
    assert red.color_reference.getpixel((5, 5)) == (255, 0, 0)
    with pytest.raises(InvalidRequest, match="img2img_background_color"):
        services.worker.submit(QUICK | {"img2img_background_color": "green"}, init_image=clear)
    for job in (green, red):
        assert job.wait(60) and job.state is JobState.DONE, job.error


def test_a_transparent_picture_is_read_on_white_and_a_16_bit_one_in_its_greys():
    from webui.engine.img2img import as_rgb

    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert as_rgb(clear).getpixel((3, 3)) == (255, 255, 255)
    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64))
    grey = np.asarray(as_rgb(ramp), np.int16)
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255 and 100 < grey.mean() < 155


@pytest.mark.parametrize("fields, picture, message", [
    ({"enable_hr": True}, "picture", "enable_hr: hires fix is for txt2img"),
    ({}, "huge", "init_image: the picture is 5000x4000 \\(20 megapixels\\); send one of at most 16.8"),
    ({"init_image": "a" * 40}, None, "init_image: give the picture"),
    ({}, "truncated", "init_image: the picture cannot be read"),
    ({"resize_mode": 4}, "picture", "resize_mode"),
])
def test_what_img2img_cannot_do_is_refused_before_queueing(services, fields, picture, message):
    if picture == "truncated":
        data = io.BytesIO()
        noise_picture(1).save(data, format="PNG")
        picture = Image.open(io.BytesIO(data.getvalue()[:400]))  # opens; its pixels fail to load
    elif picture == "picture":
        picture = noise_picture(1)
    elif picture == "huge":
        picture = Image.new("1", (5000, 4000))
    with pytest.raises(InvalidRequest, match=message):
        services.worker.submit(QUICK | fields, init_image=picture)
    assert services.worker.queue_length() == 0 and services.history.list_images()[1] == 0
    job = services.worker.submit(QUICK, init_image=noise_picture(1))  # the worker goes on
    assert job.wait(60) and job.state is JobState.DONE, job.error


def test_a_finished_jobs_init_image_counts_towards_the_pixels_it_holds():
    from webui.worker import Job, _pixels_held

    request = GenerationRequest(init_image="0" * 40, width=64, height=96)
    assert _pixels_held(Job(id="j", request=request, origin="ui", init_image=Image.new("RGB", (64, 96)))) == 6144


def test_img2img_times_prompt_editing_over_all_the_steps_from_the_first_that_runs():
    from webui.engine.generate import _phases

    def phases(prompt):  # 11 of 20 steps run
        request = GenerationRequest(prompt=prompt, steps=20, denoising_strength=0.5, init_image="0" * 40)
        return [(phase.last_step, phase.prompt) for phase in _phases(request)]

    assert phases("a [b:c:0.25]") == [(5, "a b"), (20, "a c")]  # A1111: step 5 of the run, as in txt2img
    assert phases("a [b:c:15]") == [(15, "a b")]  # the run ends before the switch: c is never read


def test_variation_seeds_move_an_img2img_picture(services):
    def picture(**fields):
        job = services.worker.submit(QUICK | {"save_images": False, "denoising_strength": 0.75} | fields,
                                     init_image=halves(64, 64))
        assert job.wait(60) and job.state is JobState.DONE, job.error
        return job.images[0]

    plain, varied = picture(), picture(subseed=99, subseed_strength=0.6)
    assert np.abs(np.asarray(plain.image, np.int16) - np.asarray(varied.image, np.int16)).mean() > 1
    assert "Variation seed: 99, Variation seed strength: 0.6" in varied.infotext


def test_the_latent_resize_encodes_the_picture_at_its_size_and_stretches_its_latents(engine, monkeypatch):
    picture = fit_image(halves(128, 64), 64, 64, 3)  # the worker keeps it at 128x64
    encoded = []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda image: encoded.append(image.size) or encode(image))
    [stretched] = img2img(engine, picture, [5], resize_mode=3, width=64, height=64)
    assert encoded == [(128, 64)] and stretched.shape == (64, 64, 3)
    [resized] = img2img(engine, fit_image(picture, 64, 64, 0), [5], width=64, height=64)  # pixels, then latents
    assert np.abs(stretched - resized).mean() > 0.5


def test_resize_by_scales_the_pictures_own_size_and_names_the_scales_that_fit():
    assert scaled_size(Image.new("RGB", (500, 300)), 1.5) == (744, 448)  # 750 -> 744, 450 -> 448
    turned = Image.new("RGB", (300, 500))
    exif = turned.getexif()
    exif[0x0112] = 6  # shown turned a quarter: 500 wide
    assert scaled_size(Image.open(_saved_jpeg(turned, exif)), 1) == (496, 296)
    with pytest.raises(ValueError, match=r"would be 4000x16, and sides run from 64 to 2048; this picture's shape fits "
                                         r"no scale: use Resize to"):
        scaled_size(Image.new("RGB", (2000, 10)), 2)


def _saved_jpeg(picture, exif):
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    return buffer


# A1111's "With img2img, do exactly the amount of steps the slider specifies" (img2img_fix_steps)

def test_exact_steps_run_all_the_steps_as_the_end_of_a_longer_schedule(engine, monkeypatch):
    from webui.engine.samplers import make_scheduler

    picture = noise_picture(7)
    base = {"prompt": "a red apple", "steps": 4, "denoising_strength": 0.5, "init_image": image_sha1(picture),
            "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 1.0}
    exact = GenerationRequest(**base, img2img_fix_steps=True)
    assert (exact.denoising_steps, exact.img2img_schedule) == (4, 8)
    plain = GenerationRequest(**base)
    assert (plain.denoising_steps, plain.img2img_schedule) == (3, 4)  # int(4 x 0.5) + 1 of 4, as A1111
    seen = []
    forward = engine.pipe.unet.forward
    monkeypatch.setattr(engine.pipe.unet, "forward",
                        lambda sample, timestep, *a, **k: seen.append(float(timestep)) or forward(sample, timestep, *a, **k))
    steps = []
    engine.generate(exact, [3], lambda step, total, _: steps.append((step, total)), init_image=picture)
    eight = make_scheduler(engine.pipe.scheduler.config, "Euler")
    eight.set_timesteps(8)
    assert seen == pytest.approx([float(t) for t in eight.timesteps[-4:]])  # the last 4 of 8, as A1111
    assert [step for step, _ in steps if step] == [1, 2, 3, 4] and steps[-1][1] == 4


@pytest.mark.parametrize("fields, says", [
    ({"denoising_strength": 0}, "denoising_strength: 0 draws nothing"),
    ({"denoising_strength": 0.01, "steps": 50}, "make a schedule of 5000 steps"),
])
def test_exact_steps_that_cannot_run_are_refused(fields, says):
    from webui.schemas import parse_request

    with pytest.raises(InvalidRequest, match=says):
        parse_request({"prompt": "x", "init_image": "0" * 40, "img2img_fix_steps": True} | fields)
    parse_request({"prompt": "x", "img2img_fix_steps": True} | fields)  # txt2img: not read


def test_exact_steps_come_from_the_settings_and_go_into_the_infotext_and_back(services):
    picture = noise_picture(8)
    request = {"prompt": "x", "steps": 2, "denoising_strength": 0.5, "width": 64, "height": 64}
    services.options.update({"img2img_fix_steps": True})
    try:
        job = services.worker.submit(request, init_image=picture)
        assert job.wait(120) and job.state is JobState.DONE, job.error
    finally:
        services.options.update({"img2img_fix_steps": False})
    infotext = job.images[0].infotext
    assert "Img2img exact steps: True" in infotext
    assert request_fields_from_infotext(infotext)["img2img_fix_steps"] is True
    plain = services.worker.submit(request, init_image=picture)
    assert plain.wait(120) and "Img2img exact steps" not in plain.images[0].infotext
    assert request_fields_from_infotext(plain.images[0].infotext)["img2img_fix_steps"] is False
