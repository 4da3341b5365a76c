"""The PNG Info tab: drop a PNG (ours or stable-diffusion-webui's) and read its parameters."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from webui.storage.infotext import parse_infotext, request_fields_from_infotext
from webui.storage.outputs import MAX_SCANNED_PIXELS, png_texts_only, read_infotext, text_chunks
from webui.ui.progress import error_html


OTHER_TEXT = "Other text in the file"


@dataclass
class PngInfoTab:
    image: gr.Image
    table: gr.HTML
    infotext: gr.Textbox
    send: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button


def _opened(path: str) -> Image.Image:
    """The picture opened for its text; a PNG too large to decode (past MAX_SCANNED_PIXELS, or past PIL's pixel
    limit), or one PIL will not open for a text chunk past its size limit (another program's embedded workflow), as
    a stand-in holding its text chunks, before or after its pixels."""
    refused = None
    try:
        image = Image.open(path)
    except (Image.DecompressionBombError, ValueError) as err:
        image, refused = None, err
    if image is not None and not (image.format == "PNG" and image.width * image.height > MAX_SCANNED_PIXELS):
        return image
    with open(path, "rb") as file:
        stand_in = png_texts_only(file)
    if stand_in is None:
        if image is None:
            raise refused
        return image
    if image is not None:
        image.close()
    return stand_in


def read_parameters(upload: dict | str | None) -> tuple[str, str]:
    """(raw infotext, HTML table of its parameters) for an uploaded file; a message when it has none.

    Takes Gradio's unprocessed upload (a FileData dict) or a path: gr.Image would open the file with PIL
    before this runs and turn a broken file into an internal error that leaves the old parameters up.
    """
    path = uploaded_path(upload)
    if not path:
        return "", ""
    name = (upload.get("orig_name") if isinstance(upload, dict) else None) or os.path.basename(path)
    damaged = False
    try:
        with _opened(path) as image:
            others = text_chunks(image)  # A1111's postprocessing (Extras), a program's Software, ...
            text = read_infotext(image)  # what comes before the pixels (ours and A1111's PNGs)
            try:
                if image.width * image.height <= MAX_SCANNED_PIXELS:  # a small upload may decode to gigabytes
                    image.load()  # finds a damaged file, and reads text stored after the pixels
                    text = read_infotext(image)
            except (OSError, SyntaxError, ValueError):
                if not text:
                    raise
                damaged = True  # cut short after its parameters (a broken download): they still help
    except Image.DecompressionBombError:  # no PNG, whose text could be read without the pixels
        return "", error_html(f"Could not read {name}: at {Image.MAX_IMAGE_PIXELS * 2:,} pixels or more a JPEG or "
                              "WebP file is too large to open here (a PNG's parameters are read at any size).")
    except (OSError, SyntaxError, ValueError):
        # PIL's message names the server's temp path; the user only needs to know which file failed.
        return "", error_html(f"Could not read {name} as an image: it is not a PNG, JPEG or WebP file, "
                              "or it is damaged.")
    if damaged:
        note = f"<div class='dw-notice'>{html.escape(name)} is damaged; its parameters were read from the part that is whole.</div>"
        return text, note + parameters_table(text) + _rows_table(others, OTHER_TEXT)
    if not text:
        return "", ("<div class='dw-notice'>This image carries no generation parameters.</div>"
                    + _rows_table(others, OTHER_TEXT))
    return text, parameters_table(text) + _rows_table(others, OTHER_TEXT)


def uploaded_path(upload: dict | str | None) -> str | None:
    """The server's copy of an upload, from Gradio's unprocessed value (a FileData dict) or a path."""
    return upload.get("path") if isinstance(upload, dict) else upload


def parameters_table(text: str) -> str:
    prompt, negative, params = parse_infotext(text, backcompat=False)  # what the file says
    return _rows_table({"Prompt": prompt, "Negative prompt": negative, **params})


# What the page is sent of a file's other text: a file may carry thousands of chunks (a 40 MB PNG made a 40 MB table).
MAX_ROWS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 50, 100, 10_000


def _rows_table(rows: dict[str, str], caption: str = "") -> str:
    """A table of the rows that have a value ("" when none has): at most MAX_ROWS, long text cut, with a note of
    what is left out."""
    filled = [(key, str(value)) for key, value in rows.items() if value]
    cells = "".join(f"<tr><th>{html.escape(_cut(key, MAX_KEY_CHARS))}</th>"
                    f"<td>{html.escape(_cut(value, MAX_VALUE_CHARS))}</td></tr>" for key, value in filled[:MAX_ROWS])
    if len(filled) > MAX_ROWS:
        cells += f"<tr><td colspan='2'>{len(filled) - MAX_ROWS} more not shown</td></tr>"
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='dw-params'>{title}{cells}</table>" if cells else ""


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else f"{text[:most]}… ({len(text) - most} more characters)"


def fields_for_txt2img(text: str) -> dict:
    if not text:
        raise gr.Error("Drop a PNG with generation parameters first.")
    return request_fields_from_infotext(text)


def fields_to_paste(prompt: str, last_infotext: str) -> dict:
    """A1111's ↙: the fields an infotext pasted into the prompt box gives, or with the box empty, those of the
    last picture shown (last_infotext); gr.Error saying what to do where there are none."""
    if not (prompt or "").strip():
        if not last_infotext:
            raise gr.Error("Nothing to read: paste a picture's parameters into the prompt, or make a picture first.")
        return request_fields_from_infotext(last_infotext)
    if not parse_infotext(prompt)[2]:
        raise gr.Error("The prompt holds no parameters to read: paste a picture's whole parameters (its prompt, "
                       "then a line such as 'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512').")
    return request_fields_from_infotext(prompt)


def picture_for_img2img(upload: dict | str | None, text: str) -> tuple[str, dict]:
    """The dropped picture and its parameters, if it has any (a picture without them is a start too)."""
    path = uploaded_path(upload)
    if not path:
        raise gr.Error("Drop a picture first.")
    return path, request_fields_from_infotext(text) if text else {}


def send_buttons(prefix: str) -> tuple[gr.Button, gr.Button, gr.Button, gr.Button]:
    """Send to txt2img, img2img, inpaint and extras (PNG Info's and History's), elem_ids <prefix>_send..."""
    return (gr.Button("Send to txt2img", elem_id=f"{prefix}_send"),
            gr.Button("Send to img2img", elem_id=f"{prefix}_send_img2img"),
            gr.Button("Send to inpaint", elem_id=f"{prefix}_send_inpaint"),
            gr.Button("Send to extras", elem_id=f"{prefix}_send_extras"))


def build_pnginfo() -> PngInfoTab:
    with gr.Row():
        with gr.Column():
            # Shown as a preview only: read_parameters opens the uploaded file itself (preprocess=False).
            image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="pnginfo_image", height=400)
        with gr.Column():
            table = gr.HTML("", label="Parameters table", show_label=False, elem_id="pnginfo_params", padding=False)
            infotext = gr.Textbox(label="Parameters text", lines=5, interactive=False, elem_id="pnginfo_infotext",
                                  buttons=["copy"])
            with gr.Row():
                send, send_img2img, send_inpaint, send_extras = send_buttons("pnginfo")
    image.change(read_parameters, inputs=[image], outputs=[infotext, table], api_name="png_info",
                 show_progress="hidden", preprocess=False)
    return PngInfoTab(image, table, infotext, send, send_img2img, send_inpaint, send_extras)
