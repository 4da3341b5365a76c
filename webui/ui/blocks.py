"""The whole page: the model picker above three tabs (txt2img, History, PNG Info) and the wiring
between them ("send to txt2img", history refresh after a run).

`build_ui(services)` gives the gr.Blocks; `create_ui(services)` also hands back the tabs, so tests
can drive the event functions directly. Gradio 6 takes CSS and head scripts at launch()
time; `launch_assets()` holds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from webui.services import Services
from webui.ui.history import HistoryActions, HistoryTab, build_history
from webui.ui.models import ModelActions, ModelPicker, build_model_picker
from webui.ui.params import txt2img_updates
from webui.ui.pnginfo import PngInfoTab, build_pnginfo, fields_for_txt2img
from webui.ui.txt2img import Txt2ImgTab, build_txt2img

STATIC = Path(__file__).resolve().parent / "static"
GRADIO_CACHE_CLEANUP = (3600, 3600)  # every hour, the files Gradio made more than an hour ago
TAB_TOKEN_JS = """() => {
  // Kept only across a reload: a duplicated tab, or one opened from this one, gets a copy of
  // sessionStorage too, and must not take over (and Interrupt) this tab's job.
  const navigation = performance.getEntriesByType("navigation")[0];
  let token = navigation && navigation.type === "reload" ? sessionStorage.getItem("diffusers-webui-tab") : null;
  if (!token) {  // crypto.getRandomValues works on plain http too (randomUUID needs https)
    token = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("diffusers-webui-tab", token);
  }
  return token;
}"""


@dataclass
class WebUI:
    blocks: gr.Blocks
    models: ModelActions
    picker: ModelPicker
    txt2img: Txt2ImgTab
    history: HistoryTab
    history_actions: HistoryActions
    pnginfo: PngInfoTab


def build_ui(services: Services) -> gr.Blocks:
    return create_ui(services).blocks


def create_ui(services: Services) -> WebUI:
    models = ModelActions(services)
    # Gradio keeps a file per live preview it sends; without this they pile up in its temp folder for good.
    with gr.Blocks(title="diffusers-webui", analytics_enabled=False, delete_cache=GRADIO_CACHE_CLEANUP) as blocks:
        picker = build_model_picker(models)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_txt2img(services, picker, models)
            with gr.Tab("History", id="history", elem_id="tab_history"):
                history, history_actions = build_history(services)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo()
        ui = WebUI(blocks, models, picker, txt2img, history, history_actions, pnginfo)
        _wire_between_tabs(ui, tabs)
    # The worker is the one queue that matters; Gradio's own per-event queue would only make
    # one browser tab wait for another's poll loop.
    blocks.queue(default_concurrency_limit=None)
    return ui


def _wire_between_tabs(ui: WebUI, tabs: gr.Tabs) -> None:
    txt2img, history, actions = ui.txt2img, ui.history, ui.history_actions
    send_outputs = [*txt2img.field_components, tabs]

    def to_txt2img(fields):
        return *txt2img_updates(fields, ui.models.choices(), ui.models.find_pasted), gr.Tabs(selected="txt2img")

    def send_from_history(image_id):
        return to_txt2img(actions.fields(image_id))

    def send_from_pnginfo(text):
        return to_txt2img(fields_for_txt2img(text))

    history.send.click(send_from_history, inputs=[history.selected], outputs=send_outputs,
                       api_visibility="private", show_progress="hidden")
    ui.pnginfo.send.click(send_from_pnginfo, inputs=[ui.pnginfo.infotext], outputs=send_outputs,
                          api_visibility="private", show_progress="hidden")
    reload = dict(fn=actions.reload, inputs=[history.page, history.search, history.selected],
                  outputs=history.reload_outputs,
                  api_visibility="private", show_progress="hidden")
    txt2img.generate_event.then(**reload)
    ui.blocks.load(**reload)
    size = [txt2img.widgets["width"], txt2img.widgets["height"]]
    ui.blocks.load(ui.models.on_page_load, outputs=[ui.picker.dropdown, ui.picker.status, *size,
                                                 txt2img.widgets["clip_skip"]],
                   api_visibility="private", show_progress="hidden")
    ui.blocks.load(txt2img.file_lists, outputs=txt2img.file_list_widgets, api_visibility="private",
                   show_progress="hidden")
    # The tab's token survives a reload (sessionStorage, one per tab); filling it in resumes the tab's job.
    ui.blocks.load(None, outputs=[txt2img.tab_token], js=TAB_TOKEN_JS, api_visibility="private", show_progress="hidden")


def launch_assets() -> dict:
    """Keyword arguments for Blocks.launch(): the CSS and the Ctrl+Enter script."""
    script = (STATIC / "webui.js").read_text()
    return {"css_paths": [STATIC / "webui.css"], "head": f"<script>{script}</script>"}
