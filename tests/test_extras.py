"""Extras: pictures resized without a model (webui/extras.py), saved by OutputStore.save_extra, and the tab's
event (webui/ui/extras.py). The REST routes are tested in test_api.py."""
from __future__ import annotations

import io
import os
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.helpers import noise_picture
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, generate, is_skip, through_gradio, ui, ui_services, uploaded  # noqa: F401
from webui.extras import MAX_SIDE, parse_upscale, upscale
from webui.schemas import InvalidRequest
from webui.storage.outputs import OutputStore, read_infotext
from webui.ui.extras import BATCH, SINGLE, ExtrasActions
from webui.ui.params import IMG2IMG_FIELDS
from webui.ui.pictures import UnreadablePicture

INFOTEXT = "a lighthouse\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 48x32"


def halves(width: int, height: int) -> Image.Image:
    """Red on the left half, blue on the right."""
    picture = Image.new("RGB", (width, height), (255, 0, 0))
    picture.paste((0, 0, 255), (width // 2, 0, width, height))
    return picture


def png_file(path, picture: Image.Image, infotext: str | None = INFOTEXT):
    metadata = PngInfo()
    if infotext:
        metadata.add_text("parameters", infotext)
    picture.save(path, pnginfo=metadata)
    return str(path)


# --- resizing ---------------------------------------------------------------------------------
def test_nearest_by_two_repeats_every_pixel_in_a_square_of_four():
    picture = noise_picture(1, 16, 8)
    done = upscale(picture, parse_upscale({"upscaler_1": "Nearest", "upscaling_resize": 2}))
    expected = np.asarray(picture).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(np.asarray(done.image), expected)
    assert done.info == {"Postprocess upscale by": 2.0, "Postprocess upscaler": "Nearest"}
    assert done.infotext == "Postprocess upscale by: 2, Postprocess upscaler: Nearest"


def test_lanczos_makes_the_size_asked_and_keeps_the_colours_of_a_flat_picture():
    done = upscale(Image.new("RGB", (40, 30), (10, 200, 30)), parse_upscale({"upscaling_resize": 2.5,
                                                                             "upscaler_1": "Lanczos"}))
    assert done.image.size == (100, 75)
    assert done.image.getextrema() == ((10, 10), (200, 200), (30, 30))


def test_scale_to_covers_the_size_and_the_crop_keeps_the_middle():
    picture = halves(100, 50)  # scaled by 1.28 to 128x64, then 32 columns cut from each side
    settings = {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64, "upscaler_1": "Nearest"}
    done = upscale(picture, parse_upscale(settings))
    assert done.image.size == (64, 64)
    pixels = np.asarray(done.image)
    assert (pixels[:, :32] == (255, 0, 0)).all() and (pixels[:, 32:] == (0, 0, 255)).all()
    assert done.info == {"Postprocess upscale to": "64x64", "Postprocess crop to": "64x64",
                         "Postprocess upscaler": "Nearest"}

    uncut = upscale(picture, parse_upscale(settings | {"upscaling_crop": False}))
    assert uncut.image.size == (128, 64) and "Postprocess crop to" not in uncut.info


def test_the_second_upscaler_is_blended_in_by_its_visibility():
    picture = noise_picture(2, 24, 24)
    nearest = upscale(picture, parse_upscale({"upscaler_1": "Nearest"})).image
    lanczos = upscale(picture, parse_upscale({"upscaler_1": "Lanczos"})).image
    lanczos_and = {"upscaler_1": "Lanczos", "upscaler_2": "Nearest"}
    all_second = upscale(picture, parse_upscale(lanczos_and | {"extras_upscaler_2_visibility": 1}))
    assert np.array_equal(np.asarray(all_second.image), np.asarray(nearest))
    assert all_second.info["Postprocess upscaler 2"] == "Nearest"
    half = np.asarray(upscale(picture, parse_upscale(lanczos_and | {"extras_upscaler_2_visibility": 0.5})).image)
    half = half.astype(int)
    mean = (np.asarray(nearest).astype(int) + np.asarray(lanczos).astype(int)) / 2
    assert np.abs(half - mean).max() <= 1
    unseen = upscale(picture, parse_upscale(lanczos_and | {"extras_upscaler_2_visibility": 0}))
    assert "Postprocess upscaler 2" not in unseen.info


def test_upscaler_none_leaves_the_picture_and_keeps_its_parameters():
    picture = halves(48, 32)
    picture.info["parameters"] = INFOTEXT
    done = upscale(picture, parse_upscale({"upscaler_1": "None"}))
    assert done.image.size == (48, 32) and done.info == {} and done.infotext == ""
    assert done.texts == {"parameters": INFOTEXT}  # nothing done: no postprocessing text


def test_a_transparent_picture_is_laid_on_white():
    picture = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    done = upscale(picture, parse_upscale({"upscaler_1": "Nearest"}))
    assert done.image.mode == "RGB" and done.image.getextrema() == ((255, 255),) * 3


def test_a_result_past_the_largest_side_is_refused_with_what_to_change():
    with pytest.raises(ValueError, match=f"at most {MAX_SIDE} pixels a side.*smaller factor"):
        upscale(Image.new("RGB", (2000, 10)), parse_upscale({"upscaling_resize": 8, "upscaler_1": "Nearest"}))
    # A crop counts only what it keeps: the uncut picture (8192x819200 here) is never made.
    tall = {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": MAX_SIDE, "upscaling_resize_h": 100}
    assert upscale(Image.new("RGB", (10, 1000)), parse_upscale(tall)).image.size == (MAX_SIDE, 100)
    with pytest.raises(ValueError, match=f"would become {MAX_SIDE}x819200"):
        upscale(Image.new("RGB", (10, 1000)), parse_upscale(tall | {"upscaling_crop": False}))


def test_the_crop_is_the_middle_of_the_whole_picture_resized():
    picture = noise_picture(3, 30, 20)
    settings = {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 24, "upscaling_resize_h": 48}
    whole = picture.resize((72, 48), Image.Resampling.LANCZOS)  # 30x20 scaled by 48/20 to cover 24x48
    assert np.array_equal(np.asarray(upscale(picture, parse_upscale(settings)).image),
                          np.asarray(whole.crop((24, 0, 48, 48))))


@pytest.mark.parametrize("fields, problem", [
    ({"upscaler_1": "x" * 201}, "upscaler_1: an upscaler's name has at most 200 characters"),
    ({"resize_mode": 2}, "resize_mode must be 0 (scale by) or 1 (scale to), got 2"),
    ({"upscaling_resize": 0}, "upscaling_resize: Input should be greater than 0"),
    ({"upscaling_resize": 9}, "upscaling_resize: Input should be less than or equal to 8"),
    ({"upscaling_resize_w": 0}, "upscaling_resize_w: Input should be greater than or equal to 1"),
    ({"extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility: Input should be less than or equal to 1"),
])
def test_bad_settings_are_refused_naming_the_field(fields, problem):
    with pytest.raises(InvalidRequest) as refused:
        parse_upscale(fields)
    assert problem in str(refused.value)


# --- saving -----------------------------------------------------------------------------------
def test_extras_are_numbered_in_their_own_folder_keeping_the_originals_texts(tmp_path):
    store = OutputStore(tmp_path)
    original = halves(8, 8)
    workflow = '{"nodes": [' + ", ".join(['{"id": 1}'] * 20_000) + "]}"  # a ComfyUI workflow: JSON, 200 KB
    original.info |= {"parameters": INFOTEXT, "Software": "another tool", "postprocessing": "an earlier pass",
                      "dpi": (72, 72), "workflow": workflow}
    done = upscale(original, parse_upscale({"upscaler_1": "Nearest"}))
    first = store.save_extra(done.image, done.texts)
    second = store.save_extra(halves(8, 8), {})
    folder = tmp_path / "extras-images"  # one folder, no day folders, as A1111's
    assert (first, second) == (folder / "00000.png", folder / "00001.png")
    with Image.open(first) as saved:
        assert saved.text == {"parameters": INFOTEXT, "Software": "another tool", "workflow": workflow,  # whole
                              "postprocessing": "Postprocess upscale by: 2, Postprocess upscaler: Nearest"}
        assert read_infotext(saved) == INFOTEXT
    with Image.open(second) as saved:
        assert saved.text == {}
    assert folder in store.image_folders()  # served to the browser
    partial = folder / ".partial-left-by-a-crash.png"
    partial.write_bytes(b"half a picture")
    os.utime(partial, (0, 0))
    assert store.remove_partial_files() == 1 and not partial.exists()


# --- the tab's event ----------------------------------------------------------------------------
SETTINGS = {"resize_mode": 0, "upscaling_resize": 2, "upscaling_resize_w": 512, "upscaling_resize_h": 512,
            "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0}


def test_a_single_picture_is_resized_saved_and_shown_from_its_file(tmp_path):
    actions = ExtrasActions(OutputStore(tmp_path / "outputs"))
    gallery, message = actions.run(SINGLE, png_file(tmp_path / "in.png", halves(48, 32)), None, SETTINGS)
    assert len(gallery) == 1 and gallery[0].endswith("00000.png")
    with Image.open(gallery[0]) as saved:
        assert saved.size == (96, 64)
        assert saved.text["parameters"] == INFOTEXT
        assert saved.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert "Postprocess upscale by: 2" in message and "dw-error" not in message


def test_batch_from_directory_resizes_a_server_folders_pictures_where_folders_may_be_read(tmp_path):
    from webui.ui.extras import DIRECTORY

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("b.png", "a.png")):
        png_file(folder / name, noise_picture(i, 16, 16))
    (folder / "notes.txt").write_text("left out")
    actions = ExtrasActions(OutputStore(tmp_path / "outputs"), server_folders=True)
    gallery, message = actions.run(DIRECTORY, None, None, SETTINGS, input_dir=str(folder))
    assert len(gallery) == 2 and "dw-error" not in message
    with Image.open(gallery[0]) as first:  # a.png first, by name
        assert first.size == (32, 32) and np.array_equal(
            np.asarray(first), np.asarray(noise_picture(1, 16, 16).resize((32, 32), Image.Resampling.LANCZOS)))
    # As A1111's, a file it cannot read is left out and the others are resized; the end says which and why.
    (folder / "c.png").write_bytes(b"not a picture")
    cut = io.BytesIO()
    noise_picture(3, 16, 16).save(cut, format="PNG")
    (folder / "d.png").write_bytes(cut.getvalue()[:-60])  # its header reads, its pixels end early
    gallery, message = actions.run(DIRECTORY, None, None, SETTINGS, input_dir=str(folder))
    assert len(gallery) == 2 and "dw-error" not in message
    assert "Batch from Directory: 2 pictures left out, as they could not be read: could not read c.png" in message
    assert "d.png" in message
    lone = tmp_path / "broken"
    lone.mkdir()
    (lone / "c.png").write_bytes(b"not a picture")
    gallery, message = actions.run(DIRECTORY, None, None, SETTINGS, input_dir=str(lone))
    assert is_skip(gallery) and "dw-error" in message and "none of its pictures can be read" in message
    _, message = actions.run(DIRECTORY, None, None, SETTINGS, input_dir=str(tmp_path / "nowhere"))
    assert "Batch from Directory: Input directory" in message and "is no folder on this machine" in message
    _, message = actions.run(DIRECTORY, None, None, SETTINGS, input_dir=" ")
    assert "give the Input directory" in message
    _, message = ExtrasActions(OutputStore(tmp_path / "o2")).run(DIRECTORY, None, None, SETTINGS,
                                                                 input_dir=str(folder))
    assert "reads no folders typed into the page" in message and not (tmp_path / "o2").exists()


def test_a_batch_is_checked_before_any_work_and_stops_at_a_picture_that_fails(tmp_path):
    outputs = tmp_path / "outputs"
    actions = ExtrasActions(OutputStore(outputs))
    good = [png_file(tmp_path / f"{i}.png", noise_picture(i, 16, 16)) for i in range(2)]
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("no picture here")
    gallery, message = actions.run(BATCH, None, [*good, str(not_a_picture)], SETTINGS)
    assert gallery == gr.skip() and "could not read notes.png as an image" in message
    assert not outputs.exists() or not any(outputs.rglob("*.png"))  # nothing was written

    # Pixels that end early are only found when the picture is read: those before it stay saved and shown.
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(png_file(tmp_path / "whole.png", noise_picture(5, 64, 64), None), "rb").read()[:400])
    gallery, message = actions.run(BATCH, None, [*good, str(cut)], SETTINGS)
    assert len(gallery) == 2 and "2 resized and saved; then" in message and "cut.png" in message
    assert len(list(outputs.rglob("*.png"))) == 2

    told = []
    gallery, message = actions.run(BATCH, None, good, SETTINGS | {"upscaler_1": "Nearest"},
                                   lambda number, count: told.append((number, count)))
    assert [Image.open(path).size for path in gallery] == [(32, 32), (32, 32)] and told == [(0, 2), (1, 2)]


def test_a_box_the_resize_mode_leaves_unused_may_be_empty(tmp_path):
    actions = ExtrasActions(OutputStore(tmp_path), {"upscaling_resize_w": "Scale to: width"})
    picture = png_file(tmp_path / "in.png", halves(48, 32))
    cleared = SETTINGS | {"upscaling_resize_w": None, "upscaling_resize_h": 90000}
    gallery, message = actions.run(SINGLE, picture, None, cleared)  # Scale by
    assert Image.open(gallery[0]).size == (96, 64) and "dw-error" not in message
    gallery, message = actions.run(SINGLE, picture, None, cleared | {"resize_mode": 1})
    assert gallery == gr.skip() and "Scale to: width: Input should be a valid integer" in message
    gallery, message = actions.run(SINGLE, picture, None, SETTINGS | {"resize_mode": 1, "upscaling_resize": None,
                                                                    "upscaling_resize_w": 64})
    assert Image.open(gallery[0]).size == (64, 512) and "dw-error" not in message


def test_the_tab_says_what_to_fix(tmp_path):
    actions = ExtrasActions(OutputStore(tmp_path))
    picture = png_file(tmp_path / "in.png", halves(48, 32))
    cases = [
        ((SINGLE, None, None, SETTINGS), "Upload a picture to resize first."),
        ((BATCH, picture, None, SETTINGS), "Batch Process: upload the pictures"),
        ((SINGLE, UnreadablePicture("broken.png", field="Source"), None, SETTINGS),
         "Source: could not read broken.png as an image"),
        ((SINGLE, picture, None, SETTINGS | {"upscaler_1": "ESRGAN_4x"}), "upscaler_1: unknown upscaler"),
        ((SINGLE, picture, None, SETTINGS | {"resize_mode": 1, "upscaling_resize_w": 8192, "upscaling_resize_h": 8192,
                                              "upscaling_crop": False}), "in.png: the 48x32 picture would become"),
    ]
    for args, problem in cases:
        gallery, message = actions.run(*args)
        assert gallery == gr.skip() and problem in message and "dw-error" in message, message
    assert not any(tmp_path.rglob("0*.png"))


def test_a_picture_that_cannot_be_saved_is_shown_all_the_same(tmp_path):
    blocked = tmp_path / "outputs"
    blocked.write_text("a file where the outputs folder should be")
    gallery, message = ExtrasActions(OutputStore(blocked)).run(
        SINGLE, png_file(tmp_path / "in.png", halves(48, 32)), None, SETTINGS)
    assert isinstance(gallery[0], Image.Image) and gallery[0].size == (96, 64)
    assert "Not saved (1)" in message and "dw-error" in message


# --- the tab on the page ------------------------------------------------------------------------
def test_through_gradio_the_radio_gives_the_mode_and_a_broken_upload_is_named(ui, tmp_path):
    wiring = next(fn for fn in ui.blocks.fns.values() if fn.api_name == "extras")
    by_label = {"Resize": "Scale to", "Scale to: width": 40, "Scale to: height": 40}
    values = [by_label.get(getattr(block, "label", None), getattr(block, "value", None)) for block in wiring.inputs]
    values[1] = uploaded(Path(png_file(tmp_path / "in.png", halves(48, 32))))
    gallery, message = through_gradio(ui, "extras", *values)
    assert "Postprocess upscale to: 40x40, Postprocess crop to: 40x40" in message, message
    assert len(gallery) == 1
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    values[1] = uploaded(tmp_path / "junk.png")
    _, message = through_gradio(ui, "extras", *values)
    assert "Source: could not read junk.png as an image" in message and "dw-error" in message


def test_send_to_extras_from_a_gallery_history_and_png_info_keeps_the_parameters(ui, ui_services, tmp_path):
    session = generate(ui, prompt="a lighthouse to enlarge", seed=77)[-1][0]
    [image] = ui_services.worker.get(session.job_id).images
    for name, argument in (("gallery_to_extras", session), ("history_to_extras", image.history_id)):
        sent, subtab, sub_tabs, tabs = event(ui, name)(argument)
        assert Path(sent) == Path(image.path) and subtab == SINGLE
        assert (sub_tabs.selected, tabs.selected) == ("single", "extras")
    sent, *_ = event(ui, "pnginfo_to_extras")(uploaded(Path(image.path)))
    assert Path(sent) == Path(image.path)
    # An unsaved gallery image goes as the picture itself: the page gets it as a PNG, not as a lossy WebP.
    assert ui.extras.image.postprocess(Image.open(sent)).path.endswith(".png")
    gallery, message = ExtrasActions(ui_services.outputs).run(SINGLE, sent, None, SETTINGS)
    with Image.open(gallery[0]) as saved:
        assert saved.size == (128, 128) and saved.text["parameters"] == image.infotext
    # And back, as A1111's Extras sends: the picked result with the parameters it carries, to img2img or inpaint.
    items = [(str(tmp_path / "first.png"), None), (gallery[0], None)]
    Image.new("RGB", (8, 8)).save(items[0][0])
    sent, _, mode, sub_tab, *values, tabs = event(ui, "extras_to_img2img")(items, 1)
    assert sent == gallery[0] and (mode, sub_tab.selected, tabs.selected) == ("img2img", "img2img", "img2img")
    assert dict(zip(IMG2IMG_FIELDS, values))["prompt"] == "a lighthouse to enlarge"
    assert dict(zip(IMG2IMG_FIELDS, values))["width"] == 128  # the picture's size, as any sent picture's
    _, canvas, mode, *_ = event(ui, "extras_to_inpaint")(items, 1)
    assert canvas["background"] == gallery[0] and mode == "Inpaint"
    sent, _, _, _, *values, _ = event(ui, "extras_to_img2img")(items, None)  # nothing picked: the first
    assert sent == items[0][0] and gr.skip() == dict(zip(IMG2IMG_FIELDS, values))["prompt"]
    with pytest.raises(gr.Error, match="Resize a picture first"):
        event(ui, "extras_to_img2img")(None, 0)
    with pytest.raises(gr.Error, match="Generate an image first"):
        event(ui, "gallery_to_extras")(type(session)())
    with pytest.raises(gr.Error, match="Drop a picture first"):
        event(ui, "pnginfo_to_extras")(None)


def test_png_info_shows_what_extras_did_and_the_files_other_text(tmp_path):
    from webui.ui.pnginfo import OTHER_TEXT, read_parameters

    original = halves(16, 16)
    original.info |= {"parameters": INFOTEXT, "Software": "a <b>paint</b> program"}
    done = upscale(original, parse_upscale({"upscaler_1": "Nearest"}))
    saved = OutputStore(tmp_path).save_extra(done.image, done.texts)
    text, table = read_parameters(str(saved))
    assert text == INFOTEXT and table.index("Sampler") < table.index(OTHER_TEXT)
    assert "<th>postprocessing</th><td>Postprocess upscale by: 2, Postprocess upscaler: Nearest</td>" in table
    assert "<th>Software</th><td>a &lt;b&gt;paint&lt;/b&gt; program</td>" in table  # shown as text, not markup
    _, table = read_parameters(png_file(tmp_path / "plain.png", halves(8, 8), None))
    assert OTHER_TEXT not in table and "carries no generation parameters" in table


def test_png_info_sends_the_page_a_bounded_table_of_a_files_other_text(tmp_path):
    from webui.ui.pnginfo import MAX_ROWS, MAX_VALUE_CHARS, read_parameters

    info = PngInfo()
    for number in range(MAX_ROWS + 10):
        info.add_text(f"chunk{number}", "x" * (MAX_VALUE_CHARS + 5 if number == 0 else 10))
    halves(8, 8).save(tmp_path / "many.png", pnginfo=info)
    _, table = read_parameters(str(tmp_path / "many.png"))
    assert table.count("<tr>") == MAX_ROWS + 1 and "10 more not shown" in table
    assert "x" * MAX_VALUE_CHARS + "… (5 more characters)" in table and "x" * (MAX_VALUE_CHARS + 1) not in table
