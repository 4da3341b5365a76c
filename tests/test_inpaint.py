"""Inpainting: reading the mask, the start and the region drawn, laying the result in, the engine's run that
keeps the picture outside the mask, and the worker's jobs and infotext."""
import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.img2img import image_sha1
from webui.engine.inpaint import expand_to_shape, fill_masked, prepare_inpainting, read_mask
from webui.schemas import GenerationRequest, InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext
from webui.storage.outputs import read_infotext
from tests.helpers import noise_picture, reported_steps, wait_for


def square_mask(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    """Black, with a white box: draw again inside the box."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def request_for(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red apple", "steps": 10, "denoising_strength": 0.1} | fields)


def pixels(picture) -> np.ndarray:
    return np.asarray(picture, np.int16)


# --- the mask ------------------------------------------------------------------------------------
def test_a_painted_layer_is_read_by_its_alpha_and_a_plain_mask_by_its_brightness():
    layer = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    layer.paste((30, 30, 30, 255), (0, 0, 5, 10))  # a dark brush stroke: opaque counts, not its colour
    assert pixels(read_mask(layer, (20, 10)))[:, :5].min() == 255
    assert pixels(read_mask(layer, (20, 10)))[:, 5:].max() == 0
    grey = Image.new("RGB", (20, 10), (100, 100, 100))
    grey.paste((200, 200, 200), (10, 0, 20, 10))
    read = pixels(read_mask(grey, (20, 10)))
    assert read[:, :10].max() == 0 and read[:, 10:].min() == 255  # rounded at half


def test_a_mask_of_another_size_is_stretched_over_the_picture():
    read = read_mask(square_mask((10, 10), (0, 0, 5, 10)), (40, 20))
    assert read.size == (40, 20)
    assert pixels(read)[:, :20].min() == 255 and pixels(read)[:, 20:].max() == 0


@pytest.mark.parametrize("mask, invert", [(Image.new("L", (64, 64), 0), 0), (Image.new("L", (64, 64), 255), 1)])
def test_a_mask_that_leaves_nothing_to_draw_is_refused(mask, invert):
    with pytest.raises(ValueError, match="the mask is empty"):
        prepare_inpainting(noise_picture(1), mask, request_for(inpainting_mask_invert=invert))


def test_fill_paints_the_masked_part_with_the_colours_around_it():
    picture = Image.new("RGB", (64, 64), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 32, 64))  # red left, blue right
    mask = square_mask(box=(4, 20, 20, 44))  # inside the red half, but near its left edge
    filled = pixels(fill_masked(picture, mask))
    assert (filled[mask_array(mask) == 0] == pixels(picture)[mask_array(mask) == 0]).all()  # the rest untouched
    inside = filled[24:40, 6:18]
    assert inside[..., 0].min() > 150 and inside[..., 2].max() < 100  # red, from around it, not the blue


def test_fill_fades_into_the_picture_through_the_masks_blurred_edge():
    picture = noise_picture(9, 64, 64)
    edge = Image.linear_gradient("L").resize((64, 64))  # 0 at the top to 255 at the bottom, row by row
    filled, original = pixels(fill_masked(picture, edge)), pixels(picture)
    cover = np.asarray(edge, np.int16)[..., None]
    # Each pixel moves from the picture's colour by at most as much as the mask covers it.
    assert (np.abs(filled - original) <= cover + 1).all()
    assert np.abs(filled[-4:] - original[-4:]).mean() > 20  # where the mask covers it all: painted over


@pytest.mark.parametrize("blur", [0, 4, 8])
def test_fill_paints_a_masked_object_over_whatever_the_masks_blur(blur):
    """A1111's fill paints the whole masked object in the colours around it; here a blurred mask's nearly covered
    pixels lent it their full colour, so at Mask blur 4 a third of the object came back, at 8 nearly all of it
    (found by a probe)."""
    from PIL import ImageFilter

    picture = Image.new("RGB", (128, 128), (40, 160, 40))
    picture.paste((255, 0, 0), (40, 40, 88, 88))
    mask = square_mask(box=(32, 32, 96, 96), size=(128, 128))
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    inside = pixels(fill_masked(picture, mask))[40:88, 40:88].astype(int)
    red = (inside[..., 0] > 170) & (inside[..., 1] < 150)
    assert red.sum() == 0, red.sum()
    assert np.abs(inside[24, 24] - (40, 160, 40)).max() < 40  # its middle: the green around it


def test_only_masked_fills_a_part_the_mask_covers_whole_from_the_picture_around_it():
    """With no padding and no blur the part cut out is all masked: the fill had no colours to take and left the
    object as it was, the same as Masked content: original (found by a probe)."""
    picture = Image.new("RGB", (128, 128), (40, 160, 40))
    picture.paste((255, 0, 0), (32, 32, 96, 96))
    mask = square_mask(box=(32, 32, 96, 96), size=(128, 128))
    fields = dict(inpaint_full_res=True, inpaint_full_res_padding=0, mask_blur=0, width=64, height=64)
    _, _, filled, _ = prepare_inpainting(picture, mask, request_for(inpainting_fill=0, **fields))
    _, _, original, _ = prepare_inpainting(picture, mask, request_for(inpainting_fill=1, **fields))
    assert pixels(original)[..., 0].min() > 200  # the red object
    assert pixels(filled)[..., 0].max() < 100 and pixels(filled)[..., 1].min() > 120  # the green around it


def test_fill_far_from_the_kept_part_takes_its_nearest_colours_not_the_pictures_mean():
    """Three quarters masked: its top-left takes the red kept above, its bottom-left the blue kept below, as A1111's
    fill does (194, 0, 60 at the corner); laid over the picture's mean instead, both came out purple (133, 0, 122).
    Found by review."""
    picture = Image.new("RGB", (512, 512), (0, 255, 0))
    picture.paste((255, 0, 0), (384, 0, 512, 256))
    picture.paste((0, 0, 255), (384, 256, 512, 512))
    mask = square_mask(size=(512, 512), box=(0, 0, 384, 512))
    filled = pixels(fill_masked(picture, mask)).astype(int)
    top, bottom = filled[0, 0], filled[-1, 0]
    assert top[0] > 2 * top[2] and bottom[2] > 2 * bottom[0], (top, bottom)
    assert filled[..., 1].max() <= 1  # the green is all masked: none of it comes back


@pytest.mark.parametrize("only_masked", [False, True])
def test_fill_with_a_mask_over_the_whole_picture_starts_from_black_as_a1111s(only_masked):
    """Nothing kept, no colour to take: the start was the picture as it was (Masked content: original). Found by
    review."""
    picture = noise_picture(3)
    fields = dict(inpaint_full_res=only_masked, inpaint_full_res_padding=0, mask_blur=0, width=64, height=64)
    _, _, filled, _ = prepare_inpainting(picture, Image.new("L", (64, 64), 255), request_for(inpainting_fill=0,
                                                                                             **fields))
    assert pixels(filled).max() == 0


def test_a_16_bit_mask_is_read_by_its_greys_not_clipped_to_white():
    levels = np.full((64, 64), 3000, np.uint16)  # nearly black in 16 bits
    levels[16:48, 16:48] = 65535
    mask = read_mask(Image.fromarray(levels), (64, 64))
    assert np.count_nonzero(np.asarray(mask)) == 32 * 32


def test_the_kept_part_is_not_put_back_half_way_through_a_two_call_step():
    from webui.engine.generate import _MaskedStart

    class HalfWay:  # DPM2 and DPM++ SDE between their two model calls
        state_in_first_order = False

    class Pipe:
        scheduler, num_timesteps = HalfWay(), 4

    masked = _MaskedStart(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8), torch.ones(1, 1, 8, 8))
    latents = torch.full((1, 4, 8, 8), 3.0)
    assert masked.put_back(Pipe(), 0, latents) is latents


def mask_array(mask) -> np.ndarray:
    return np.asarray(mask)


# --- the region drawn and laying the result in -------------------------------------------------------
@pytest.mark.parametrize("box, shape, bounds, expected", [
    ((10, 10, 30, 20), (64, 64), (100, 100), (10, 5, 30, 25)),  # too flat: taller, about its middle
    ((40, 10, 50, 30), (128, 64), (100, 100), (25, 10, 65, 30)),  # too narrow: wider, about its middle
    ((0, 0, 20, 10), (64, 64), (100, 100), (0, 0, 20, 20)),  # at the edge: moved inside
    ((0, 40, 100, 60), (64, 128), (100, 100), (0, 0, 100, 100)),  # cannot fit: cut at the picture
])
def test_the_region_grows_to_the_runs_shape_inside_the_picture(box, shape, bounds, expected):
    assert expand_to_shape(box, *shape, bounds) == expected


def test_whole_picture_fits_picture_and_mask_to_the_run_and_lays_only_the_masked_part_in():
    picture = noise_picture(1, 256, 128)
    mask = square_mask((256, 128), (128, 0, 256, 128))  # the right half
    width, height, start, inpainting = prepare_inpainting(picture, mask, request_for(width=128, height=64,
                                                                                       mask_blur=0))
    assert (width, height) == (128, 64) and start.size == (128, 64) and inpainting.mask.size == (128, 64)
    drawn = Image.new("RGB", (128, 64), (0, 255, 0))
    result = pixels(inpainting.compose(drawn))
    assert (result[:, :63] == pixels(start)[:, :63]).all()  # the kept half is the picture's
    assert (result[:, 65:] == (0, 255, 0)).all()  # the masked half is the drawn picture


def test_only_masked_draws_the_region_at_the_runs_size_and_pastes_it_back():
    picture = noise_picture(2, 200, 100)
    mask = square_mask((200, 100), (100, 40, 120, 60))
    width, height, start, inpainting = prepare_inpainting(
        picture, mask, request_for(width=64, height=64, mask_blur=0, inpaint_full_res=True,
                                   inpaint_full_res_padding=10))
    assert (width, height) == (64, 64) and start.size == (64, 64)
    assert inpainting.box == (90, 30, 130, 70)  # the mask with 10 pixels around it, square as the run
    result = pixels(inpainting.compose(Image.new("RGB", (64, 64), (0, 255, 0))))
    assert result.shape == (100, 200, 3)  # the whole picture comes back
    outside = mask_array(mask) == 0
    assert (result[outside] == pixels(picture)[outside]).all()
    assert (result[42:58, 102:118] == (0, 255, 0)).all()


def test_without_the_overlay_the_part_drawn_shows_whole_as_the_model_drew_it():
    """A1111's Overlay original for inpaint off: no laying in through the mask (Only masked: its rectangle)."""
    picture = noise_picture(1, 128, 64)
    mask = square_mask((128, 64), (64, 0, 128, 64))
    drawn = noise_picture(9, 128, 64)
    _, _, _, whole = prepare_inpainting(picture, mask, request_for(width=128, height=64, mask_blur=4,
                                                                   overlay_inpaint=False))
    assert (pixels(whole.compose(drawn)) == pixels(drawn)).all()  # the kept half too is the model's
    soft = Image.new("L", (128, 64), 0)  # soft inpainting's own overlay is laid in whatever the setting, as A1111
    assert (pixels(whole.compose(drawn, soft)) == pixels(whole.original)).all()
    _, _, _, laid = prepare_inpainting(picture, mask, request_for(width=128, height=64, mask_blur=4))
    assert (pixels(laid.compose(drawn))[:, :40] == pixels(picture)[:, :40]).all()  # by default, laid in
    only = request_for(width=64, height=64, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=10,
                       overlay_inpaint=False)
    picture, mask = noise_picture(2, 200, 100), square_mask((200, 100), (100, 40, 120, 60))
    _, _, _, masked = prepare_inpainting(picture, mask, only)
    result = pixels(masked.compose(Image.new("RGB", (64, 64), (0, 255, 0))))
    assert (result[30:70, 90:130] == (0, 255, 0)).all()  # the whole rectangle drawn, its unmasked rim too
    assert (result[:, :90] == pixels(picture)[:, :90]).all()  # the rest of the picture stays


def test_only_masked_without_a_size_draws_the_region_512_on_its_longer_side():
    picture = noise_picture(2, 300, 300)
    width, height, _, inpainting = prepare_inpainting(
        picture, square_mask((300, 300), (100, 100, 200, 150)),
        request_for(mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=0))
    assert (width, height) == (512, 256)
    assert inpainting.box == (100, 100, 200, 150)


# --- the engine ---------------------------------------------------------------------------------------
def inpaint(engine, picture, mask, seeds=(5,), on_step=None, **fields) -> list[np.ndarray]:
    request = request_for(**fields)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    return [pixels(r.image) for r in engine.generate(request, list(seeds), on_step, init_image=start,
                                                     inpainting=inpainting)]


def test_a_mask_over_everything_draws_as_img2img_does(engine):
    picture = noise_picture(3)
    everything = inpaint(engine, picture, Image.new("L", (64, 64), 255), mask_blur=0)
    request = request_for(init_image=image_sha1(picture), width=64, height=64)
    plain = pixels(engine.generate(request, [5], init_image=picture)[0].image)
    assert (everything[0] == plain).all()


def test_the_picture_outside_the_mask_stays_and_the_latents_end_as_the_pictures_there(engine, monkeypatch):
    picture = noise_picture(4)
    mask = square_mask(box=(0, 0, 32, 64))  # the left half
    reported, previews = reported_steps(monkeypatch), []
    result = inpaint(engine, picture, mask, on_step=lambda step, total, latents: latents is not None and previews.append(latents.clone()),
                     mask_blur=0, denoising_strength=0.5)[0]
    steps = [latents for latents, _ in reported]
    assert (result[:, 32:] == pixels(picture)[:, 32:]).all()
    assert np.abs(result[:, :32] - pixels(picture)[:, :32]).mean() > 5  # drawn again
    with torch.inference_mode():
        start = engine.encode(picture)
    kept = (slice(None), slice(None), slice(None), slice(start.shape[-1] // 2, None))  # the latents' right half
    assert torch.equal(steps[-1][kept], start[kept])  # after the last step: exactly the picture's
    # Before it, the picture's noised to where the run stands: far from the picture, still away from the drawn part.
    assert (steps[0][kept] - start[kept]).abs().mean() > 0.1
    # The live preview shows where the run is heading: the sampler's estimate, the kept part the picture's own
    assert all(torch.equal(preview[kept], start[kept]) for preview in previews)
    drawn = (slice(None), slice(None), slice(None), slice(None, start.shape[-1] // 2))
    assert torch.equal(previews[0][drawn], reported[0][1][drawn])


def test_latent_masked_content_starts_the_masked_part_elsewhere(engine):
    picture = noise_picture(5)
    mask = square_mask()
    results = {fill: inpaint(engine, picture, mask, inpainting_fill=fill, mask_blur=0, denoising_strength=0.3)[0]
               for fill in range(4)}
    outside = mask_array(mask) == 0
    for fill in range(4):
        assert (results[fill][outside] == pixels(picture)[outside]).all()
    inside = mask_array(mask) > 0
    for fill in (0, 2, 3):
        assert np.abs(results[fill][inside] - results[1][inside]).mean() > 1, fill


# --- the worker -----------------------------------------------------------------------------------
def submit_and_wait(services, picture, mask, **fields):
    job = services.worker.submit({"prompt": "a red apple", "steps": 3, "seed": 4, **fields}, init_image=picture,
                                 mask=mask)
    wait_for(lambda: job.state.finished, what="the inpainting job")
    return job


def test_an_inpainting_job_saves_its_picture_with_the_inpainting_keys(services):
    picture = noise_picture(6, 96, 64)
    job = submit_and_wait(services, picture, square_mask((96, 64), (10, 10, 40, 40)), inpainting_fill=0,
                          inpainting_mask_invert=1, mask_blur=3, denoising_strength=0.5)
    assert job.state == JobState.DONE, job.error
    assert job.request.mask == image_sha1(read_mask(square_mask((96, 64), (10, 10, 40, 40)), (96, 64)))
    assert "img2img-images" in job.images[0].path
    infotext = read_infotext(Image.open(job.images[0].path))
    assert "Mask blur: 3, Mask mode: Inpaint not masked, Masked content: fill" in infotext
    assert "Inpaint area" not in infotext
    pasted = request_fields_from_infotext(infotext)
    assert (pasted["mask_blur"], pasted["inpainting_mask_invert"], pasted["inpainting_fill"],
            pasted["inpaint_full_res"]) == (3, 1, 0, False)


def test_an_only_masked_job_returns_the_whole_picture_and_says_so(services):
    picture = noise_picture(7, 160, 96)
    job = submit_and_wait(services, picture, square_mask((160, 96), (60, 30, 90, 60)), inpaint_full_res=True,
                          inpaint_full_res_padding=8, width=64, height=64)
    assert job.state == JobState.DONE, job.error
    assert job.images[0].image.size == (160, 96)
    infotext = job.images[0].infotext
    assert "Size: 64x64" in infotext and "Inpaint area: Only masked, Masked area padding: 8" in infotext
    assert request_fields_from_infotext(infotext)["inpaint_full_res_padding"] == 8


def test_the_overlay_is_the_settings_tabs_unless_the_request_says(services):
    picture, mask = noise_picture(6, 64, 64), square_mask((64, 64), (32, 0, 64, 64))
    laid = submit_and_wait(services, picture, mask, mask_blur=0, denoising_strength=0.6)
    assert laid.request.overlay_inpaint is True
    assert (pixels(laid.images[0].image)[:, :28] == pixels(picture)[:, :28]).all()
    services.options.update({"overlay_inpaint": False})
    raw = submit_and_wait(services, picture, mask, mask_blur=0, denoising_strength=0.6)
    assert raw.request.overlay_inpaint is False
    assert not (pixels(raw.images[0].image)[:, :28] == pixels(picture)[:, :28]).all()  # the model's kept half
    again = submit_and_wait(services, picture, mask, mask_blur=0, denoising_strength=0.6, overlay_inpaint=True)
    assert (pixels(again.images[0].image) == pixels(laid.images[0].image)).all()


def test_only_masked_runs_whatever_the_resize_mode_since_it_crops_the_part_itself(services):
    job = submit_and_wait(services, noise_picture(7, 96, 64), square_mask((96, 64), (40, 20, 60, 40)),
                          inpaint_full_res=True, resize_mode=3, width=64, height=64)
    assert job.state == JobState.DONE, job.error
    assert job.images[0].image.size == (96, 64)


@pytest.mark.parametrize("mask, picture, message", [
    (Image.new("L", (64, 64), 0), noise_picture(1), "mask: the mask is empty"),
    (square_mask(), None, "init_image: inpainting needs the picture"),
    ("not a picture", noise_picture(1), "mask: expected a picture"),
])
def test_a_mask_that_cannot_be_used_is_refused_at_submit(services, mask, picture, message):
    with pytest.raises(InvalidRequest, match=message):
        services.worker.submit({"prompt": "x"}, init_image=picture, mask=mask)
    assert services.worker.queue_length() == 0


def test_pasting_an_inpainting_infotext_gives_a1111s_defaults_for_the_keys_left_out():
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.4, Mask blur: 4"
    pasted = request_fields_from_infotext(text)
    assert (pasted["mask_blur"], pasted["inpainting_fill"], pasted["inpaint_full_res"],
            pasted["inpaint_full_res_padding"], pasted["inpainting_mask_invert"]) == (4, 1, False, 32, 0)
    assert "mask_blur" not in request_fields_from_infotext(text.replace(", Mask blur: 4", ""))
