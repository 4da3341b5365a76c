"""The img2img tab in-process: the same builder and actions as txt2img, with a picture to start from.

Runs on the tiny model at 64x64 with 2-3 steps; the one long job (to resume) is interrupted once it runs.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from tests.conftest import TINY
from tests.helpers import wait_for
# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, generate, input_labels, is_skip, selected, through_gradio, ui, ui_services, uploaded  # noqa: F401
from webui.schemas import InvalidRequest, JobState
from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS
from webui.ui.generation import REQUEST_DEFAULTS, Session, busy_button
from webui.ui.pictures import ALL_SUBTAB_INPUTS, SUBTAB_INPUTS, UnreadablePicture


def picture(color="red", size=(80, 48)) -> Image.Image:
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill="blue")
    return image


def img2img(ui, session: Session | None = None, init_image=None, denoising_strength=0.67, resize_mode=1,
            prompt="a red barn", steps=3, seed=7) -> list:
    """Run the img2img event to the end, as Gradio calls it (its api_name is "img2img"); every yielded tuple."""
    return list(event(ui, "img2img")(session or Session(), prompt, steps=steps, width=64, height=64, seed=seed,
                                     model=TINY, init_image=init_image, denoising_strength=denoising_strength,
                                     resize_mode=resize_mode))


def by_field(names, values) -> dict:
    return dict(zip(names, values))


def test_the_img2img_tab_sits_between_txt2img_and_history_with_its_own_widgets(ui):
    config = ui.blocks.get_config_file()
    tabs = [c["props"]["elem_id"] for c in config["components"] if c["props"].get("elem_id", "").startswith("tab_")]
    assert tabs == ["tab_txt2img", "tab_img2img", "tab_extras", "tab_history", "tab_pnginfo", "tab_merger",
                    "tab_train", "tab_settings"]
    labels = input_labels(ui, "img2img")
    assert [labels[name] for name in ("prompt", "styles", "init_image", "denoising_strength", "resize_mode")] == [
        "Prompt", "Styles", "Image", "Denoising strength", "Resize mode"]
    [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == "img2img"]
    assert all(block.elem_id.startswith("img2img_") for block in wiring.inputs[1:] if block.elem_id
               and block not in (ui.picker.dropdown, ui.picker.vae))
    denoising, resize_mode = ui.img2img.widgets["denoising_strength"], ui.img2img.widgets["resize_mode"]
    assert (denoising.minimum, denoising.maximum, denoising.step, denoising.value) == (0, 1, 0.01, 0.75)
    assert resize_mode.type == "index" and [c[0] for c in resize_mode.choices] == ["Just resize", "Crop and resize",
                                                                                   "Resize and fill",
                                                                                   "Just resize (latent upscale)"]
    assert ui.img2img.widgets["width"].value == 64  # "Resize to": the model's size, as txt2img's


def test_img2img_generate_starts_from_the_picture_and_saves_under_img2img_images(ui, ui_services):
    session, gallery, progress, _, infotext, timing = img2img(ui, init_image=picture())[-1]
    assert progress == "" and "Time taken:" in timing
    job = ui_services.worker.get(session.job_id)
    assert job.state is JobState.DONE and job.kind == "img2img" and job.request.resize_mode == 1
    assert "Denoising strength: 0.67" in infotext and "Size: 64x64" in infotext
    [(path, caption)] = gallery
    assert caption == "seed 7" and Image.open(path).size == (64, 64)
    assert Path(path).relative_to(ui_services.outputs.outdir).parts[0] == "img2img-images"
    # The picture is what it starts from: another one, with the same seed and settings, gives another image.
    other = img2img(ui, init_image=picture("green"))[-1][1][0][0]
    assert Image.open(path).tobytes() != Image.open(other).tobytes()


def test_generate_without_a_picture_or_with_an_unreadable_one_says_so_and_queues_nothing(ui, ui_services, tmp_path,
                                                                                          monkeypatch):
    worker, queued = ui_services.worker, []
    submit = worker.submit

    def recorded_submit(*args, **kwargs):
        queued.append(submit(*args, **kwargs))
        return queued[-1]

    monkeypatch.setattr(worker, "submit", recorded_submit)
    [(session, _, progress, *_)] = img2img(ui, init_image=None)
    assert "Upload a picture to start from" in progress and "dw-error" in progress and session.job_id is None
    # Uploads as the browser sends them, through Gradio's preparation of the inputs.
    [wiring] = [fn for fn in ui.blocks.fns.values() if fn.api_name == "img2img"]
    raw = {"Prompt": "a red barn", "Negative prompt": "", "Sampling method": "Euler a", "Schedule type": "Automatic",
           "Sampling steps": 2, "Width": 64, "Height": 64, "Seed (-1 = random)": 1, "Batch count": 1,
           "Batch size": 1, "CFG scale": 7, "Clip skip": 1, "Stable Diffusion checkpoint": TINY,
           "Variation seed (-1 = random)": -1, "Variation strength": 0, "Resize seed from width": 0,
           "Resize seed from height": 0, "Tiling": False, "Scale": 1, "Styles": [], "Denoising strength": 0.5,
           "Resize mode": "Just resize", "Mask blur": 4, "Mask mode": "Inpaint masked", "Masked content": "original",
           "Inpaint area": "Whole picture", "Only masked padding, pixels": 32, "Pixels to expand": 128,
           "Outpainting direction": ["left", "right", "up", "down"], "Loops": 4, "Final denoising strength": 0.5,
           "Denoising strength curve": "Linear", "Input directory": "", "Inpaint batch mask directory": "",
           "Tile overlap": 64, "Scale Factor": 2, "Upscaler": "Lanczos", "Refiner": False, "Checkpoint": "None",
           "Switch at": 0.8, "Preprocessor": "none", "Control Weight": 1, "Starting Control Step": 0,
           "Ending Control Step": 1, "Preprocessor Resolution": 512, "Canny Low Threshold": 100,
           "Canny High Threshold": 200, "Resize Mode": "Crop and Resize",  # ControlNet's
           "Ignore negative prompt during early sampling": 0, "Negative Guidance minimum sigma": 0,
           "Noise multiplier for img2img": 1, "Extra noise multiplier for img2img and hires fix": 0,  # Sampler's
           "Token merging ratio": 0}

    def given(block):  # what the page sends: the value above, else the control's own starting value
        return raw.get(getattr(block, "label", None), getattr(block, "value", None))

    (tmp_path / "junk.png").write_bytes(b"not a png")
    picture().save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])  # opens, but its pixels end early
    for name in ("junk.png", "cut.png"):
        inputs = [uploaded(tmp_path / name) if block is ui.img2img.widgets["init_image"]
                  else given(block) for block in wiring.inputs]
        progress = through_gradio(ui, "img2img", *inputs)[2]
        assert f"Image: could not read {name} as an image" in progress and "dw-error" in progress, progress
        assert str(tmp_path) not in progress  # no server paths shown
    assert queued == []
    # Junk left on the Inpaint canvas fails no run on the img2img sub-tab (the API event prepares every sub-tab's
    # input).
    canvas = {"background": uploaded(tmp_path / "junk.png"), "layers": [], "composite": None}
    inputs = [canvas if block is ui.img2img.widgets["inpaint_canvas"] else uploaded(tmp_path / "whole.png")
              if block is ui.img2img.widgets["init_image"] else given(block) for block in wiring.inputs]
    progress = through_gradio(ui, "img2img", *inputs)[2]
    assert "dw-error" not in progress and len(queued) == 1, progress
    # On the Inpaint sub-tab, the same junk is named.
    [(_, _, progress, *_)] = inpaint(ui, inpaint_canvas=UnreadablePicture("junk.png"))
    assert "Image: could not read junk.png as an image" in progress


def test_send_to_img2img_from_history_fills_the_picture_and_the_denoising_strength(ui, ui_services):
    session = img2img(ui, init_image=picture(), denoising_strength=0.55, seed=31, prompt="a sent barn")[-1][0]
    [image] = ui_services.worker.get(session.job_id).images
    sent, _, mode, sub_tab, *values, tabs = event(ui, "history_to_img2img")(image.history_id)
    assert Path(sent) == Path(image.path) and tabs.selected == "img2img"
    # Its own sub-tab opens, whichever was open: the picture goes to img2img's Image, not to Inpaint.
    assert mode == "img2img" and sub_tab.selected == "img2img"
    # Send to inpaint: the same picture on a fresh Inpaint canvas, that sub-tab open, the img2img Image left alone.
    kept, canvas, mode, sub_tab, *inpaint_values, tabs = event(ui, "history_to_inpaint")(image.history_id)
    assert is_skip(kept) and mode == "Inpaint" and sub_tab.selected == "inpaint" and tabs.selected == "img2img"
    assert Path(canvas["background"]) == Path(image.path) and canvas["layers"] == []
    assert inpaint_values == values
    shown = ui.img2img.widgets["inpaint_canvas"].postprocess(canvas)  # what the page gets: the picture as the background
    assert shown.background is not None and shown.layers == []
    fields = by_field(IMG2IMG_FIELDS, values)
    assert (fields["prompt"], fields["seed"], fields["denoising_strength"]) == ("a sent barn", 31, 0.55)
    assert (fields["width"], fields["height"], fields["steps"]) == (64, 64, 3)
    # Send to txt2img from the same row still works, and says nothing of the strength it does not take.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *values, tabs = event(ui, "send_from_history")(image.history_id)
    assert by_field(TXT2IMG_FIELDS, values)["prompt"] == "a sent barn" and tabs.selected == "txt2img"
    assert not [str(w.message) for w in caught if "not applied" in str(w.message)]
    # What was sent starts the next run.
    again = img2img(ui, init_image=Image.open(sent), denoising_strength=fields["denoising_strength"], seed=31)[-1]
    assert "Denoising strength: 0.55" in again[4]


def test_send_to_img2img_from_a_gallery_and_from_png_info(ui, ui_services, tmp_path):
    send = event(ui, "gallery_to_img2img")
    with pytest.raises(gr.Error, match="Generate an image first"):
        send(Session())
    session = generate(ui, prompt="a lighthouse to send", seed=41, n_iter=2)[-1][0]
    session, _ = event(ui, "select_image")(session, selected(1))
    sent, _, _, _, *values, tabs = send(session)
    assert Path(sent) == Path(ui_services.worker.get(session.job_id).images[1].path) and tabs.selected == "img2img"
    fields = by_field(IMG2IMG_FIELDS, values)
    assert (fields["prompt"], fields["seed"]) == ("a lighthouse to send", 42)
    assert is_skip(fields["denoising_strength"])  # a txt2img image has none: the slider keeps its own
    # An image that was not saved (cut short, a full disk) goes as the picture the worker holds, while it does.
    unsaved = dataclasses.replace(session, paths=[None, None])
    sent, *_ = send(unsaved)
    assert sent is ui_services.worker.get(session.job_id).images[1].image
    with pytest.raises(gr.Error, match="no longer holds it"):
        send(dataclasses.replace(unsaved, job_id="forgotten"))
    # A run of several jobs shows other jobs' images too: the last job's picture at that place is another one, and
    # went with the shown image's parameters (found by review).
    with pytest.raises(gr.Error, match="no longer holds it"):
        send(dataclasses.replace(unsaved, infotexts=["another job's image\nSteps: 2, Seed: 7"] * 2))
    # PNG Info: the dropped file and its parameters; a picture without any is a start too.
    info = PngInfo()
    info.add_text("parameters", "a castle\nSteps: 3, Sampler: Euler, Seed: 5, Size: 64x64, Denoising strength: 0.4")
    picture().save(tmp_path / "castle.png", pnginfo=info)
    sent, _, _, _, *values, tabs = event(ui, "pnginfo_to_img2img")(uploaded(tmp_path / "castle.png"), "a castle\nSteps: 3, "
                                                          "Sampler: Euler, Seed: 5, Size: 64x64, Denoising strength: 0.4")
    assert sent == str(tmp_path / "castle.png") and by_field(IMG2IMG_FIELDS, values)["denoising_strength"] == 0.4
    sent, _, _, _, *values, _ = event(ui, "pnginfo_to_img2img")(uploaded(tmp_path / "castle.png"), "")
    assert sent == str(tmp_path / "castle.png") and is_skip(by_field(IMG2IMG_FIELDS, values)["prompt"])
    with pytest.raises(gr.Error, match="Drop a picture first"):
        event(ui, "pnginfo_to_img2img")(None, "")


def test_the_picture_size_button_sets_width_and_height_from_the_picture(ui):
    size = ui.img2img.actions.picture_size
    # The open sub-tab and its own inputs (SUBTAB_INPUTS).
    assert size("img2img", picture(size=(100, 60))) == (96, 64)  # multiples of 8, >= 64
    with pytest.raises(gr.Error, match="Upload a picture first"):
        size("img2img", None)
    canvas = {"background": picture(size=(200, 120)), "layers": [], "composite": picture(size=(200, 120))}
    assert size("Inpaint", canvas) == (200, 120)
    assert size("Sketch", canvas) == (200, 120)
    assert size("Inpaint sketch", canvas) == (200, 120)
    assert size("Inpaint upload", picture(size=(136, 72)), None) == (136, 72)


def page_run(ui, elem_id: str, mode: str):
    """The event a click on the button elem_id runs on img2img's sub-tab `mode`, as Gradio wires it: the click
    renews that sub-tab's token, whose change runs it (Generate greyed out first)."""
    fns = list(ui.blocks.fns.values())
    [button] = [block for block in ui.blocks.blocks.values() if getattr(block, "elem_id", None) == elem_id]
    [renew] = [fn for fn in fns if (button._id, "click") in fn.targets]
    [token] = renew.fn(mode)
    [run] = [fn for fn in fns if (token._id, "change") in fn.targets]
    if run.fn is busy_button:
        [run] = [fn for fn in fns if fn.trigger_after == run._id]
    return run


def test_the_pages_generate_and_from_image_read_the_open_sub_tabs_pictures_only(ui, ui_services):
    """Gradio's image editor uploads its whole picture for every event that reads it: a large picture left on one
    sub-tab's canvas must not slow down Generate on another."""
    widgets = ui.img2img.widgets
    names = {widget._id: name for name, widget in widgets.items()}
    for mode, own in SUBTAB_INPUTS.items():
        for button in ("img2img_generate", "img2img_picture_size"):
            read = [names[block._id] for block in page_run(ui, button, mode).inputs if block._id in names]
            assert [name for name in read if name in ALL_SUBTAB_INPUTS] == list(own), (mode, button)
    assert page_run(ui, "img2img_generate", "no such sub-tab") is page_run(ui, "img2img_generate", "img2img")
    # The run is the open sub-tab's: on Inpaint upload, its picture and mask.
    run = page_run(ui, "img2img_generate", "Inpaint upload")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    given = {"prompt": "a red barn", "steps": 2, "width": 64, "height": 64, "seed": 3, "model": TINY,
             "inpaint_image": picture(size=(64, 64)), "mask": mask, "mask_blur": 0, "denoising_strength": 0.5}
    values = [given.get(names[block._id], REQUEST_DEFAULTS.get(names[block._id])) for block in run.inputs[1:]]
    session, *_ = list(run.fn(Session(), *values))[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.state == JobState.DONE and job.request.mask is not None, job.error
    kept = np.asarray(job.images[0].image)[:, :32] == np.asarray(given["inpaint_image"])[:, :32]
    assert kept.all()  # left of the mask: the picture's own
    from_image = page_run(ui, "img2img_picture_size", "Inpaint upload")
    assert from_image.fn(picture(size=(136, 72)), None) == (136, 72)


def test_a_reloaded_page_resumes_each_tabs_own_kind_of_job(ui, ui_services):
    worker, img2img_actions = ui_services.worker, ui.img2img.actions
    session = Session(tab="tab-img")
    follow = img2img_actions.generate(session, "a long img2img", steps=150, width=64, height=64, seed=1, n_iter=20,
                                      model=TINY, init_image=picture(), denoising_strength=1.0)  # runs until interrupted
    next(follow)
    wait_for(lambda: worker.get(session.job_id).progress.step > 0, what="img2img job running")
    try:
        # The same browser tab's txt2img tab has no job of its own to resume.
        txt2img_resume = next(event(ui, "resume")(Session(), "tab-img"))
        assert txt2img_resume[0].job_id is None and all(is_skip(value) for value in txt2img_resume[1:])
        reloaded = Session()
        resumed = img2img_actions.resume(reloaded, "tab-img")
        assert "Step" in next(resumed)[2] and reloaded.job_id == session.job_id
        img2img_actions.interrupt(reloaded)
        assert "Interrupted" in list(resumed)[-1][2]
    finally:
        worker.cancel(session.job_id)
        list(follow)
    assert worker.get(session.job_id).state is JobState.CANCELLED


def test_the_page_load_covers_the_img2img_tab(ui):
    by_name = {}
    for block_fn in ui.blocks.fns.values():
        if any(event_name == "load" for _, event_name in block_fn.targets):
            by_name.setdefault(block_fn.name, []).append({block.elem_id for block in block_fn.outputs})
    # One token (TAB_TOKEN_JS) for the tabs: each resumes its own kind of job with it (Train: its training run).
    assert [outputs for outputs in sum(by_name.values(), []) if "txt2img_tab_token" in outputs] == [
        {"txt2img_tab_token", "img2img_tab_token", "train_tab_token"}]
    assert {"img2img_styles", "img2img_lora_name", "img2img_embedding_name", "img2img_sd_upscale_upscaler",
            "img2img_lora_cards", "img2img_embedding_cards", "img2img_hypernet_name",
            "img2img_hypernet_cards"} in by_name["file_lists"]
    assert by_name["upscaler_lists"] == [{"extras_upscaler_1", "extras_upscaler_2"}]
    [model_outputs] = by_name["models_on_page_load"]
    assert {"img2img_width", "img2img_height", "txt2img_width", "vae_dropdown"} <= model_outputs
    assert "img2img_clip_skip" not in model_outputs  # a fixed slider: a value on it never jams Generate
    dropdown, status, vae, *sliders = event(ui, "models_on_page_load")()
    assert sliders == [64, 64, 64, 64] and vae["value"] == "Automatic"


def test_a_hires_picture_sent_to_img2img_keeps_its_own_size_and_not_its_batch_size(ui, ui_services):
    """The infotext's Size is the first pass's: the picture is larger (A1111 sends the picture's size)."""
    *_, last = event(ui, "txt2img")(Session(), "a hires barn", steps=2, width=64, height=64, seed=5, model=TINY,
                                    batch_size=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    session = last[0]
    sent, _, _, _, *values, _ = event(ui, "gallery_to_img2img")(session)
    fields = by_field(IMG2IMG_FIELDS, values)
    assert Image.open(sent).size == (96, 96) and (fields["width"], fields["height"]) == (96, 96)
    assert "batch_size" not in IMG2IMG_FIELDS and "Batch size: 2" in session.infotexts[0]
    # Send to txt2img gives back the first-pass size and the hires fix, and no hires size left over.
    *values, _ = event(ui, "send_from_pnginfo")(session.infotexts[0])
    fields = by_field(TXT2IMG_FIELDS, values)
    assert (fields["width"], fields["enable_hr"], fields["hr_scale"], fields["hr_resize_x"]) == (64, True, 1.5, 0)


def test_from_image_refuses_a_picture_generate_would_refuse(ui):
    with pytest.raises(gr.Error, match="Image: the picture is 5000x4000"):
        ui.img2img.actions.picture_size("img2img", Image.new("1", (5000, 4000)), None, None, None, None)


# --- inpainting --------------------------------------------------------------------------------------------
def painted_layer(size=(64, 64), box=(32, 0, 64, 64)) -> Image.Image:
    """An Inpaint canvas layer: transparent, with a brush stroke over the box."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((20, 20, 20, 200), box)
    return layer


def inpaint(ui, mode="Inpaint", **fields) -> list:
    """Run the img2img event on a sub-tab other than img2img, at 64x64 and 3 steps; every yielded tuple."""
    return list(event(ui, "img2img")(Session(), "a red barn", steps=3, width=64, height=64, seed=7, model=TINY,
                                     denoising_strength=0.5, img2img_mode=mode, **fields))


def test_the_inpainting_settings_start_at_a1111s_and_the_sub_tabs_sit_over_the_picture(ui):
    widgets = ui.img2img.widgets
    assert (widgets["mask_blur"].value, widgets["inpainting_mask_invert"].value, widgets["inpainting_fill"].value,
            widgets["inpaint_full_res"].value, widgets["inpaint_full_res_padding"].value) == (
        4, "Inpaint masked", "original", "Whole picture", 32)
    assert [c[0] for c in widgets["inpainting_fill"].choices] == ["fill", "original", "latent noise", "latent nothing"]
    config = ui.blocks.get_config_file()
    sub_tabs = [c["props"]["label"] for c in config["components"]
                if c["props"].get("elem_id", "").startswith("img2img_") and c["props"].get("elem_id", "").endswith("_tab")]
    assert sub_tabs == ["img2img", "Sketch", "Inpaint", "Inpaint sketch", "Inpaint upload", "Batch"]


def test_the_inpaint_tab_draws_only_where_the_brush_went(ui, ui_services):
    start = picture(size=(64, 64))
    session, *_ = inpaint(ui, inpaint_canvas={"background": start, "layers": [painted_layer()], "composite": start},
                          mask_blur=0)[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.state == JobState.DONE, job.error
    result = np.asarray(job.images[0].image, np.int16)
    assert (result[:, :32] == np.asarray(start, np.int16)[:, :32]).all()  # unpainted: the picture as it was
    assert np.abs(result[:, 32:] - np.asarray(start, np.int16)[:, 32:]).mean() > 5
    assert "Mask blur" not in job.images[0].infotext and job.request.mask is not None  # a blur of 0 is left out


def test_inpaint_upload_takes_its_own_picture_and_mask_with_the_settings(ui, ui_services):
    mask = Image.new("L", (64, 64))
    mask.paste(255, (10, 10, 30, 30))
    session, *_ = inpaint(ui, "Inpaint upload", inpaint_image=picture(size=(64, 64)), mask=mask, mask_blur=2,
                          inpainting_fill=2, inpaint_full_res=1, inpaint_full_res_padding=16)[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.state == JobState.DONE, job.error
    assert "Mask blur: 2, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 16" in (
        job.images[0].infotext)


@pytest.mark.parametrize("mode, pictures, message", [
    ("Inpaint", {"inpaint_canvas": None}, "Inpaint: upload a picture, then paint over"),
    ("Inpaint", {"inpaint_canvas": {"background": picture(), "layers": [Image.new("RGBA", (80, 48))]}},
     "Inpaint: upload a picture, then paint over"),
    ("Inpaint upload", {"inpaint_image": picture()}, "Inpaint upload: upload the mask too"),
    ("Inpaint upload", {"inpaint_image": None, "mask": picture()}, "Upload a picture to start from"),
])
def test_an_inpaint_tab_without_what_it_needs_says_what_to_upload_and_queues_nothing(ui, ui_services, mode, pictures,
                                                                                     message):
    before = len(ui_services.worker.waiting_jobs())
    [(session, _, progress, *_)] = inpaint(ui, mode, **pictures)
    assert message in progress and "dw-error" in progress and session.job_id is None
    assert len(ui_services.worker.waiting_jobs()) == before


def test_an_inpainting_infotext_sent_to_img2img_sets_the_inpainting_settings(ui, tmp_path):
    text = ("a castle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.4, "
            "Mask blur: 8, Masked content: latent nothing, Inpaint area: Only masked, Masked area padding: 48")
    picture(size=(64, 64)).save(tmp_path / "castle.png")
    _, canvas, mode, _, *values, _ = event(ui, "pnginfo_to_inpaint")(uploaded(tmp_path / "castle.png"), text)
    assert mode == "Inpaint" and Path(canvas["background"]).name == "castle.png"
    fields = by_field(IMG2IMG_FIELDS, values)
    assert (fields["mask_blur"], fields["inpainting_mask_invert"], fields["inpainting_fill"],
            fields["inpaint_full_res"], fields["inpaint_full_res_padding"]) == (
        8, "Inpaint masked", "latent nothing", "Only masked", 48)


def test_sketch_starts_from_the_picture_as_painted(ui, ui_services, monkeypatch):
    start, painted = picture(size=(64, 64)), picture("green", size=(64, 64))
    submitted = []
    submit = ui_services.worker.submit
    monkeypatch.setattr(ui_services.worker, "submit", lambda *a, **k: submitted.append(k) or submit(*a, **k))
    session, *_ = inpaint(ui, "Sketch", color_sketch={"background": start, "layers": [painted_layer()],
                                                       "composite": painted})[-1]
    assert submitted[0]["init_image"] is painted and submitted[0]["mask"] is None  # plain img2img from the painting
    assert ui_services.worker.get(session.job_id).wait(60)


def test_inpaint_sketch_draws_again_where_it_was_painted_starting_from_the_paint(ui, ui_services):
    start, painted = picture(size=(64, 64)), picture("green", size=(64, 64))
    session, *_ = inpaint(ui, "Inpaint sketch", mask_blur=0, inpaint_color_sketch={
        "background": start, "layers": [painted_layer()], "composite": painted})[-1]
    job = ui_services.worker.get(session.job_id)
    assert job.wait(60) and job.state == JobState.DONE, job.error
    result = np.asarray(job.images[0].image, np.int16)
    assert (result[:, :32] == np.asarray(painted, np.int16)[:, :32]).all()  # unpainted: the canvas as it was
    assert job.request.mask is not None
    [(_, _, progress, *_)] = inpaint(ui, "Inpaint sketch", inpaint_color_sketch={
        "background": start, "layers": [], "composite": start})
    assert "Inpaint sketch: upload a picture, then paint over" in progress


# --- Batch: several uploads, one run each ------------------------------------------------------------

def saved(tmp_path: Path, name: str, image: Image.Image) -> str:
    image.save(tmp_path / name)
    return str(tmp_path / name)


def test_batch_runs_each_uploaded_picture_and_shows_all_their_images(ui, ui_services, tmp_path):
    paths = [saved(tmp_path, "red.png", picture("red", (64, 64))), saved(tmp_path, "green.jpg", picture("green", (64, 64)))]
    *running, (session, gallery, progress, _, _, timing) = inpaint(ui, "Batch", batch_pictures=paths)
    assert any("Batch: picture 2 of 2" in str(update[2]) for update in running)
    assert progress == "" and "for 2 runs" in timing and len(gallery) == 2
    pictures = [Image.open(path).convert("RGB") for path, _ in gallery]
    assert pictures[0].tobytes() != pictures[1].tobytes()  # same seed and settings: each from its own picture
    alone = inpaint(ui, "img2img", init_image=Image.open(paths[1]))[-1][1][0][0]
    assert Image.open(alone).convert("RGB").tobytes() == pictures[1].tobytes()  # as green.jpg run on its own
    assert all(Path(path).parent.parent.name == "img2img-images" for path, _ in gallery)
    # From image: the first picture's size.
    from_image = page_run(ui, "img2img_picture_size", "Batch")
    assert from_image.fn([saved(tmp_path, "wide.png", picture(size=(136, 72)))], None) == (136, 72)


def test_batch_reads_a_server_folder_as_a1111s_input_directory(ui, ui_services, tmp_path, monkeypatch):
    folder, masks = tmp_path / "in", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    saved(folder, "b.png", picture("blue", (64, 64))), saved(folder, "a.jpg", picture("red", (64, 64)))
    (folder / "notes.txt").write_text("not a picture")
    saved(folder, ".hidden.png", picture("green", (64, 64)))
    *running, (session, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=f"  {folder} ")
    assert progress == "" and len(gallery) == 2 and any("Batch: picture 2 of 2" in str(u[2]) for u in running)
    runs = [Image.open(path).convert("RGB") for path, _ in gallery]
    alone = inpaint(ui, "img2img", init_image=Image.open(folder / "a.jpg"))[-1][1][0][0]
    assert Image.open(alone).convert("RGB").tobytes() == runs[0].tobytes()  # a.jpg first, by name
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    saved(masks, "a.png", mask), saved(masks, "b.webp", mask)
    before = len(ui_services.history.list_images()[0])
    *_, (session, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder),
                                                   batch_mask_dir=str(masks))
    assert progress == "" and len(gallery) == 2, progress
    kept = np.asarray(Image.open(gallery[0][0]).convert("RGB"))[:, :24]  # outside the mask: the picture
    start = np.asarray(Image.open(folder / "a.jpg").convert("RGB"))[:, :24]
    assert np.abs(kept.astype(int) - start).max() <= 3
    assert len(ui_services.history.list_images()[0]) == before + 2
    for fields, message in (({"batch_input_dir": str(tmp_path / "nowhere")}, "is no folder on this machine"),
                            ({"batch_input_dir": str(masks.parent / "empty")}, "is no folder"),
                            ({"batch_mask_dir": str(masks)}, "give the Input directory too")):
        [(_, _, progress, *_)] = inpaint(ui, "Batch", **fields)
        assert message in progress, progress
    (tmp_path / "empty").mkdir()
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(tmp_path / "empty"))
    assert "holds no pictures" in progress
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir="/" + "x" * 5000)
    assert "cannot be read" in progress and "could not start" not in progress and len(progress) < 600
    monkeypatch.setattr(ui.img2img.actions, "reads_server_folders", False)
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(folder))
    assert "reads no folders typed into the page" in progress


def test_a_server_folder_is_read_in_natural_order_and_at_most_100_pictures(tmp_path):
    from webui.ui.pictures import MAX_BATCH_PICTURES, folder_pictures

    for name in ("img10.png", "img2.png", "Img1.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(path).name for path in folder_pictures(str(tmp_path), "Input directory")] == [
        "Img1.jpg", "img2.png", "img10.png"]
    for number in range(MAX_BATCH_PICTURES):
        (tmp_path / f"more{number}.png").write_bytes(b"")
    with pytest.raises(InvalidRequest, match="holds more than 100 pictures; at most 100 run at once"):
        folder_pictures(str(tmp_path), "Input directory")


def test_batch_masks_go_with_the_pictures_of_their_name_or_one_with_all(ui, ui_services, tmp_path):
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    paths = [saved(tmp_path, "a.png", picture("red", (64, 64))), saved(tmp_path, "b.png", picture("blue", (64, 64)))]
    masks = [saved(tmp_path, "b.webp", mask), saved(tmp_path, "a.png.png", mask)]
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_pictures=paths, batch_masks=masks)
    assert "no mask is named as a.png" in progress
    one = [saved(tmp_path, "mask.png", mask)]
    session, gallery, *_ = inpaint(ui, "Batch", batch_pictures=paths, batch_masks=one, mask_blur=0)[-1]
    for (path, _), start in zip(gallery, paths):
        result = np.asarray(Image.open(path).convert("RGB"))
        assert (result[:, :32] == np.asarray(Image.open(start).convert("RGB"))[:, :32]).all()  # kept: no mask
        assert "Denoising strength: 0.5" in Image.open(path).info["parameters"]
    job = ui_services.worker.get(session.job_id)
    assert job.request.mask is not None and job.inpainting


def test_a_run_refused_at_its_second_picture_says_so_with_that_pictures_number(ui, ui_services, tmp_path,
                                                                                monkeypatch):
    paths = [saved(tmp_path, f"{name}.png", picture(colour, (64, 64))) for name, colour in (("a", "red"), ("b", "blue"))]
    submit, calls = ui_services.worker.submit, []

    def second_refused(request, **kwargs):
        calls.append(request)
        if len(calls) == 2:
            raise InvalidRequest("steps: refused for the test")
        return submit(request, **kwargs)

    monkeypatch.setattr(ui_services.worker, "submit", second_refused)
    *_, (_, _, progress, *_) = inpaint(ui, "Batch", batch_pictures=paths)
    assert "Batch: picture 2 of 2" in progress and "Sampling steps: refused for the test" in progress, progress


def test_an_unknown_sub_tab_is_named_not_run_as_another(ui, ui_services):
    [(session, _, progress, *_)] = inpaint(ui, "inpaint upload", init_image=picture())
    assert "img2img_mode: unknown sub-tab &#x27;inpaint upload&#x27;; use one of: img2img, Sketch, Inpaint" in progress
    assert session.job_id is None


def test_batch_without_pictures_or_with_none_readable_says_which_and_runs_nothing(ui, ui_services, tmp_path):
    before = len(ui_services.worker.waiting_jobs())
    [(session, _, progress, *_)] = inpaint(ui, "Batch", batch_pictures=[])
    assert "Batch: upload the pictures to start from" in progress and session.job_id is None
    (tmp_path / "notes.txt").write_text("not a picture")
    [(session, _, progress, *_)] = inpaint(ui, "Batch", batch_pictures=[str(tmp_path / "notes.txt")])
    assert "Batch: could not read notes.txt as an image" in progress and session.job_id is None
    good = saved(tmp_path, "good.png", picture())
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_pictures=[good], xyz_plot=True, x_type="Steps",
                                     x_values="1, 2")
    assert "a script of their own: use one of them at a time" in progress
    assert len(ui_services.worker.waiting_jobs()) == before


def test_batch_leaves_out_the_pictures_it_cannot_read_runs_the_others_and_says_which(ui, ui_services, tmp_path):
    """As A1111's, which skips what it cannot open: a header that is no picture is found before the run, pixels that
    end early when the picture's turn comes."""
    folder = tmp_path / "in"
    folder.mkdir()
    saved(folder, "a.png", picture("red", (64, 64))), saved(folder, "c.png", picture("blue", (64, 64)))
    (folder / "b.png").write_bytes(b"not a picture")
    whole = io.BytesIO()
    picture("green", (64, 64)).save(whole, format="PNG")
    (folder / "d.png").write_bytes(whole.getvalue()[:-200])  # its header reads, its pixels end early
    *running, (session, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder))
    assert len(gallery) == 2 and "2 pictures left out, as they could not be read" in progress, progress
    assert "could not read b.png as an image" in progress and "d.png" in progress
    assert any("Batch: picture 2 of 3" in str(update[2]) for update in running)  # a, c, d: b is left out first
    assert "Batch: could not read b.png" not in progress  # the note says Batch once
    # The mask of a picture left out is not read; one of a picture that runs is, and named as a mask.
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "b.png").write_bytes(b"not a mask either")
    for name in ("a", "c", "d"):
        saved(masks, f"{name}.png", Image.new("L", (64, 64), 255))
    *_, (_, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder), batch_mask_dir=str(masks))
    assert len(gallery) == 2 and "2 pictures left out" in progress, progress
    (masks / "c.png").write_bytes(b"broken")
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(folder), batch_mask_dir=str(masks))
    assert "Batch mask: could not read c.png as an image" in progress, progress
    # Every picture failing as its turn comes is an error, as when none can be read before the run.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "d.png").write_bytes(whole.getvalue()[:-200])
    [*_, (_, gallery, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(cut))
    assert "dw-error" in progress and "d.png" in progress and is_skip(gallery), progress


def test_a_batch_picture_past_pils_own_limit_is_called_too_large(tmp_path, monkeypatch):
    from webui.ui.pictures import batch_uploads

    path = saved(tmp_path, "huge.png", picture(size=(64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is past twice PIL's limit: it refuses to open it
    with pytest.raises(InvalidRequest, match="Batch: could not read huge.png as an image: it is too large"):
        batch_uploads([path], None)


def test_resize_by_makes_the_run_the_pictures_size_times_the_scale(ui, ui_services, tmp_path):
    """A1111's "Resize by" tab: each picture's own size times the scale (multiples of 8), whatever Width and Height
    say; one that does not fit says which scales do."""
    by = {"size_tab": "Resize by", "scale_by": 0.5}
    session, gallery, *_ = inpaint(ui, "img2img", init_image=picture(size=(160, 128)), **by)[-1]
    assert ui_services.worker.get(session.job_id).request.width == 80 and Image.open(gallery[0][0]).size == (80, 64)
    paths = [saved(tmp_path, "wide.png", picture(size=(160, 128))), saved(tmp_path, "tall.png", picture(size=(136, 200)))]
    _, gallery, *_ = inpaint(ui, "Batch", batch_pictures=paths, **by)[-1]
    assert [Image.open(path).size for path, _ in gallery] == [(80, 64), (64, 96)]  # 68 -> 64, 100 -> 96
    [(session, _, progress, *_)] = inpaint(ui, "img2img", init_image=picture(size=(160, 128)), size_tab="Resize by",
                                           scale_by=0.3)
    assert "Resize by 0.3: the 160x128 picture would be 48x32" in progress and "pick a scale from 0.5 to 12.84" \
        in progress and session.job_id is None
    # Resize to (the tab first open) keeps Width and Height.
    session, gallery, *_ = inpaint(ui, "img2img", init_image=picture(size=(160, 128)), scale_by=0.5)[-1]
    assert Image.open(gallery[0][0]).size == (64, 64)
    # The page's Generate reads which tab is open and the scale, on every sub-tab.
    names = {widget._id: name for name, widget in ui.img2img.widgets.items()}
    for mode in SUBTAB_INPUTS:
        read = {names.get(block._id) for block in page_run(ui, "img2img_generate", mode).inputs}
        assert {"size_tab", "scale_by"} <= read, mode


def test_a_page_served_to_others_without_a_login_offers_no_server_folders(models_dir, tmp_path):
    from tests.helpers import running_services
    from webui.ui.blocks import create_ui

    started = running_services(models_dir, tmp_path / "out", listen=True)
    try:
        page = create_ui(next(started))
        config = page.blocks.get_config_file()
        hidden = {c["props"]["elem_id"]: c["props"].get("visible") for c in config["components"]
                  if c["props"].get("elem_id") in ("img2img_batch_folders", "extras_directory_tab")}
        assert hidden == {"img2img_batch_folders": False, "extras_directory_tab": False}
        [(_, _, progress, *_)] = inpaint(page, "Batch", batch_input_dir=str(tmp_path))
        assert "reads no folders typed into the page" in progress
    finally:
        started.close()


def test_batch_also_saves_each_result_in_the_output_directory_named_as_its_picture(ui, ui_services, tmp_path,
                                                                                   monkeypatch):
    """A1111's Output directory: <picture's name>.png there (with -<n> when a run makes several), as well as the
    outputs folder the gallery and the history read; a name taken there, the input itself too, is never replaced."""
    folder = tmp_path / "in"
    folder.mkdir()
    saved(folder, "a.png", picture("red", (64, 64))), saved(folder, "b.jpg", picture("blue", (64, 64)))
    source = (folder / "a.png").read_bytes()
    before = ui_services.history.list_images()[1]
    *_, (session, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder),
                                                   batch_output_dir=f" {folder} ")  # the input folder itself
    assert progress == "" and len(gallery) == 2, progress
    assert sorted(p.name for p in folder.iterdir()) == ["a-1.png", "a.png", "b.jpg", "b.png"]
    assert (folder / "a.png").read_bytes() == source
    for (path, _), copy in zip(gallery, ("a-1.png", "b.png")):
        assert Path(path).parent.parent.name == "img2img-images"  # the gallery's and the history's file
        assert Image.open(path).tobytes() == Image.open(folder / copy).tobytes()
        assert Image.open(folder / copy).info["parameters"] == Image.open(path).info["parameters"]
    rows, total = ui_services.history.list_images()
    assert total == before + 2 and {Path(row.path).name for row in rows[:2]} == {Path(p).name for p, _ in gallery}
    out = tmp_path / "out"
    out.mkdir()
    upload = [saved(tmp_path, "c.png", picture("green", (64, 64)))]
    *_, (_, gallery, progress, *_) = inpaint(ui, "Batch", batch_pictures=upload, batch_output_dir=str(out),
                                             batch_size=2)
    assert progress == "" and sorted(p.name for p in out.iterdir()) == ["c-1.png", "c-2.png"]


def test_a_batch_output_directory_that_cannot_be_written_is_refused_before_the_batch_starts(ui, ui_services, tmp_path,
                                                                                            monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    saved(folder, "a.png", picture("red", (64, 64)))
    (tmp_path / "file.txt").write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    waiting = len(ui_services.worker.waiting_jobs())
    try:
        for output_dir, message in ((tmp_path / "file.txt", "is a file on this machine"),
                                    (locked, "cannot be written to (Permission denied)"),
                                    ("/" + "x" * 5000, "cannot be written to")):
            if output_dir == locked and os.geteuid() == 0:
                continue  # root writes anywhere
            [(session, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(folder),
                                                   batch_output_dir=str(output_dir))
            assert "Batch: Output directory" in progress and message in progress, progress
            assert session.job_id is None and len(progress) < 700
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == [] and len(ui_services.worker.waiting_jobs()) == waiting
    # One not there yet is made, as A1111 makes it: with its first picture, not by a run refused before any
    *_, (_, _, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder), cfg_scale=99,
                                       batch_output_dir=str(tmp_path / "new" / "out"))
    assert "dw-error" in progress and not (tmp_path / "new").exists(), progress
    *_, (_, gallery, progress, *_) = inpaint(ui, "Batch", batch_input_dir=str(folder),
                                             batch_output_dir=str(tmp_path / "new" / "out"))
    assert len(gallery) == 1 and [path.name for path in (tmp_path / "new" / "out").iterdir()] == ["a.png"]
    [(_, _, progress, *_)] = inpaint(ui, "Batch", batch_input_dir=str(folder),
                                     batch_output_dir=str(tmp_path / "file.txt" / "out"))
    assert "is a file on this machine" in progress, progress
    monkeypatch.setattr(ui.img2img.actions, "reads_server_folders", False)
    upload = [saved(tmp_path, "c.png", picture("green", (64, 64)))]
    [(session, _, progress, *_)] = inpaint(ui, "Batch", batch_pictures=upload, batch_output_dir=str(tmp_path))
    assert "reads no folders typed into the page" in progress and "leave the Output directory empty" in progress
    assert session.job_id is None


def test_an_output_directory_gone_before_the_picture_is_made_is_a_warning_and_outputs_keeps_it(ui_services, tmp_path):
    from webui.storage.outputs import NamedCopy

    job = ui_services.worker.submit({"prompt": "a red barn", "steps": 2, "width": 64, "height": 64, "model": TINY},
                                    init_image=picture("red", (64, 64)), copy_to=NamedCopy(tmp_path / "gone", "a"))
    assert job.wait(60) and job.state is JobState.DONE
    assert any("image 1 was not saved in the output directory" in warning for warning in job.warnings), job.warnings
    assert Path(job.images[0].path).exists() and job.images[0].history_id is not None
