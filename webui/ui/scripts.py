"""The controls of A1111's scripts, at the foot of the txt2img and img2img tabs: those that make several runs
from one Generate, the X/Y/Z plot (webui/xyz_plot.py reads it into runs and draws the grid), the prompt matrix
(webui/prompt_matrix.py) and prompts from a list (webui/prompt_lines.py reads the lines); and img2img's poor
man's outpainting (webui/outpainting.py), Loopback (webui/loopback.py) and SD upscale (webui/sd_upscale.py)."""
from __future__ import annotations

import gradio as gr

from webui.loopback import CURVES, INTERROGATIONS, MAX_LOOPS
from webui.prompt_lines import PROMPT_POSITIONS
from webui.outpainting import DIRECTIONS, MAX_BLUR, MAX_PIXELS, MIN_PIXELS
from webui.schemas import MASKED_CONTENT
from webui.sd_upscale import DEFAULT_UPSCALER, MAX_OVERLAP, MAX_SCALE, MIN_SCALE
from webui.xyz_plot import AXIS_NAMES, AXIS_TYPES

MAX_PROMPT_FILE_CHARS = 200_000  # a hundred lines of long prompts, with room
VALUES_HELP = "5, 10, 20 · ranges 1-5, 1-9 (+2), 0-1 [5] · sizes 512x768"


def _switched(widgets: dict, key: str, label: str, elem_id: str, info: str, settings: str) -> gr.Accordion:
    """A script's switch (generate()'s parameter `key`, into `widgets`) and the closed section of its settings,
    to fill inside a `with`."""
    widgets[key] = gr.Checkbox(False, label=label, elem_id=elem_id, info=info)
    return gr.Accordion(settings, open=False, elem_id=f"{elem_id}_settings")


def _img2img_sliders(widgets: dict, *sliders: tuple[str, float, float, float, float, str]) -> None:
    """A row of img2img scripts' sliders, each (generate()'s parameter, minimum, maximum, value, step, label),
    into `widgets`; elem_id img2img_<parameter>."""
    with gr.Row():
        for key, minimum, maximum, value, step, label in sliders:
            widgets[key] = gr.Slider(minimum, maximum, value=value, step=step, label=label, elem_id=f"img2img_{key}")


def axis_types(kind: str) -> list[str]:
    """The axis types a tab offers: those of both tabs and its own (img2img has no hires fix)."""
    return [label for label, axis in AXIS_TYPES.items() if axis.tab in (None, kind)]


def plot_section(kind: str) -> dict[str, gr.components.Component]:
    """The switch and the axes, by generate() parameter; the switch outside the section, as the hires fix's."""
    widgets = {"xyz_plot": gr.Checkbox(False, label="X/Y/Z plot", elem_id=f"{kind}_xyz_plot",
                                       info="one run for each combination of the values below, in a grid")}
    with gr.Accordion("X/Y/Z plot settings", open=False, elem_id=f"{kind}_xyz"):
        for name in AXIS_NAMES:
            key = name.lower()
            with gr.Row():
                widgets[f"{key}_type"] = gr.Dropdown(axis_types(kind), value="Nothing", label=f"{name} type",
                                                     elem_id=f"{kind}_xyz_{key}_type", scale=1)
                widgets[f"{key}_values"] = gr.Textbox("", label=f"{name} values", placeholder=VALUES_HELP,
                                                      elem_id=f"{kind}_xyz_{key}_values", scale=3)
        with gr.Row():
            widgets["xyz_legend"] = gr.Checkbox(True, label="Draw legend", elem_id=f"{kind}_xyz_legend")
            widgets["xyz_sub_images"] = gr.Checkbox(False, label="Include sub images",
                                                    elem_id=f"{kind}_xyz_sub_images")
            widgets["xyz_sub_grids"] = gr.Checkbox(False, label="Include sub grids", elem_id=f"{kind}_xyz_sub_grids",
                                                   info="with a Z axis: each Z value's grid too")
            widgets["xyz_keep_random_seeds"] = gr.Checkbox(False, label="Keep -1 for seeds",
                                                           elem_id=f"{kind}_xyz_keep_random_seeds")
    return widgets


def prompt_list_section(kind: str) -> dict[str, gr.components.Component]:
    """A1111's "Prompts from file or textbox", by generate() parameter; a text file dropped in fills the box."""
    widgets = {}
    with _switched(widgets, "prompt_list", "Prompts from a list", f"{kind}_prompt_list", "one run for each line below",
                   "Prompts from a list"):
        widgets["prompt_lines"] = gr.Textbox("", lines=5, max_lines=20, label="One prompt a line",
                                             placeholder='a red fox\n--prompt "a blue fox" --steps 30 --seed 5',
                                             elem_id=f"{kind}_prompt_lines")
        upload = gr.File(file_types=[".txt"], type="filepath", label="or a text file of them", height=90,
                         elem_id=f"{kind}_prompt_file")
        with gr.Row():
            widgets["prompt_list_iterate_seed"] = gr.Checkbox(False, label="Iterate seed every line",
                                                              elem_id=f"{kind}_prompt_list_iterate_seed")
            widgets["prompt_list_same_seed"] = gr.Checkbox(False, label="Use the same random seed for all lines",
                                                           elem_id=f"{kind}_prompt_list_same_seed")
        # A1111 1.10's: a line's prompt joins the tab's own (where both have one), before or after it
        widgets["prompt_list_position"] = gr.Radio(list(PROMPT_POSITIONS), value=PROMPT_POSITIONS[0],
                                                   label="Insert prompts at the", elem_id=f"{kind}_prompt_list_position")
    upload.upload(read_prompt_file, inputs=[upload], outputs=[widgets["prompt_lines"]], api_visibility="private",
                  show_progress="hidden")
    return widgets


def outpainting_section() -> dict[str, gr.components.Component]:
    """A1111's "Poor man's outpainting" (img2img), by generate() parameter: grow the picture and draw the border."""
    widgets = {}
    with _switched(widgets, "outpainting", "Poor man's outpainting", "img2img_outpainting",
                   "a larger canvas, its new border drawn to match the picture", "Outpainting settings"):
        _img2img_sliders(widgets, ("outpaint_pixels", MIN_PIXELS, MAX_PIXELS, 128, 8, "Pixels to expand"),
                         ("outpaint_mask_blur", 0, MAX_BLUR, 4, 1, "Mask blur"))
        with gr.Row():
            widgets["outpaint_fill"] = gr.Radio(list(MASKED_CONTENT), value="fill", type="index", label="Masked content",
                                                elem_id="img2img_outpaint_fill")
            widgets["outpaint_directions"] = gr.CheckboxGroup(list(DIRECTIONS), value=list(DIRECTIONS),
                                                              label="Outpainting direction",
                                                              elem_id="img2img_outpaint_directions")
    return widgets


def loopback_section() -> dict[str, gr.components.Component]:
    """A1111's "Loopback" (img2img), by generate() parameter: each picture made starts the next run."""
    widgets = {}
    with _switched(widgets, "loopback", "Loopback", "img2img_loopback",
                   "each picture made is the picture to start the next run from", "Loopback settings"):
        _img2img_sliders(widgets, ("loopback_loops", 1, MAX_LOOPS, 4, 1, "Loops"),
                         ("loopback_final_strength", 0, 1, 0.5, 0.01, "Final denoising strength"))
        widgets["loopback_curve"] = gr.Radio(list(CURVES), value="Linear", label="Denoising strength curve",
                                             elem_id="img2img_loopback_curve")
        widgets["loopback_interrogation"] = gr.Radio(
            list(INTERROGATIONS), value="None", label="Append interrogated prompt at each iteration",
            info="CLIP: each loop's prompt ends with what Interrogate CLIP says of the picture it starts from",
            elem_id="img2img_loopback_interrogation")
    return widgets


def sd_upscale_section(upscalers: list[str]) -> dict[str, gr.components.Component]:
    """A1111's "SD upscale" (img2img), by generate() parameter: the picture enlarged (by one of `upscalers`), then
    drawn again in tiles of the Width x Height."""
    widgets = {}
    with _switched(widgets, "sd_upscale", "SD upscale", "img2img_sd_upscale",
                   "enlarge the picture, then draw it again in tiles of the Width x Height", "SD upscale settings"):
        _img2img_sliders(widgets, ("sd_upscale_overlap", 0, MAX_OVERLAP, 64, 16, "Tile overlap"),
                         ("sd_upscale_scale", MIN_SCALE, MAX_SCALE, 2.0, 0.05, "Scale Factor"))
        # A dropdown, not A1111's radio: the model upscalers' files may be many
        widgets["sd_upscale_upscaler"] = gr.Dropdown(upscalers, value=DEFAULT_UPSCALER, label="Upscaler",
                                                     elem_id="img2img_sd_upscale_upscaler")
    return widgets


MATRIX_PROMPTS = ("positive", "negative")  # A1111's "Select prompt"


def prompt_matrix_section(kind: str) -> dict[str, gr.components.Component]:
    """A1111's "Prompt matrix", by generate() parameter: every combination of the prompt's parts after "|"."""
    widgets = {}
    with _switched(widgets, "prompt_matrix", "Prompt matrix", f"{kind}_prompt_matrix",
                   'every combination of the parts after "|" in the prompt, in a grid', "Prompt matrix settings"):
        with gr.Row():
            widgets["matrix_parts_first"] = gr.Checkbox(False, label="Put variable parts at start of prompt",
                                                        elem_id=f"{kind}_matrix_parts_first")
            widgets["matrix_different_seeds"] = gr.Checkbox(False, label="Use different seed for each picture",
                                                            elem_id=f"{kind}_matrix_different_seeds")
            widgets["matrix_prompt"] = gr.Radio(list(MATRIX_PROMPTS), value="positive", label="Select prompt",
                                                elem_id=f"{kind}_matrix_prompt")
    return widgets


def read_prompt_file(path: str | None) -> str:
    if not path:
        return gr.skip()
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read(MAX_PROMPT_FILE_CHARS + 1)[:MAX_PROMPT_FILE_CHARS]
    except (OSError, UnicodeDecodeError):
        raise gr.Error("That file is no UTF-8 text; save the prompts as a .txt file, one a line.") from None
