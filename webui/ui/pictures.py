"""The img2img tab's pictures: the ways to give them (A1111's sub-tabs img2img, Sketch, Inpaint, Inpaint sketch,
Inpaint upload and Batch), the inpainting settings, and reading the uploads into the pictures and masks the worker
takes.

Only reads widget values; the worker checks and fits what it is given.
"""
from __future__ import annotations

import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Any, Callable

import gradio as gr
from PIL import Image

from webui.engine.img2img import MAX_PICTURE_PIXELS, check_picture_size
from webui.engine.soft_inpainting import LABELS as SOFT_LABELS, RANGES as SOFT_RANGES, SOFT_INPAINTING_FIELDS
from webui.engine.soft_inpainting import STEPS as SOFT_STEPS
from webui.outpainting import outpainting_job
from webui.schemas import (INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, MAX_MASK_BLUR, MAX_MASK_PADDING,
                           GenerationRequest, InvalidRequest)

# The img2img tab's sub-tabs: how the picture (and the mask) are given.
IMG2IMG_MODES = PLAIN, SKETCH, INPAINT, INPAINT_SKETCH, INPAINT_UPLOAD, BATCH = (
    "img2img", "Sketch", "Inpaint", "Inpaint sketch", "Inpaint upload", "Batch")
INPAINTING_MODES = (INPAINT, INPAINT_SKETCH, INPAINT_UPLOAD, BATCH)  # Batch: with masks
MAX_BATCH_PICTURES = 100  # each is a job of its own
# The sub-tabs drawn on a canvas: generate()'s parameter for the canvas, and the part of it to start from.
CANVASES = {SKETCH: ("color_sketch", "composite"), INPAINT: ("inpaint_canvas", "background"),
            INPAINT_SKETCH: ("inpaint_color_sketch", "composite")}
# Each sub-tab's own inputs, by generate() parameter. The page's Generate and From image read the open sub-tab's
# only: Gradio's image editor exports and uploads its whole picture for every event that reads it, open or not
# (a 1024x1024 picture left on the Sketch canvas made each Generate on the img2img sub-tab take 32 s, not 0.5 s).
SUBTAB_INPUTS = {PLAIN: ("init_image",), SKETCH: ("color_sketch",), INPAINT: ("inpaint_canvas",),
                 INPAINT_SKETCH: ("inpaint_color_sketch",), INPAINT_UPLOAD: ("inpaint_image", "mask"),
                 BATCH: ("batch_pictures", "batch_masks", "batch_input_dir", "batch_mask_dir",
                        "batch_output_dir")}
ALL_SUBTAB_INPUTS = tuple(name for names in SUBTAB_INPUTS.values() for name in names)
NO_PICTURE = "Upload a picture to start from (drop one on Image, or send one from txt2img, History or PNG Info)."
NO_STROKES = {INPAINT: "Inpaint: upload a picture, then paint over the part to draw again.",
              INPAINT_SKETCH: "Inpaint sketch: upload a picture, then paint over the part to draw again in the "
                              "colours it should start from."}
NO_MASK = "Inpaint upload: upload the mask too (white where the picture is drawn again)."
NO_BATCH = "Batch: upload the pictures to start from (several at once; each is a run of its own)."


RESIZE_TO, RESIZE_BY = "Resize to", "Resize by"  # img2img's size: Width and Height, or the picture's times a scale


TOO_LARGE = f"it is too large; send one of at most {MAX_PICTURE_PIXELS / 1e6:.1f} megapixels, scaled down"


@dataclass(frozen=True)
class UnreadablePicture:
    """An upload that is no picture, a damaged one or one too large to read: Generate says so where its progress
    shows."""
    name: str
    reason: str = "it is not a PNG, JPEG or WebP file, or it is damaged"
    field: str = "init_image"

    def problem(self) -> str:
        # The upload's own name: the server's temp path means nothing to the user.
        return f"{self.field}: could not read {self.name} as an image: {self.reason}"


def picture_upload(field: str = "init_image", **kwargs) -> gr.Image:
    """A gr.Image (type "pil") that hands an unreadable upload on as an UnreadablePicture (of request field
    `field`). Send it plain values: a gr.update() of it makes Gradio build a plain gr.Image for the session."""
    return tolerant(gr.Image(type="pil", **kwargs), field)


def tolerant(component: gr.Image | gr.ImageMask, field: str) -> gr.Image | gr.ImageMask:
    """The picture input, handing an unreadable upload on as an UnreadablePicture: Gradio would fail the whole
    event while preparing its inputs, with a raw pop-up and nothing in the progress area (and the Gradio API's
    img2img prepares every sub-tab's inputs). Wrapped here, not subclassed: Gradio writes a .pyi stub beside the
    module of every Component subclass."""
    prepare = component.preprocess

    def preprocess(payload):
        name = getattr(payload, "orig_name", None) or "the picture"
        try:
            return prepare(payload)
        except Image.DecompressionBombError:  # PIL's own limit, far above ours (check_picture_size)
            return UnreadablePicture(name, TOO_LARGE, field)
        except (OSError, SyntaxError, ValueError, gr.Error):
            return UnreadablePicture(name, field=field)

    component.preprocess = preprocess
    return component


def picture_inputs(server_folders: bool = True) -> tuple[dict[str, gr.components.Component], gr.Tabs]:
    """The sub-tabs with the picture inputs, by generate() parameter: "img2img_mode" (which sub-tab is open: a
    hidden Textbox, not a State, so that Gradio API callers can pick one too), "init_image", "color_sketch" (the
    Sketch canvas), "inpaint_canvas", "inpaint_color_sketch" (the Inpaint sketch canvas), "inpaint_image" and "mask"
    (Inpaint upload), "batch_pictures" and "batch_masks" (Batch: the uploads' paths), "batch_input_dir" and
    "batch_mask_dir" (Batch: server folders instead) and "batch_output_dir" (Batch: a server folder the results
    also go to), shown where server_folders."""
    mode = gr.Textbox(PLAIN, visible=False, label="img2img mode", elem_id="img2img_mode")
    picture = dict(sources=["upload", "clipboard"], format="png")
    # image_mode None: the worker lays a transparent part on white (Gradio's RGB would make it black).
    with gr.Tabs(elem_id="img2img_mode_tabs") as tabs:
        with gr.Tab(PLAIN, id="img2img", elem_id="img2img_img2img_tab") as plain_tab:
            init_image = picture_upload(label="Image", image_mode=None, elem_id="img2img_image", height=360, **picture)
        with gr.Tab(SKETCH, id="sketch", elem_id="img2img_sketch_tab") as sketch_tab:
            color_sketch = canvas("Image: paint on it in colours to start from", "img2img_sketch")
        with gr.Tab(INPAINT, id="inpaint", elem_id="img2img_inpaint_tab") as inpaint_tab:
            # See-through, so the part painted over still shows.
            inpaint_canvas = tolerant(gr.ImageMask(label="Image: paint over the part to draw again", type="pil",
                                           elem_id="img2img_inpaint_canvas", height=360,
                                           brush=gr.Brush(colors=[("#000000", 0.6)], color_mode="fixed"), **picture),
                              "init_image")
        with gr.Tab(INPAINT_SKETCH, id="inpaint_sketch", elem_id="img2img_inpaint_sketch_tab") as inpaint_sketch_tab:
            inpaint_color_sketch = canvas("Image: paint over the part to draw again, in the colours to start from",
                                          "img2img_inpaint_color_sketch")
        with gr.Tab(INPAINT_UPLOAD, id="inpaint_upload", elem_id="img2img_inpaint_upload_tab") as upload_tab:
            inpaint_image = picture_upload(label="Image", image_mode=None, elem_id="img2img_inpaint_image", height=260,
                                           **picture)
            mask = picture_upload("mask", label="Mask: white where the picture is drawn again", image_mode=None,
                                  elem_id="img2img_inpaint_mask", height=260, **picture)
        with gr.Tab(BATCH, id="batch", elem_id="img2img_batch_tab") as batch_tab:
            batch_pictures = gr.File(file_count="multiple", file_types=["image"], type="filepath", height=200,
                                     label="Pictures: each is a run of its own", elem_id="img2img_batch_pictures")
            batch_masks = gr.File(file_count="multiple", file_types=["image"], type="filepath", height=150,
                                  label="Masks, to inpaint: named as the pictures, or one for all",
                                  elem_id="img2img_batch_masks")
            with gr.Accordion("Or from a folder on the server", open=False, visible=server_folders,
                              elem_id="img2img_batch_folders"):
                input_dir = gr.Textbox("", label="Input directory", elem_id="img2img_batch_input_dir",
                                       placeholder="a folder of pictures on this machine: each is a run of its own")
                mask_dir = gr.Textbox("", label="Inpaint batch mask directory", elem_id="img2img_batch_mask_dir",
                                      placeholder="optional: masks named as the pictures, to inpaint")
                output_dir = gr.Textbox("", label="Output directory", elem_id="img2img_batch_output_dir",
                                        placeholder="optional: each result is also saved here, named as its picture "
                                                    "(a file there is never replaced)")
    tabs_in_order = (plain_tab, sketch_tab, inpaint_tab, inpaint_sketch_tab, upload_tab, batch_tab)
    for tab, name in zip(tabs_in_order, IMG2IMG_MODES):
        tab.select(lambda name=name: name, outputs=[mode], api_visibility="private", show_progress="hidden")
    return {"img2img_mode": mode, "init_image": init_image, "color_sketch": color_sketch,
            "inpaint_canvas": inpaint_canvas, "inpaint_color_sketch": inpaint_color_sketch,
            "inpaint_image": inpaint_image, "mask": mask, "batch_pictures": batch_pictures,
            "batch_masks": batch_masks, "batch_input_dir": input_dir, "batch_mask_dir": mask_dir,
            "batch_output_dir": output_dir}, tabs


def on_open_subtab(trigger: Callable, mode: gr.Textbox) -> dict[str, gr.Textbox]:
    """Hidden tokens, one per sub-tab: `trigger` (a button's .click) renews the open sub-tab's (`mode`: its name),
    so that an event wired to each token's .change runs for the open sub-tab alone, reading its inputs only."""
    tokens = {name: gr.Textbox(visible=False) for name in IMG2IMG_MODES}
    trigger(partial(renewed_token, tokens), inputs=[mode], outputs=list(tokens.values()), queue=False,
            api_visibility="private", show_progress="hidden")
    return tokens


def renewed_token(tokens: dict[str, gr.Textbox], mode: str) -> dict[gr.Textbox, str]:
    return {tokens.get(mode, tokens[PLAIN]): uuid.uuid4().hex}  # never equal to the last: its .change fires


def canvas(label: str, elem_id: str) -> gr.ImageEditor:
    """A picture to paint on in any colour (Sketch, Inpaint sketch)."""
    return tolerant(gr.ImageEditor(label=label, type="pil", sources=["upload", "clipboard"], format="png",
                                   elem_id=elem_id, height=360, brush=gr.Brush(color_mode="defaults")), "init_image")


def inpainting_settings(mode: gr.Textbox) -> dict[str, gr.components.Component]:
    """A1111's inpainting controls, by request field; shown on the Inpaint sub-tabs only (`mode`: the open one)."""
    defaults = GenerationRequest.model_fields
    with gr.Accordion("Inpainting", open=True, visible=False, elem_id="img2img_inpainting") as section:
        with gr.Row():
            blur = gr.Slider(0, MAX_MASK_BLUR, value=defaults["mask_blur"].default, step=1, label="Mask blur",
                             elem_id="img2img_mask_blur")
            invert = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], type="index", label="Mask mode",
                              elem_id="img2img_mask_mode")
        fill = gr.Radio(list(MASKED_CONTENT), value=MASKED_CONTENT[defaults["inpainting_fill"].default],
                        type="index", label="Masked content", elem_id="img2img_inpainting_fill")
        with gr.Row():
            area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], type="index", label="Inpaint area",
                            elem_id="img2img_inpaint_full_res")
            padding = gr.Slider(0, MAX_MASK_PADDING, value=defaults["inpaint_full_res_padding"].default, step=4,
                                label="Only masked padding, pixels", elem_id="img2img_inpaint_full_res_padding")
        soft = soft_inpainting_settings()
    mode.change(shows_inpainting_settings, inputs=[mode], outputs=[section], api_visibility="private",
                show_progress="hidden")
    return {"mask_blur": blur, "inpainting_mask_invert": invert, "inpainting_fill": fill, "inpaint_full_res": area,
            "inpaint_full_res_padding": padding} | soft


# Soft inpainting's sliders' info lines (A1111's in our words): what each does.
_SOFT_INFO = ("when the picture is kept while denoising: below 1 more near the end, above 1 more at the start",
              "how strongly partly masked parts keep the picture (higher: more of the picture)",
              "restores the contrast partly masked parts lose in the blend (higher: stronger colours)",
              "how far the mask biases the difference threshold (0: only the change counts, 1: follow the mask)",
              "how much a part may change and still show the picture's pixels (the change at which they are half "
              "shown)",
              "how sharp the change from the picture's pixels to the new ones is (low: gradual, may ghost)")


def soft_inpainting_settings() -> dict[str, gr.components.Component]:
    """A1111's Soft inpainting: its switch, then its sliders (webui/engine/soft_inpainting.py), by request field."""
    defaults = GenerationRequest.model_fields
    # The switch outside the section, as the hires fix's: whether it is on shows while the section is closed.
    enable = gr.Checkbox(False, label="Soft inpainting", elem_id="img2img_soft_inpainting_enabled",
                         info="blend the picture and the new content by the mask's shades, so no seam shows; a high "
                              "Mask blur is recommended (at 0 the mask has no shades to blend by)")
    sliders = {}
    with gr.Accordion("Soft inpainting settings", open=False, elem_id="img2img_soft_inpainting"):
        for index, (name, label, (low, high), step, info) in enumerate(
                zip(SOFT_INPAINTING_FIELDS, SOFT_LABELS, SOFT_RANGES, SOFT_STEPS, _SOFT_INFO)):
            if index == 3:  # A1111's second group: how the final pixels are laid in
                gr.Markdown("Pixel composite: the picture's pixels laid back where the result changed little")
            sliders[name] = gr.Slider(low, high, value=defaults[name].default, step=step, label=label, info=info,
                                      elem_id=f"img2img_{name}")
    return {"soft_inpainting": enable} | sliders


def shows_inpainting_settings(mode: str) -> gr.Accordion:
    return gr.Accordion(visible=mode in INPAINTING_MODES)


def open_picture(mode: str, inputs: dict[str, Any]) -> Any:
    """The open sub-tab's picture to start from, as Gradio gave it (None when empty), out of the sub-tabs'
    inputs by generate() parameter: a canvas's picture as uploaded (Inpaint) or as painted (the sketches)."""
    if mode in CANVASES:
        name, part = CANVASES[mode]
        value = inputs.get(name)
        return value.get(part) if isinstance(value, dict) else value
    if mode == BATCH:
        uploads = inputs.get("batch_pictures") or []
        return read_upload(uploads[0], "Batch") if uploads else None
    return inputs.get("inpaint_image") if mode == INPAINT_UPLOAD else inputs.get("init_image")


def start_pictures(mode: str, inputs: dict[str, Any]) -> tuple[Image.Image, Image.Image | None]:
    """The picture to start from and the mask (None: plain img2img) of the open sub-tab, out of the sub-tabs'
    inputs by generate() parameter; InvalidRequest saying what to upload where one is missing or unreadable."""
    picture = readable(open_picture(mode, inputs), NO_STROKES.get(mode, NO_PICTURE))
    if mode in NO_STROKES:  # the canvases whose strokes are the mask
        return picture, painted_mask(picture, inputs[CANVASES[mode][0]].get("layers") or [], NO_STROKES[mode])
    if mode == INPAINT_UPLOAD:
        return picture, readable(inputs.get("mask"), NO_MASK)
    return picture, None


def outpainting_start(picture: Image.Image | None, mask: Image.Image | None, pixels: int, mask_blur: int,
                      directions: list[str] | None) -> tuple[Image.Image, Image.Image, dict]:
    """Poor man's outpainting of the picture of the img2img sub-tab (webui/outpainting.py's outpainting_job);
    InvalidRequest saying what to change."""
    if picture is None:
        raise InvalidRequest(NO_PICTURE)
    if mask is not None:
        raise InvalidRequest("Poor man's outpainting makes its own mask: use it on the img2img sub-tab, not an "
                             "inpainting one")
    return outpainting_job(picture, pixels, mask_blur, directions)


def readable(picture: Any, missing: str) -> Image.Image:
    if picture is None:
        raise InvalidRequest(missing)
    if isinstance(picture, UnreadablePicture):
        raise InvalidRequest(picture.problem())
    return picture


def painted_mask(picture: Image.Image, layers: list[Image.Image], no_strokes: str) -> Image.Image:
    """A canvas's strokes as a mask ("L", the picture's size): white wherever any layer was painted, however
    see-through the brush; InvalidRequest(no_strokes) when none was."""
    sheet = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    for layer in layers:
        layer = layer.convert("RGBA")
        sheet.alpha_composite(layer if layer.size == picture.size else layer.resize(picture.size))
    mask = sheet.getchannel("A").point(lambda alpha: 255 if alpha else 0)
    if mask.getbbox() is None:
        raise InvalidRequest(no_strokes)
    return mask


def batch_uploads(pictures: list[str] | None, masks: list[str] | None
                  ) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Batch's pictures (paths), each with its mask: the one of the same name, the only one, or None (no masks:
    img2img); and why each picture left out could not be read (as A1111, a batch runs without them), or
    InvalidRequest naming what to fix (none readable, a mask unreadable). Only the files' headers are read here:
    each picture is read when its turn comes."""
    pictures, masks = list(pictures or []), list(masks or [])
    if not pictures:
        raise InvalidRequest(NO_BATCH)
    if len(pictures) > MAX_BATCH_PICTURES:
        raise InvalidRequest(f"Batch: {len(pictures)} pictures; send at most {MAX_BATCH_PICTURES} at once")
    readable, unreadable = [], []
    for path in pictures:
        try:
            read_upload(path, "Batch", header_only=True)
            readable.append(path)
        except InvalidRequest as err:
            unreadable.append(str(err))
    if not readable:
        raise InvalidRequest(unreadable[0] if len(unreadable) == 1 else
                             f"Batch: none of the {len(unreadable)} pictures can be read ({unreadable[0]})")
    pairs = _with_masks(readable, masks)
    for mask in dict.fromkeys(mask for _, mask in pairs if mask):  # those of the pictures that run, each once
        read_upload(mask, "Batch mask", header_only=True)
    return pairs, unreadable


def _with_masks(pictures: list[str], masks: list[str]) -> list[tuple[str, str | None]]:
    """Each picture with its mask: the one of the same name, the only one, or None."""
    if len(masks) <= 1:
        return [(picture, masks[0] if masks else None) for picture in pictures]
    by_name = {Path(mask).stem: mask for mask in masks}
    missing = [Path(picture).name for picture in pictures if Path(picture).stem not in by_name]
    if missing:
        raise InvalidRequest(f"Batch: no mask is named as {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                             "; name each mask as its picture (any image type), or upload one mask for all")
    return [(picture, by_name[Path(picture).stem]) for picture in pictures]


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def folder_pictures(folder: str, label: str, where: str = "Batch") -> list[str]:
    """The pictures of a server folder (Batch's Input directory), in natural order (img2 before img10), hidden
    files left out; InvalidRequest naming what to fix (`where`: the sub-tab's name), also for a folder of more
    than MAX_BATCH_PICTURES (found without listing all of a huge one)."""
    shown = repr(folder.strip()[:200])
    try:
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            raise InvalidRequest(f"{where}: {label} {shown} is no folder on this machine; give a folder's full path")
        pictures = []
        for child in path.iterdir():
            if (not child.name.startswith(".") and child.suffix.lower() in PICTURE_SUFFIXES
                    and child.is_file()):
                pictures.append(str(child))
                if len(pictures) > MAX_BATCH_PICTURES:
                    raise InvalidRequest(f"{where}: {label} {shown} holds more than {MAX_BATCH_PICTURES} "
                                         f"pictures; at most {MAX_BATCH_PICTURES} run at once: split the folder")
    except (OSError, RuntimeError) as err:  # unreadable, a path too long, an unknown ~user
        raise InvalidRequest(f"{where}: {label} {shown} cannot be read ({getattr(err, 'strerror', None) or err})"
                             ) from None
    if not pictures:
        raise InvalidRequest(f"{where}: {label} {shown} holds no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return sorted(pictures, key=_natural_order)


def output_folder(folder: str, where: str = "Batch") -> Path:
    """Batch's Output directory: the folder, absolute; one not there yet is made with the first picture saved there
    (as A1111 makes it). InvalidRequest naming what to fix where it (or the folder it would be made in) is a file or
    cannot be written to, found before the batch starts."""
    shown = repr(folder.strip()[:200])
    try:
        path = Path(folder.strip()).expanduser().absolute()
        existing = next(each for each in (path, *path.parents) if each.exists())  # where it would be made
        if not existing.is_dir():
            raise InvalidRequest(f"{where}: Output directory {shown} is a file on this machine; give the full path "
                                 "of a folder")
        # Written to, not judged by its permission bits, which a read-only drive or an ACL makes wrong. Linux's
        # temporary file has no name, so nothing shows in the folder even for a moment.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except (OSError, RuntimeError) as err:  # not writable, a path too long, an unknown ~user
        raise InvalidRequest(f"{where}: Output directory {shown} cannot be written to "
                             f"({getattr(err, 'strerror', None) or err}); give a folder this server may write in"
                             ) from None
    return path


def _natural_order(path: str) -> list:
    """A name's key with its numbers as numbers, as A1111 (and file managers) sort: img2 before img10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", Path(path).name)]


def read_upload(path: str, where: str, header_only: bool = False) -> Image.Image | None:
    """An uploaded picture, read whole (None with header_only: only checked); InvalidRequest naming it if it is no
    picture, too large, or (read whole) its pixels end early."""
    try:
        with Image.open(path) as image:
            check_picture_size(*image.size)
            if header_only:
                return None
            image.load()
            return image.copy()
    except ValueError as err:
        raise InvalidRequest(f"{where}: {Path(path).name}: {err}") from None
    except Image.DecompressionBombError:  # PIL's own limit, far above ours: it stops before the size is known
        raise InvalidRequest(UnreadablePicture(Path(path).name, TOO_LARGE, where).problem()) from None
    except (OSError, SyntaxError):
        raise InvalidRequest(UnreadablePicture(Path(path).name, field=where).problem()) from None
