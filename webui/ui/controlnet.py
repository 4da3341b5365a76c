"""The "ControlNet" section of txt2img and img2img, as sd-webui-controlnet's unit: Enable, the control picture, the
preprocessor and its sliders, the model (with ↻), weight, starting and ending control step, resize mode, and a
Preview of the preprocessed map. Its widgets are keyed by request field (generation.py passes them to Generate)."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from webui.controlnet import CANNY_HIGH, CANNY_LOW, CN_MODULES, CN_PROCESSOR_RES, CN_RESIZE_MODES
from webui.engine.controlnet import ControlNetLibrary, detect_map
from webui.engine.img2img import as_rgb, check_picture_size
from webui.schemas import MAX_SIZE, MIN_SIZE
from webui.ui.params import with_labels
from webui.ui.pictures import UnreadablePicture, tolerant

NO_MODEL = "None"  # the extension's pick for no model


class ControlNetActions:
    """The section's event functions: widget values in, widget values out."""

    def __init__(self, library: ControlNetLibrary):
        self.library = library

    def model_choices(self) -> list[str]:
        return [NO_MODEL, *self.library.titles()]

    def refresh_models(self, picked: str | None) -> dict:
        """The ↻: the folder read again, the pick kept where it is still there."""
        choices = self.model_choices()
        return gr.update(choices=choices, value=picked if picked in choices else NO_MODEL)

    @staticmethod
    def sliders_for(module: str) -> tuple[dict, dict, dict]:
        """Resolution and the thresholds shown where the preprocessor reads them (Canny)."""
        canny = module == "canny"
        return gr.update(visible=canny), gr.update(visible=canny), gr.update(visible=canny)

    @staticmethod
    def preview(picture: Image.Image | None, module: str, processor_res: int, low: float, high: float) -> Image.Image:
        """The control map the preprocessor makes of the picture (at its own size, before the fit to the run's)."""
        if picture is None:
            raise gr.Error("Upload a control picture first.")
        if isinstance(picture, UnreadablePicture):
            raise gr.Error(with_labels(picture.problem()))  # named as on the page, as Generate names it
        if module not in CN_MODULES:
            raise gr.Error(f"Pick a preprocessor: {', '.join(CN_MODULES)}.")
        try:
            check_picture_size(*picture.size)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return detect_map(as_rgb(picture), module, int(processor_res), low, high)


def request_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The request's ControlNet fields from the section's widget values (by field); off, none (the request's
    defaults stand). The picture is not among them: the worker takes it beside the request."""
    if not values.get("controlnet_enabled"):
        return {}
    model = values.get("controlnet_model")
    return {name: value for name, value in values.items() if name != "controlnet_image"} | {
        "controlnet_model": None if model in (None, "", NO_MODEL) else model}


def controlnet_section(kind: str, library: ControlNetLibrary) -> dict[str, gr.components.Component]:
    """The accordion, inside the column it is called in; its widgets by request field."""
    actions = ControlNetActions(library)
    with gr.Accordion("ControlNet", open=False, elem_id=f"{kind}_controlnet"):
        enable = gr.Checkbox(False, label="Enable", elem_id=f"{kind}_controlnet_enable")
        with gr.Row():
            # image_mode None: the worker lays a transparent part on white, as for the API (Gradio's RGB: black)
            picture = tolerant(gr.Image(type="pil", label="Control picture", sources=["upload", "clipboard"],
                                        height=256, image_mode=None, format="png", elem_id=f"{kind}_controlnet_image"),
                               "controlnet_image")
            shown = gr.Image(label="Preprocessor preview", interactive=False, height=256,
                             elem_id=f"{kind}_controlnet_preview")
        with gr.Row():
            module = gr.Dropdown(list(CN_MODULES), value="none", label="Preprocessor",
                                 elem_id=f"{kind}_controlnet_module")
            # allow_custom_value: a pasted infotext's model from another machine (another hash) is kept to be found
            model = gr.Dropdown(actions.model_choices(), value=NO_MODEL, label="Model", allow_custom_value=True,
                                elem_id=f"{kind}_controlnet_model")
            refresh = gr.Button("↻", elem_id=f"{kind}_controlnet_refresh", scale=0, min_width=40)
            preview = gr.Button("Preview", elem_id=f"{kind}_controlnet_preview_button", scale=0, min_width=80)
        with gr.Row():
            weight = gr.Slider(0, 2, value=1, step=0.05, label="Control Weight", elem_id=f"{kind}_controlnet_weight")
            start = gr.Slider(0, 1, value=0, step=0.01, label="Starting Control Step",
                              elem_id=f"{kind}_controlnet_guidance_start")
            end = gr.Slider(0, 1, value=1, step=0.01, label="Ending Control Step",
                            elem_id=f"{kind}_controlnet_guidance_end")
        with gr.Row():
            resolution = gr.Slider(MIN_SIZE, MAX_SIZE, value=CN_PROCESSOR_RES, step=8, label="Preprocessor Resolution",
                                   visible=False, elem_id=f"{kind}_controlnet_processor_res")
            low = gr.Slider(1, 255, value=CANNY_LOW, step=1, label="Canny Low Threshold", visible=False,
                            elem_id=f"{kind}_controlnet_threshold_a")
            high = gr.Slider(1, 255, value=CANNY_HIGH, step=1, label="Canny High Threshold", visible=False,
                             elem_id=f"{kind}_controlnet_threshold_b")
        with gr.Row():
            pixel_perfect = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{kind}_controlnet_pixel_perfect",
                                        info="the preprocessor's resolution from the run's size")
            resize_mode = gr.Radio(list(CN_RESIZE_MODES), value=CN_RESIZE_MODES[1], type="index", label="Resize Mode",
                                   elem_id=f"{kind}_controlnet_resize_mode")
    private = dict(api_visibility="private", show_progress="hidden")
    module.change(actions.sliders_for, inputs=[module], outputs=[resolution, low, high], **private)
    refresh.click(actions.refresh_models, inputs=[model], outputs=[model], **private)
    preview.click(actions.preview, inputs=[picture, module, resolution, low, high], outputs=[shown], **private)
    return {"controlnet_enabled": enable, "controlnet_image": picture, "controlnet_module": module,
            "controlnet_model": model, "controlnet_weight": weight, "controlnet_guidance_start": start,
            "controlnet_guidance_end": end, "controlnet_processor_res": resolution, "controlnet_threshold_a": low,
            "controlnet_threshold_b": high, "controlnet_pixel_perfect": pixel_perfect,
            "controlnet_resize_mode": resize_mode}
