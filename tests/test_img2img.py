"""img2img's core: fitting the picture, the engine's run from its latents, and the worker's jobs."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.img2img import fit_image, image_sha1, size_from_image
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


@pytest.mark.parametrize("size, expected", [((517, 301), (512, 296)), ((30, 10), (64, 64)),
                                            ((4000, 1000), (2048, 512))])
def test_the_run_size_from_the_picture_is_a_multiple_of_8_within_the_limits(size, expected):
    assert size_from_image(Image.new("RGB", size)) == expected


def test_the_init_image_hash_follows_the_pixels_not_the_file():
    picture = noise_picture(1, 16, 16)
    as_jpeg_then_png = io.BytesIO()
    picture.save(as_jpeg_then_png, format="PNG")
    assert image_sha1(Image.open(as_jpeg_then_png).convert("RGB")) == image_sha1(picture)
    assert image_sha1(noise_picture(2, 16, 16)) != image_sha1(picture)


def test_denoising_steps_are_the_last_steps_times_the_strength():
    assert GenerationRequest(steps=20, denoising_strength=0.5).denoising_steps == 20  # txt2img: all of them
    img2img = GenerationRequest(steps=20, denoising_strength=0.56, init_image="0" * 40)
    assert img2img.denoising_steps == 11
    with pytest.raises(InvalidRequest, match="denoising_strength: 0.04 x 20 steps runs no step"):
        GenerationRequest(steps=20, denoising_strength=0.04, init_image="0" * 40).check_img2img()


def test_the_infotext_gives_the_denoising_strength_back():
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.35"
    assert request_fields_from_infotext(text)["denoising_strength"] == 0.35


# --- the engine -----------------------------------------------------------------------------------
def img2img(engine, picture, seeds, strength=0.6, **fields) -> list[np.ndarray]:
    request = GenerationRequest(prompt="a red apple", steps=4, denoising_strength=strength,
                                init_image=image_sha1(picture), width=picture.width, height=picture.height, **fields)
    return [np.asarray(r.image, np.int16) for r in engine.generate(request, seeds, init_image=picture)]


def test_the_picture_and_the_seed_both_decide_the_result(engine):
    first, second = noise_picture(1), noise_picture(2)
    a, again, other_seed = img2img(engine, first, [5]), img2img(engine, first, [5]), img2img(engine, first, [6])
    other_picture = img2img(engine, second, [5])
    assert (a[0] == again[0]).all()
    assert np.abs(a[0] - other_seed[0]).mean() > 1
    assert np.abs(a[0] - other_picture[0]).mean() > 1


def test_a_low_strength_stays_closer_to_the_picture_than_a_full_one(engine):
    picture = noise_picture(3)
    with torch.inference_mode():  # the tiny VAE is random: compare with the picture as it decodes, not as given
        round_trip = np.asarray(engine._to_images(engine.encode(picture), [0])[0].image, np.int16)
    distance = {strength: np.abs(img2img(engine, picture, [9], strength)[0] - round_trip).mean()
                for strength in (0.25, 0.5, 1.0)}
    assert distance[0.25] < distance[0.5] and distance[0.25] < distance[1.0] * 0.75, distance


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
    assert job.progress.total_steps == 2 and job.progress.step == 2  # 4 steps x 0.5
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


def test_a_transparent_picture_is_read_on_white():
    from webui.engine.img2img import as_rgb

    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert as_rgb(clear).getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("fields, picture, message", [
    ({"denoising_strength": 0.1}, "picture", "denoising_strength: 0.1 x 4 steps runs no step"),
    ({"subseed_strength": 0.3}, "picture", "subseed_strength: variation seeds are not supported with img2img"),
    ({"init_image": "a" * 40}, None, "init_image: give the picture"),
    ({}, "truncated", "init_image: the picture cannot be read"),
    ({"resize_mode": 3}, "picture", "resize_mode"),
])
def test_what_img2img_cannot_do_is_refused_before_queueing(services, fields, picture, message):
    if picture == "truncated":
        data = io.BytesIO()
        noise_picture(1).save(data, format="PNG")
        picture = Image.open(io.BytesIO(data.getvalue()[:400]))  # opens; its pixels fail to load
    elif picture == "picture":
        picture = noise_picture(1)
    with pytest.raises(InvalidRequest, match=message):
        services.worker.submit(QUICK | fields, init_image=picture)
    assert services.worker.queue_length() == 0 and services.history.list_images()[1] == 0
    job = services.worker.submit(QUICK, init_image=noise_picture(1))  # the worker goes on
    assert job.wait(60) and job.state is JobState.DONE, job.error


def test_a_finished_jobs_init_image_counts_towards_the_pixels_it_holds():
    from webui.worker import Job, _pixels_held

    request = GenerationRequest(init_image="0" * 40, width=64, height=96)
    assert _pixels_held(Job(id="j", request=request, origin="ui", init_image=Image.new("RGB", (64, 96)))) == 6144
