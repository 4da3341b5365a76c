"""SD upscale (webui/sd_upscale.py's tiles, the worker's runs of them, and the img2img tab's switch)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY
from tests.helpers import noise_picture, running_services, wait_for
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, ui, ui_services  # noqa: F401
from webui.schemas import JobState
from webui.sd_upscale import TileLayout, tile_layout, tile_starts, upscaled_size
from webui.ui.generation import Session

QUICK = {"prompt": "a red barn", "steps": 3, "seed": 7, "width": 64, "height": 64, "denoising_strength": 0.5,
         "sd_upscale": True, "sd_upscale_overlap": 16}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("sd-upscale-out"))


def finished(services, request: dict, picture: Image.Image):
    job = services.worker.submit(request, init_image=picture)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


# --- the tiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("length, tile, overlap", [(64, 64, 0), (128, 64, 16), (130, 64, 16), (1000, 512, 64),
                                                   (96, 64, 60), (200, 64, 0)])
def test_the_fewest_tiles_cover_the_side_sharing_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile and starts == sorted(set(starts))
    assert all(later - earlier <= tile - overlap for earlier, later in zip(starts, starts[1:]))
    # One tile fewer could not cover the side, however it was laid.
    assert (len(starts) - 1) * tile - (len(starts) - 2) * overlap < length or len(starts) == 1


def test_tiles_cut_from_a_picture_join_back_into_it():
    picture = noise_picture(3, 150, 100)
    layout = TileLayout((150, 100), (64, 48), tuple(tile_starts(150, 64, 16)), tuple(tile_starts(100, 48, 16)))
    assert len(layout.corners) == 3 * 3
    assert np.array_equal(np.asarray(layout.join(layout.cut(picture))), np.asarray(picture))


def test_two_tiles_fade_into_each_other_across_what_they_share():
    layout = TileLayout((100, 64), (64, 64), (0, 36), (0,))  # they share x 36..63
    joined = np.asarray(layout.join([Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")]))
    row = joined[10, :, 0].astype(int)
    assert (row[:36] == 0).all() and (row[64:] == 255).all()
    assert (np.diff(row[36:64]) >= 0).all() and 0 < row[40] < row[50] < row[60] < 255


def test_the_enlarged_size_is_rounded_down_to_a_multiple_of_8_as_a1111s_upscalers_round_it():
    assert upscaled_size((65, 33), 2, "Lanczos") == (128, 64)
    assert upscaled_size((64, 64), 1.5, "Nearest") == (96, 96)
    assert upscaled_size((65, 33), 2, "None") == (65, 33)


@pytest.mark.parametrize("size, tile, overlap, scale, upscaler, message", [
    ((64, 64), (128, 128), 16, 1.5, "Lanczos", r"upscaled picture \(96x96\) is smaller than a tile \(128x128"),
    ((64, 64), (64, 64), 64, 2, "Lanczos", r"Tile overlap \(64\) must be smaller than the tile"),
    ((64, 64), (64, 64), 16, 5, "Lanczos", "Scale Factor 5; use 1 to 4"),
    ((2048, 2048), (512, 512), 64, 2.5, "Lanczos", r"would be 5120x5120; at most 16.8 megapixels"),
    ((2048, 2048), (64, 64), 0, 1, "None", r"32x32 tiles; at most 256.*lower the Tile overlap"),
])
def test_what_cannot_be_tiled_says_what_to_change(size, tile, overlap, scale, upscaler, message):
    with pytest.raises(ValueError, match=message):
        tile_layout(size, tile, overlap, scale, upscaler)


# --- the worker's runs ----------------------------------------------------------------------------
def test_the_first_tile_is_the_img2img_run_of_the_enlarged_pictures_corner(services):
    picture = noise_picture(4, 64, 64)
    job = finished(services, QUICK, picture)
    [image] = job.images
    assert image.image.size == (128, 128) and image.seed == 7 and image.path
    # The same tile drawn by a plain img2img run: the 128 wide picture is 3 tiles of 64 a row, at 0, 32 and 64,
    # so x and y below 32 belong to the first alone.
    corner = picture.resize((128, 128), Image.Resampling.LANCZOS).crop((0, 0, 64, 64))
    plain = finished(services, {key: value for key, value in QUICK.items() if not key.startswith("sd_")}, corner)
    assert np.array_equal(np.asarray(image.image)[:32, :32], np.asarray(plain.images[0].image)[:32, :32])
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in image.infotext
    assert "Size: 64x64" in image.infotext  # a tile's, as A1111 writes it
    rows = [row for row in services.history.list_images()[0] if row.job_id == job.id]
    assert len(rows) == 1 and rows[0].path.endswith(image.path.rsplit("/", 1)[-1])


def test_the_batch_size_draws_tiles_together_without_changing_the_picture(services):
    picture = noise_picture(5, 64, 64)
    one = finished(services, QUICK | {"save_images": False}, picture)
    together = finished(services, QUICK | {"save_images": False, "batch_size": 4, "n_iter": 2}, picture)
    assert len(together.images) == 2 and [image.seed for image in together.images] == [7, 8]
    difference = np.abs(np.asarray(one.images[0].image, int) - np.asarray(together.images[0].image, int))
    assert difference.max() <= 2  # tile t has seed + t either way; a batch differs by rounding only
    assert "Batch size" not in together.images[0].infotext and "Batch pos" not in together.images[0].infotext
    assert not np.array_equal(np.asarray(together.images[0].image), np.asarray(together.images[1].image))


def test_a_cancel_between_tiles_saves_nothing_and_the_worker_goes_on(services, monkeypatch):
    generate, calls, before = services.engine.generate, [], services.history.list_images()[1]

    def cancel_after_the_first_tile(request, seeds, *args, **kwargs):
        calls.append(seeds)
        if len(calls) == 2:
            services.worker.cancel(job.id)
        return generate(request, seeds, *args, **kwargs)

    monkeypatch.setattr(services.engine, "generate", cancel_after_the_first_tile)
    job = services.worker.submit(QUICK, init_image=noise_picture(6))
    assert job.wait(120) and job.state is JobState.CANCELLED
    assert job.images == [] and services.history.list_images()[1] == before and len(calls) == 2
    monkeypatch.undo()
    assert finished(services, QUICK | {"sd_upscale_upscaler": "None", "width": 64, "height": 64},
                    noise_picture(6, 96, 64)).images[0].image.size == (96, 64)  # "None" tiles the picture as it is


@pytest.mark.parametrize("request_fields, picture, mask, message", [
    (QUICK, None, None, "SD upscale enlarges a picture: give the picture to start from"),
    (QUICK, noise_picture(1), Image.new("L", (64, 64), 255), "SD upscale draws the whole picture again"),
    (QUICK | {"width": 192, "height": 192}, noise_picture(1), None, r"smaller than a tile \(192x192"),
    (QUICK | {"sd_upscale_upscaler": "SwinIR"}, noise_picture(1), None,
     "sd_upscale_upscaler: there is no upscaler 'SwinIR' on this server; choose one of None, Lanczos, Nearest"),
])
def test_what_sd_upscale_cannot_do_is_refused_before_queueing(services, request_fields, picture, mask, message):
    with pytest.raises(Exception, match=message):
        services.worker.submit(request_fields, init_image=picture, mask=mask)
    assert services.worker.queue_length() == 0


# --- the img2img tab ---------------------------------------------------------------------------------
def img2img(ui, **fields) -> list:
    return list(event(ui, "img2img")(Session(), "a red barn", steps=3, width=64, height=64, seed=11, model=TINY,
                                     denoising_strength=0.5, **fields))


def test_the_img2img_tab_upscales_with_its_settings(ui, ui_services):
    session, gallery, *_ = img2img(ui, init_image=noise_picture(2, 64, 64), sd_upscale=True, sd_upscale_overlap=32,
                                   sd_upscale_scale=1.5, sd_upscale_upscaler="Nearest")[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.state is JobState.DONE and len(job.images) == 1
    assert job.images[0].image.size == (96, 96) and "SD upscale upscaler: Nearest" in job.images[0].infotext
    # The bar counts all the tiles' steps as one picture's: 4 tiles (2 a side) of 3 steps.
    assert job.progress.image_count == 1 and job.progress.fraction == pytest.approx(1.0)


def test_sd_upscale_is_a_script_of_its_own_and_needs_the_img2img_sub_tab(ui, ui_services):
    before = len(ui_services.worker.waiting_jobs())
    [(_, _, progress, *_)] = img2img(ui, init_image=noise_picture(2), sd_upscale=True, loopback=True)
    assert "a script of their own: use one of them at a time" in progress
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 32, 64))
    [(_, _, progress, *_)] = img2img(ui, img2img_mode="Inpaint upload", inpaint_image=noise_picture(2), mask=mask,
                                     sd_upscale=True)
    assert "SD upscale draws the whole picture again" in progress
    assert len(ui_services.worker.waiting_jobs()) == before


def test_a_flagged_tile_blacks_out_the_whole_picture(services, monkeypatch):
    check_safety, calls = services.engine.check_safety, []

    def flag_the_middle_tile(pictures):
        images, flags = check_safety(pictures)
        calls.append(len(pictures))
        if len(calls) == 5:  # the middle one of 3x3
            return [image.point(lambda _: 0) for image in images], [True]
        return images, flags

    monkeypatch.setattr(services.engine, "check_safety", flag_the_middle_tile)
    job = finished(services, QUICK | {"save_images": False}, noise_picture(9))
    assert len(calls) == 9 and job.images[0].nsfw and "NSFW" in job.images[0].infotext
    assert np.asarray(job.images[0].image).max() == 0  # no fade lets the flagged part show through


def test_a_short_last_batch_is_filled_up_where_only_the_full_batch_size_is_compiled(services, monkeypatch):
    picture = noise_picture(10)
    plain = finished(services, QUICK | {"save_images": False, "batch_size": 4}, picture)
    generate, batches = services.engine.generate, []

    def recorded(request, seeds, *args, **kwargs):
        batches.append(list(seeds))
        return generate(request, seeds, *args, **kwargs)

    monkeypatch.setattr(services.engine, "generate", recorded)
    monkeypatch.setattr(services.engine, "pending_compiles", lambda request, size: [] if size == 4 else ["UNet"])
    filled = finished(services, QUICK | {"save_images": False, "batch_size": 4}, picture)
    assert batches == [[7, 8, 9, 10], [11, 12, 13, 14], [15, 15, 15, 15]]  # 9 tiles: the ninth drawn 4 times
    difference = np.abs(np.asarray(plain.images[0].image, int) - np.asarray(filled.images[0].image, int))
    assert difference.max() <= 2


def test_a_skip_ends_the_picture_being_made_and_the_next_batch_count_goes_on(services, monkeypatch):
    generate, calls = services.engine.generate, []

    def skip_in_the_first_picture(request, seeds, *args, **kwargs):
        calls.append(seeds)
        if len(calls) == 2:
            wait_for(lambda: job.state is JobState.RUNNING)
            services.worker.skip(job.id)
        return generate(request, seeds, *args, **kwargs)

    monkeypatch.setattr(services.engine, "generate", skip_in_the_first_picture)
    job = services.worker.submit(QUICK | {"n_iter": 2, "save_images": False}, init_image=noise_picture(11))
    assert job.wait(120) and job.state is JobState.DONE, job.error
    assert [image.seed for image in job.images] == [8]  # the first picture (seed 7) was skipped
    assert calls[2][0] == 8 and len(calls) == 2 + 9


def test_tiling_does_not_go_with_sd_upscale(services):
    with pytest.raises(Exception, match="tiling: SD upscale draws the picture in tiles"):
        services.worker.submit(QUICK | {"tiling": True}, init_image=noise_picture(1))
