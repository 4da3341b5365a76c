"""Poor man's outpainting (webui/outpainting.py, and the img2img tab's section of it)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, ui, ui_services  # noqa: F401
from webui.outpainting import outpaint
from webui.schemas import JobState
from webui.ui.generation import Session


def striped(size=(64, 64)) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, ::2] = (200, 40, 40)
    return Image.fromarray(pixels)


def test_the_canvas_grows_to_a_multiple_of_64_with_the_picture_where_asked():
    grown = outpaint(striped(), pixels=32, mask_blur=4, directions=["left", "right", "up", "down"])
    assert grown.picture.size == (128, 128)  # 64 + 32 + 32
    assert np.array_equal(np.asarray(grown.picture)[32:96, 32:96], np.asarray(striped()))
    mask = np.asarray(grown.mask)
    # Kept: the picture less 2 x 4 pixels on each grown side (the new border blends into it), corners included.
    assert (mask[40:88, 40:88] == 0).all() and (mask[39, 40:88] == 255).all() and (mask[88, 40:88] == 255).all()
    assert (mask[:32] == 255).all() and (mask[:, 96:] == 255).all() and grown.mask_blur == 8


def test_one_direction_takes_all_the_growth_and_the_other_sides_stay():
    grown = outpaint(striped((64, 48)), pixels=40, mask_blur=0, directions=["left"])
    # 64 + 40 rounds up to 128: all 64 pixels on the left; the height is not grown.
    assert grown.picture.size == (128, 48)
    assert np.array_equal(np.asarray(grown.picture)[:, 64:], np.asarray(striped((64, 48))))
    mask = np.asarray(grown.mask)
    assert (mask[:, :64] == 255).all() and (mask[:, 64:] == 0).all()


@pytest.mark.parametrize("pixels, blur, directions, message", [
    (128, 4, [], "direction"), (128, 4, ["sideways"], "direction"), (4, 4, ["left"], "Pixels to expand"),
    (300, 4, ["up"], "Pixels to expand"), (64, -1, ["up"], "Mask blur"),
])
def test_settings_that_cannot_be_used_say_what_to_change(pixels, blur, directions, message):
    with pytest.raises(ValueError, match=message):
        outpaint(striped(), pixels, blur, directions)


def outpainting_run(ui, **fields) -> list:
    return list(event(ui, "img2img")(Session(), "a red barn", steps=3, width=64, height=64, seed=7, model=TINY,
                                     denoising_strength=0.8, **fields))


def test_a_transparent_picture_is_set_on_white_and_an_odd_side_grows_to_a_multiple_of_8_without_stretching():
    grown = outpaint(Image.new("RGBA", (100, 75), (0, 0, 0, 0)), pixels=32, mask_blur=2, directions=["left", "right"])
    assert grown.picture.size == (192, 80)  # 100 + 92 (to 192), and 75 + 5 below
    assert grown.picture.getpixel((46 + 10, 10)) == (255, 255, 255)  # on white, as every img2img picture
    mask = np.asarray(grown.mask)
    # Kept: columns 46 + 4 to 146 - 4 (exclusive), rows to 75; the 5 rows added below are drawn.
    assert (mask[:75, 50:142] == 0).all() and (mask[75:] == 255).all() and (mask[:, [49, 142]] == 255).all()


def test_a_blur_wider_than_the_picture_draws_it_all_and_one_past_the_limit_is_refused():
    assert outpaint(striped(), pixels=8, mask_blur=32, directions=["left", "right"]).mask.getextrema() == (255, 255)
    with pytest.raises(ValueError, match="Mask blur: 33; use 0 to 32"):
        outpaint(striped(), pixels=8, mask_blur=33, directions=["left"])


def test_the_img2img_tab_outpaints_the_picture_on_a_larger_canvas(ui, ui_services):
    start = striped()
    # The Inpaint sub-tab's own settings (mask_blur, inpainting_fill) must not leak in.
    session, *_ = outpainting_run(ui, init_image=start, outpainting=True, outpaint_pixels=32, outpaint_mask_blur=3,
                                  outpaint_fill=0, outpaint_directions=["right"], mask_blur=10,
                                  inpainting_fill=2)[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.state == JobState.DONE, job.error
    result = np.asarray(job.images[0].image, np.int16)
    assert result.shape == (64, 128, 3)
    # The picture is kept left of the strip where the mask's blurred edge blends it in (x 64 - 6, blurred by 6);
    # the new part on the right is drawn.
    assert (result[:, :40] == np.asarray(start, np.int16)[:, :40]).all()
    assert np.abs(result[:, 70:]).mean() > 5  # not the black canvas it started as
    info = job.images[0].infotext
    assert "Mask blur: 6," in info and "Masked content: fill" in info


def test_a_canvas_past_the_size_limits_is_named_with_what_to_change(ui, ui_services):
    *_, (_, _, message, *_) = outpainting_run(ui, init_image=striped((2000, 64)), outpainting=True,
                                              outpaint_pixels=64, outpaint_directions=["left", "right"])
    assert "the canvas would be 2176x64" in message and "expand by fewer pixels" in message


def test_outpainting_refuses_an_inpainting_sub_tab_and_a_second_script(ui, ui_services):
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((20, 20, 20, 200), (0, 0, 32, 64))
    canvas = {"background": striped(), "layers": [layer], "composite": striped()}
    queued = ui_services.worker.queue_length()
    *_, (_, _, message, *_) = outpainting_run(ui, img2img_mode="Inpaint", inpaint_canvas=canvas, outpainting=True)
    assert "makes its own mask" in message
    *_, (_, _, message, *_) = outpainting_run(ui, init_image=striped(), outpainting=True, prompt_matrix=True)
    assert "one of them at a time" in message
    assert ui_services.worker.queue_length() == queued
