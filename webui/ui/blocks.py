"""The whole page: the model picker above six tabs (txt2img, img2img, Extras, History, PNG Info, Settings) and the
wiring between them ("send to txt2img" and "send to img2img", history refresh after a run, the model's sliders).

`build_ui(services)` gives the gr.Blocks; `create_ui(services)` also hands back the tabs, so tests
can drive the event functions directly. Gradio 6 takes CSS and head scripts at launch()
time; `launch_assets()` holds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image

from webui.engine.img2img import size_from_image
from webui.services import Services
from webui.extras import Upscalers
from webui.ui.extras import SINGLE, SINGLE_ID, ExtrasActions, ExtrasTab, build_extras
from webui.ui.history import HistoryActions, HistoryTab, build_history
from webui.ui.merger import MergerTab, build_merger
from webui.ui.models import ModelActions, ModelPicker, build_model_picker
from webui.ui.params import override_settings, widget_updates
from webui.ui.pictures import INPAINT, PLAIN
from webui.ui.pnginfo import PngInfoTab, build_pnginfo, fields_for_txt2img, fields_to_paste, picture_for_img2img
from webui.ui.settings import SettingsTab, build_settings
from webui.ui.train import TrainTab, build_train_tab
from webui.ui.generation import GenerationTab, build_generation_tab

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
  return [token, token, token];  // one for each tab that resumes its own work: txt2img, img2img, Train
}"""


@dataclass
class WebUI:
    blocks: gr.Blocks
    models: ModelActions
    picker: ModelPicker
    txt2img: GenerationTab
    img2img: GenerationTab
    history: HistoryTab
    history_actions: HistoryActions
    pnginfo: PngInfoTab
    extras: ExtrasTab
    settings: SettingsTab
    merger: MergerTab
    train: TrainTab | None = None

    @property
    def generation_tabs(self) -> tuple[GenerationTab, GenerationTab]:
        return self.txt2img, self.img2img


def build_ui(services: Services) -> gr.Blocks:
    return create_ui(services).blocks


def create_ui(services: Services) -> WebUI:
    models = ModelActions(services)
    # Gradio keeps a file per live preview it sends; without this they pile up in its temp folder for good.
    with gr.Blocks(title="diffusers-webui", analytics_enabled=False, delete_cache=GRADIO_CACHE_CLEANUP) as blocks:
        picker = build_model_picker(models)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_generation_tab(services, picker, models, "txt2img")
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                img2img = build_generation_tab(services, picker, models, "img2img")
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                extras = build_extras(services.outputs, services.settings.reads_server_folders,
                                      Upscalers(services.worker))
            with gr.Tab("History", id="history", elem_id="tab_history"):
                history, history_actions = build_history(services)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo()
            with gr.Tab("Checkpoint Merger", id="merger", elem_id="tab_merger") as merger_tab:
                merger = build_merger(services)
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                train = build_train_tab(services)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings") as settings_tab:
                settings = build_settings(services.options, services.settings.open_to_anyone,
                                          img2img.actions.upscaler_names())
        notification_sound(services.settings.notification_audio)
        # Shown afresh when opened: another user or an API client may have changed them.
        settings_tab.select(settings.actions.shown_to_page, None, [*settings.inputs, settings.on_page],
                            api_visibility="private", show_progress="hidden")
        _wire_merger(merger, merger_tab, models, picker)
        ui = WebUI(blocks, models, picker, txt2img, img2img, history, history_actions, pnginfo, extras, settings,
                   merger, train)
        _wire_between_tabs(ui, tabs)
        _wire_page_load(ui)
        _wire_checkpoint_lists(ui)
    # The worker is the one queue that matters; Gradio's own per-event queue would only make
    # one browser tab wait for another's poll loop.
    blocks.queue(default_concurrency_limit=None)
    return ui


def _wire_merger(merger: MergerTab, tab: gr.Tab, models: ModelActions, picker: ModelPicker) -> None:
    """The merger's lists are read afresh when it opens; a merged model joins the model picker's list and its own."""
    private = dict(api_visibility="private", show_progress="hidden")
    tab.select(merger.actions.model_lists, None, merger.model_lists, **private)
    tab.select(merger.actions.vae_list, None, merger.bake_in_vae, **private)
    merger.merged.then(lambda: models.picker(), None, picker.dropdown, **private).then(
        merger.actions.model_lists, None, merger.model_lists, **private)


def _wire_checkpoint_lists(ui: WebUI) -> None:
    """The refiner's and the hires fix's checkpoint lists follow the models folder where the model picker's list
    does: when the page loads, after its ↻ and after a merge."""
    lists = [pair for tab in ui.generation_tabs for pair in tab.checkpoint_lists]

    def read_lists():
        names = ui.models.names()
        return [gr.update(choices=[first, *names]) for _, first in lists]

    wiring = dict(fn=read_lists, outputs=[dropdown for dropdown, _ in lists], api_visibility="private",
                  show_progress="hidden")
    ui.blocks.load(**wiring)
    ui.picker.refreshed.then(**wiring)
    ui.merger.merged.then(**wiring)


def _wire_between_tabs(ui: WebUI, tabs: gr.Tabs) -> None:
    txt2img, img2img, history, actions = ui.txt2img, ui.img2img, ui.history, ui.history_actions
    private = dict(api_visibility="private", show_progress="hidden")

    def to_tab(tab: GenerationTab, fields: dict, *picture: Any, inpaint: bool = False) -> tuple:
        """The outputs of a send: [img2img's picture (on img2img's own sub-tab, or on the Inpaint canvas), the
        sub-tab opened,] the tab's fields, then the tab shown. A picture sent sets the size, as in A1111: a hires
        picture is larger than its infotext's first-pass size."""
        sent = ()
        if picture:
            fields = fields | picture_dimensions(picture[0])
            if inpaint:  # a fresh canvas: no strokes from the last picture
                canvas = {"background": picture[0], "layers": [], "composite": picture[0]}
                sent = (gr.skip(), canvas, INPAINT, gr.Tabs(selected="inpaint"))
            else:
                sent = (picture[0], gr.skip(), PLAIN, gr.Tabs(selected="img2img"))
        fields = fields | {"override_settings": override_settings(fields, tab.actions.options.current(), tab.kind)}
        updates = widget_updates(fields, tab.field_names, ui.models.choices(), ui.models.find_pasted,
                                 ui.models.vae_choices(), tab.actions.upscaler_names(), tab.field_limits)
        return *sent, *updates, gr.Tabs(selected=tab.kind)

    def send_from_history(image_id):
        return to_tab(txt2img, actions.fields(image_id))

    def send_from_pnginfo(text):
        return to_tab(txt2img, fields_for_txt2img(text))

    def history_to_img2img(image_id, inpaint=False):
        picture, fields = actions.picture_and_fields(image_id)
        return to_tab(img2img, fields, picture, inpaint=inpaint)

    def pnginfo_to_img2img(upload, text, inpaint=False):
        picture, fields = picture_for_img2img(upload, text)
        return to_tab(img2img, fields, picture, inpaint=inpaint)

    def gallery_to_img2img(session, inpaint=False):
        picture, fields = img2img.actions.sent_picture(session)
        return to_tab(img2img, fields, picture, inpaint=inpaint)

    def extras_to_img2img(items, index, inpaint=False):
        picture, fields = ExtrasActions.sent_picture(items, index)
        return to_tab(img2img, fields, picture, inpaint=inpaint)

    def extras_to_inpaint(items, index):
        return extras_to_img2img(items, index, inpaint=True)

    def history_to_inpaint(image_id):
        return history_to_img2img(image_id, inpaint=True)

    def pnginfo_to_inpaint(upload, text):
        return pnginfo_to_img2img(upload, text, inpaint=True)

    def gallery_to_inpaint(session):
        return gallery_to_img2img(session, inpaint=True)

    def paste_into(tab: GenerationTab) -> Callable:
        def paste(prompt, session):
            return to_tab(tab, fields_to_paste(prompt, session.current_infotext()))
        paste.__name__ = f"paste_into_{tab.kind}"  # an event of its own per tab (tests find it by name)
        return paste

    for tab in ui.generation_tabs:
        tab.paste.click(paste_into(tab), inputs=[tab.widgets["prompt"], tab.session],
                        outputs=[*tab.field_components, tabs], **private)

    to_txt2img_outputs = [*txt2img.field_components, tabs]
    to_img2img_outputs = [img2img.widgets["init_image"], img2img.widgets["inpaint_canvas"],
                          img2img.widgets["img2img_mode"], img2img.picture_tabs, *img2img.field_components, tabs]
    history.send.click(send_from_history, inputs=[history.selected], outputs=to_txt2img_outputs, **private)
    ui.pnginfo.send.click(send_from_pnginfo, inputs=[ui.pnginfo.infotext], outputs=to_txt2img_outputs, **private)
    history.send_img2img.click(history_to_img2img, inputs=[history.selected], outputs=to_img2img_outputs, **private)
    history.send_inpaint.click(history_to_inpaint, inputs=[history.selected], outputs=to_img2img_outputs, **private)
    # Unprocessed, as PNG Info reads it: the upload's path, though it be no picture Gradio can open.
    for send, button in ((pnginfo_to_img2img, ui.pnginfo.send_img2img), (pnginfo_to_inpaint, ui.pnginfo.send_inpaint)):
        button.click(send, inputs=[ui.pnginfo.image, ui.pnginfo.infotext], outputs=to_img2img_outputs,
                     preprocess=False, **private)
    _wire_sends_to_extras(ui, tabs)
    for send, button in ((extras_to_img2img, ui.extras.send_img2img), (extras_to_inpaint, ui.extras.send_inpaint)):
        button.click(send, inputs=[ui.extras.gallery, ui.extras.selected], outputs=to_img2img_outputs, **private)
    reload = dict(fn=actions.reload, inputs=[history.page, history.search, history.selected],
                  outputs=history.reload_outputs, **private)
    for tab in ui.generation_tabs:
        for run in tab.generate_events:
            run.then(**reload)
        for edit in tab.style_edits:  # one styles file: a style saved or deleted on one tab is so on the other
            for other in ui.generation_tabs:
                if other is not tab:
                    edit.then(other.actions.offered_styles, inputs=[other.widgets["styles"]],
                              outputs=[other.widgets["styles"]], **private)
        tab.send_to_img2img.click(gallery_to_img2img, inputs=[tab.session], outputs=to_img2img_outputs, **private)
        tab.send_to_inpaint.click(gallery_to_inpaint, inputs=[tab.session], outputs=to_img2img_outputs, **private)
    ui.blocks.load(**reload)
    # The model's native size sets the size sliders of every tab: one load, all of them. Clip skip keeps its fixed
    # 1-12 slider (A1111's): a model's depth is checked at Generate, against the model the job runs on.
    sliders = [slider for tab in ui.generation_tabs for slider in tab.model_sliders]

    async def load_model(name):
        async for status, dropdown, width, height in ui.models.load(name):
            yield status, dropdown, *[width, height] * len(ui.generation_tabs)

    ui.picker.dropdown.input(load_model, inputs=[ui.picker.dropdown],
                             outputs=[ui.picker.status, ui.picker.dropdown, *sliders], api_name="load_model",
                             show_progress="hidden")

    def models_on_page_load():
        dropdown, status, width, height = ui.models.on_page_load()
        return dropdown, status, ui.models.vae_picker(), *[width, height] * len(ui.generation_tabs)

    ui.blocks.load(models_on_page_load, outputs=[ui.picker.dropdown, ui.picker.status, ui.picker.vae, *sliders],
                   **private)


def _wire_sends_to_extras(ui: WebUI, tabs: gr.Tabs) -> None:
    """"Send to extras" under the galleries, in History and in PNG Info: the picture (its file where there is one,
    so the parameters it carries are kept) onto Extras' Single Image sub-tab, shown."""
    private = dict(api_visibility="private", show_progress="hidden")
    outputs = [ui.extras.image, ui.extras.subtab, ui.extras.tabs, tabs]

    def to_extras(picture: Any) -> tuple:
        return picture, SINGLE, gr.Tabs(selected=SINGLE_ID), gr.Tabs(selected="extras")

    def history_to_extras(image_id):
        return to_extras(ui.history_actions.picture_and_fields(image_id)[0])

    def pnginfo_to_extras(upload):
        return to_extras(picture_for_img2img(upload, "")[0])

    ui.history.send_extras.click(history_to_extras, inputs=[ui.history.selected], outputs=outputs, **private)
    # Unprocessed, as PNG Info reads it.
    ui.pnginfo.send_extras.click(pnginfo_to_extras, inputs=[ui.pnginfo.image], outputs=outputs, preprocess=False,
                                 **private)
    for tab in ui.generation_tabs:
        def gallery_to_extras(session, tab=tab):
            return to_extras(tab.actions.sent_picture(session)[0])

        tab.send_to_extras.click(gallery_to_extras, inputs=[tab.session], outputs=outputs, **private)


def picture_dimensions(picture: Image.Image | str) -> dict[str, int]:
    """A sent picture's (or picture file's) width and height as img2img runs it; none when it cannot be opened
    (Generate then says what is wrong with it)."""
    try:
        if isinstance(picture, Image.Image):
            return dict(zip(("width", "height"), size_from_image(picture)))
        with Image.open(picture) as opened:
            return dict(zip(("width", "height"), size_from_image(opened)))
    except (OSError, ValueError, Image.DecompressionBombError):
        return {}


def _wire_page_load(ui: WebUI) -> None:
    """Each tab's file lists, and the tab token that resumes each tab's job of its own kind."""
    private = dict(api_visibility="private", show_progress="hidden")
    for tab in ui.generation_tabs:
        ui.blocks.load(tab.file_lists, outputs=tab.file_list_widgets, **private)
    ui.blocks.load(ui.extras.actions.upscaler_lists,
                   outputs=[ui.extras.settings["upscaler_1"], ui.extras.settings["upscaler_2"]], **private)
    # The tab's token survives a reload (sessionStorage, one per tab); filling it in resumes the tab's job.
    ui.blocks.load(None, outputs=[*(tab.tab_token for tab in ui.generation_tabs), ui.train.tab_token], js=TAB_TOKEN_JS,
                   **private)


def notification_sound(path: Path | None) -> gr.Audio | None:
    """A1111's notification.mp3: in the page, out of sight, where the file exists; webui.js plays it when a run ends."""
    if path is None or not path.is_file():
        return None
    return gr.Audio(str(path), visible="hidden", interactive=False, elem_id="audio_notification",
                    show_label=False, buttons=[])


def launch_assets() -> dict:
    """Keyword arguments for Blocks.launch(): the CSS and the Ctrl+Enter script."""
    script = (STATIC / "webui.js").read_text()
    return {"css_paths": [STATIC / "webui.css"], "head": f"<script>{script}</script>"}
