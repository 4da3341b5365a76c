"""The PNG Info tab: drop a PNG (ours or stable-diffusion-webui's) and read its parameters."""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
from PIL import Image, UnidentifiedImageError

from webui.storage.infotext import parse_infotext, request_fields_from_infotext
from webui.storage.outputs import read_infotext


@dataclass
class PngInfoTab:
    image: gr.Image
    table: gr.HTML
    infotext: gr.Textbox
    send: gr.Button


def read_parameters(path: str | None) -> tuple[str, str]:
    """(raw infotext, HTML table of its parameters) for an image file; a message when it has none."""
    if not path:
        return "", ""
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are only read by load()
            text = read_infotext(image)
    except (OSError, UnidentifiedImageError) as err:
        return "", f"<div class='dw-error'>Could not read this file as an image: {html.escape(str(err))}</div>"
    if not text:
        return "", "<div class='dw-notice'>This image carries no generation parameters.</div>"
    return text, parameters_table(text)


def parameters_table(text: str) -> str:
    prompt, negative, params = parse_infotext(text)
    rows = [("Prompt", prompt), ("Negative prompt", negative), *params.items()]
    cells = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
                    for key, value in rows if value)
    return f"<table class='dw-params'>{cells}</table>"


def fields_for_txt2img(text: str) -> dict:
    if not text:
        raise gr.Error("Drop a PNG with generation parameters first.")
    return request_fields_from_infotext(text)


def build_pnginfo() -> PngInfoTab:
    with gr.Row():
        with gr.Column():
            # type="filepath" with image_mode=None hands over the uploaded file untouched, text chunks included.
            image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="pnginfo_image", height=400)
        with gr.Column():
            table = gr.HTML("", label="Parameters table", show_label=False, elem_id="pnginfo_params", padding=False)
            infotext = gr.Textbox(label="Parameters text", lines=5, interactive=False, elem_id="pnginfo_infotext",
                                  buttons=["copy"])
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send")
    image.change(read_parameters, inputs=[image], outputs=[infotext, table], api_name="png_info",
                 show_progress="hidden")
    return PngInfoTab(image, table, infotext, send)
