"""The Extras tab: pictures resized (webui/extras.py), each saved under outputs/extras-images with
the parameters it carried and what was done to it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image

from webui.extras import (
    FILTERS_ONLY, MAX_PICTURES, MAX_SCALE, NO_UPSCALER, Upscaled, Upscalers, parse_upscale, upscale,
)
from webui.schemas import InvalidRequest
from webui.storage.infotext import request_fields_from_infotext
from webui.storage.outputs import OutputStore, read_infotext
from webui.ui.pictures import UnreadablePicture, folder_pictures, read_upload, tolerant
from webui.ui.progress import error_html, left_out_html, notice_html

SINGLE, BATCH, DIRECTORY = "Single Image", "Batch Process", "Batch from Directory"
SINGLE_ID = "single"  # the Single Image sub-tab's id, which the "Send to extras" buttons open
RESIZE_MODES = ("Scale by", "Scale to")  # resize_mode 0 and 1
NO_SINGLE = "Upload a picture to resize first."
NO_BATCH = "Batch Process: upload the pictures to resize first."
NO_FOLDERS = ("Batch from Directory: this server reads no folders typed into the page (it is served to other "
              "machines without a login, or started with --hide-ui-dir-config); upload the pictures instead")


@dataclass
class ExtrasTab:
    subtab: gr.Textbox  # the open sub-tab's name
    tabs: gr.Tabs  # its sub-tabs: SINGLE_ID and "batch"
    image: gr.Image
    batch: gr.File
    input_dir: gr.Textbox  # Batch from Directory's folder on the server
    settings: dict[str, gr.components.Component]  # by UpscaleSettings field
    run: gr.Button
    gallery: gr.Gallery
    info: gr.HTML
    selected: gr.State  # the gallery's picked picture (its index)
    send_img2img: gr.Button  # the picked picture and the parameters it carries to img2img (blocks.py)
    send_inpaint: gr.Button  # the same, onto img2img's Inpaint canvas
    actions: ExtrasActions | None = None  # its events (blocks.py refreshes the upscaler lists on page load)


# The fields each resize mode leaves unused: a cleared box there is no reason to refuse the run.
_UNUSED_BY_MODE = {0: ("upscaling_resize_w", "upscaling_resize_h", "upscaling_crop"), 1: ("upscaling_resize",)}


class ExtrasActions:
    def __init__(self, outputs: OutputStore, labels: dict[str, str] | None = None, server_folders: bool = False,
                 upscalers: Upscalers = FILTERS_ONLY):
        self.outputs = outputs
        self.upscalers = upscalers
        self.labels = labels or {}  # UpscaleSettings field -> the label of its control, for messages
        self.server_folders = server_folders  # whether Batch from Directory may read a folder (Settings)

    def run(self, subtab: str, image: str | UnreadablePicture | None, batch: list[str] | None,
            settings: dict[str, Any], on_picture: Callable[[int, int], None] | None = None,
            input_dir: str = "") -> tuple[Any, str]:
        """(gallery items, message) for the open sub-tab's pictures resized and saved; on_picture(n, count) before
        each. A picture that fails stops the batch there, and says which one and why; those resized before it stay
        shown and saved."""
        unused = _UNUSED_BY_MODE.get(settings.get("resize_mode"), ())
        left_out: list[str] = []  # Batch from Directory: the files it cannot read, and why (as A1111's, it goes on)
        try:
            upscale_settings = parse_upscale({k: v for k, v in settings.items() if k not in unused}, self.labels)
            self.upscalers.check(upscale_settings)
            paths = self._folder(input_dir, left_out) if subtab == DIRECTORY else self._uploads(subtab, image, batch)
        except InvalidRequest as err:
            return gr.skip(), error_html(str(err))
        shown, unsaved = [], []
        for number, path in enumerate(paths):
            if on_picture:
                on_picture(number, len(paths))
            try:
                done = upscale(read_upload(path, subtab), upscale_settings, self.upscalers)
            except InvalidRequest as err:
                if subtab == DIRECTORY:  # its pixels end early: found only now that it is read whole
                    left_out.append(str(err))
                    continue
                return shown or gr.skip(), error_html(f"{_done_before(len(shown))}{err}")
            except ValueError as err:
                return shown or gr.skip(), error_html(f"{_done_before(len(shown))}{Path(path).name}: {err}")
            shown.append(self._saved(done, unsaved))
        if not shown:
            return gr.skip(), error_html(f"{DIRECTORY}: none of its pictures can be read ({left_out[0]})")
        return shown, self._summary(done, unsaved) + left_out_html(DIRECTORY, left_out)

    def upscaler_lists(self) -> tuple:
        """Upscaler 1's and 2's lists as they are now: a model upscaler's file may have come since the page was
        built."""
        names = self.upscalers.names()
        return gr.update(choices=names), gr.update(choices=names)

    @staticmethod
    def sent_picture(items: list[tuple[Any, str | None]] | None, index: int | None) -> tuple[Any, dict]:
        """The gallery's picked picture (the first if none is) and the parameters it carries, for Send to img2img."""
        if not items:
            raise gr.Error("Resize a picture first.")
        picture = items[min(index or 0, len(items) - 1)][0]
        try:
            with Image.open(picture) as opened:
                text = read_infotext(opened)
        except (OSError, ValueError, Image.DecompressionBombError):
            text = None  # sent all the same: img2img says what is wrong with it
        return picture, request_fields_from_infotext(text) if text else {}

    def _folder(self, input_dir: str | None, left_out: list[str]) -> list[str]:
        """The folder's pictures whose headers read; why each other one cannot be read goes to `left_out`."""
        if not self.server_folders:
            raise InvalidRequest(NO_FOLDERS)
        if not (input_dir or "").strip():
            raise InvalidRequest("Batch from Directory: give the Input directory, a folder of pictures on this machine")
        paths = self._checked(folder_pictures(input_dir, "Input directory", DIRECTORY), DIRECTORY, left_out)
        if not paths:
            raise InvalidRequest(f"{DIRECTORY}: none of its pictures can be read ({left_out[0]})")
        return paths

    @classmethod
    def _uploads(cls, subtab: str, image: str | UnreadablePicture | None, batch: list[str] | None) -> list[str]:
        if subtab == BATCH:
            if not batch:
                raise InvalidRequest(NO_BATCH)
            return cls._checked(list(batch), BATCH)
        if isinstance(image, UnreadablePicture):
            raise InvalidRequest(image.problem())
        if not image:
            raise InvalidRequest(NO_SINGLE)
        return [image]

    @staticmethod
    def _checked(paths: list[str], where: str, left_out: list[str] | None = None) -> list[str]:
        """A batch's pictures: not too many, and each a picture (found before any work is done). With `left_out`, one
        that is not is left out, and why goes there."""
        if len(paths) > MAX_PICTURES:
            raise InvalidRequest(f"{where}: {len(paths)} pictures; resize at most {MAX_PICTURES} at once")
        readable = []
        for path in paths:
            try:
                read_upload(path, where, header_only=True)
                readable.append(path)
            except InvalidRequest as err:
                if left_out is None:
                    raise
                left_out.append(str(err))
        return readable

    def _saved(self, done: Upscaled, unsaved: list[str]) -> Any:
        """The gallery item of a resized picture: its saved file, or the picture itself when it could not be saved
        (the reason kept in `unsaved`)."""
        try:
            return str(self.outputs.save_extra(done.image, done.texts))
        except OSError as err:
            unsaved.append(str(err))
            return done.image

    @staticmethod
    def _summary(done: Upscaled, unsaved: list[str]) -> str:
        what = done.infotext or f"Upscaler {NO_UPSCALER}: the picture is left as it is."
        if unsaved:
            return error_html(f"{what} Not saved ({len(unsaved)}): {unsaved[0]}; is the disk full or read-only?")
        return notice_html(what)


def _done_before(count: int) -> str:
    return f"{count} resized and saved; then " if count else ""


def build_extras(outputs: OutputStore, server_folders: bool = False, upscalers: Upscalers = FILTERS_ONLY) -> ExtrasTab:
    subtab = gr.Textbox(SINGLE, visible=False, label="Extras sub-tab", elem_id="extras_subtab")
    with gr.Row():
        with gr.Column():
            with gr.Tabs(elem_id="extras_tabs") as tabs:
                with gr.Tab(SINGLE, id=SINGLE_ID, elem_id="extras_single_tab") as single_tab:
                    # A path: the file is read whole here, with the parameters it carries.
                    # PNG: a picture sent from an unsaved image is kept whole (Gradio's default is a lossy WebP).
                    image = tolerant(gr.Image(label="Source", type="filepath", image_mode=None, format="png",
                                              height=360, sources=["upload", "clipboard"], elem_id="extras_image"),
                                     "Source")
                with gr.Tab(BATCH, id="batch", elem_id="extras_batch_tab") as batch_tab:
                    batch = gr.File(file_count="multiple", file_types=["image"], type="filepath", height=200,
                                    label=f"Pictures (at most {MAX_PICTURES})", elem_id="extras_batch")
                with gr.Tab(DIRECTORY, id="directory", elem_id="extras_directory_tab",
                            visible=server_folders) as directory_tab:
                    input_dir = gr.Textbox("", label="Input directory", elem_id="extras_input_dir",
                                           placeholder=f"a folder of pictures on this machine (at most {MAX_PICTURES})")
            settings = _settings_controls(upscalers.names())
            faces = _face_controls()
            actions = ExtrasActions(outputs, {name: control.label for name, control in (settings | faces).items()},
                                    server_folders, upscalers)
            run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
        with gr.Column():
            gallery = gr.Gallery(label="Resized", columns=2, height=480, elem_id="extras_gallery", type="filepath",
                                 format="png", interactive=False, buttons=["download", "download_all", "fullscreen"])
            with gr.Row():
                send_img2img = gr.Button("Send to img2img", elem_id="extras_send_to_img2img", size="sm")
                send_inpaint = gr.Button("Send to inpaint", elem_id="extras_send_to_inpaint", size="sm")
            info = gr.HTML("", elem_id="extras_info", padding=False)
    selected = gr.State(0)
    for tab, name in ((single_tab, SINGLE), (batch_tab, BATCH), (directory_tab, DIRECTORY)):
        tab.select(lambda name=name: name, outputs=[subtab], api_visibility="private", show_progress="hidden")
    names, face_names = list(settings), list(faces)

    def run_extras(open_subtab, picture, pictures, *values, progress=gr.Progress()):
        def on_picture(number: int, count: int) -> None:
            progress((number, count), desc="Resizing", unit="pictures")

        folder = values[len(names)] if len(values) > len(names) else ""  # after the settings
        given = dict(zip(names, values)) | dict(zip(face_names, values[len(names) + 1:]))
        return actions.run(open_subtab, picture, pictures, given, on_picture, folder)

    # One at a time: an 8192x8192 result takes 200 MB and seconds to write. The folder, then the face restorers, come
    # last: the Gradio API's callers from before them keep their positions.
    run.click(run_extras, inputs=[subtab, image, batch, *settings.values(), input_dir, *faces.values()],
              outputs=[gallery, info],
              api_name="extras", concurrency_limit=1)
    gallery.select(_picked, outputs=[selected], api_visibility="private", show_progress="hidden")
    gallery.change(lambda: 0, outputs=[selected], api_visibility="private", show_progress="hidden")  # new results
    return ExtrasTab(subtab, tabs, image, batch, input_dir, settings, run, gallery, info, selected, send_img2img,
                     send_inpaint, actions)


def _picked(evt: gr.SelectData) -> int:
    return evt.index if isinstance(evt.index, int) else 0


def _face_controls() -> dict[str, gr.components.Component]:
    """A1111's GFPGAN and CodeFormer sections, by UpscaleSettings field: each restores the faces of the resized
    picture, blended in by its visibility (0: it does not run)."""
    with gr.Row():
        gfpgan = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility", elem_id="extras_gfpgan_visibility")
        codeformer = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                               elem_id="extras_codeformer_visibility")
        weight = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                           elem_id="extras_codeformer_weight")
    return {"gfpgan_visibility": gfpgan, "codeformer_visibility": codeformer, "codeformer_weight": weight}


def _settings_controls(upscalers: list[str]) -> dict[str, gr.components.Component]:
    """The resize controls, by UpscaleSettings field (their values go to parse_upscale as they are)."""
    resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], type="index", label="Resize",
                           elem_id="extras_resize_mode")
    with gr.Row():
        factor = gr.Slider(0.25, MAX_SCALE, value=2, step=0.05, label="Scale by", elem_id="extras_upscaling_resize")
        # No minimum or maximum: Gradio would refuse a run in a pop-up even on "Scale by", where they are unused.
        width = gr.Number(512, label="Scale to: width", precision=0, elem_id="extras_upscaling_resize_w")
        height = gr.Number(512, label="Scale to: height", precision=0, elem_id="extras_upscaling_resize_h")
    crop = gr.Checkbox(True, label="Scale to: crop to fit", elem_id="extras_upscaling_crop")
    with gr.Row():
        first = gr.Dropdown(upscalers, value="Lanczos", label="Upscaler 1", elem_id="extras_upscaler_1")
        second = gr.Dropdown(upscalers, value=NO_UPSCALER, label="Upscaler 2",
                             elem_id="extras_upscaler_2")
        visibility = gr.Slider(0, 1, value=0, step=0.05, label="Upscaler 2 visibility",
                               elem_id="extras_upscaler_2_visibility")
    return {"resize_mode": resize_mode, "upscaling_resize": factor, "upscaling_resize_w": width,
            "upscaling_resize_h": height, "upscaling_crop": crop, "upscaler_1": first, "upscaler_2": second,
            "extras_upscaler_2_visibility": visibility}
