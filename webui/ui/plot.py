"""The X/Y/Z plot's controls (A1111's script of that name), in the txt2img and img2img tabs; webui/xyz_plot.py
reads them into runs and draws the grid."""
from __future__ import annotations

import gradio as gr

from webui.xyz_plot import AXIS_NAMES, AXIS_TYPES

VALUES_HELP = "5, 10, 20 · ranges 1-5, 1-9 (+2), 0-1 [5] · sizes 512x768"


def axis_types(kind: str) -> list[str]:
    """The axis types a tab offers: img2img has no hires fix."""
    return [label for label in AXIS_TYPES if not (kind == "img2img" and label == "Hires steps")]


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
            widgets["xyz_keep_random_seeds"] = gr.Checkbox(False, label="Keep -1 for seeds",
                                                           elem_id=f"{kind}_xyz_keep_random_seeds")
    return widgets
