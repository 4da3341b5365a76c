"""The model picker: a dropdown of the models folder, a refresh button and a load status line.

Choices are plain model names: a title with the hash ("name [abc123]") would mean hashing every
multi-GB file at start-up; the hash of the loaded model shows in the status line and infotexts.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import gradio as gr

from webui.engine.models import ModelNotFound
from webui.engine.vae import AUTOMATIC
from webui.services import Services
from webui.ui.progress import error_html, notice_html
from webui.worker import await_result

log = logging.getLogger(__name__)
DEFAULT_SIZE = 512  # slider value when no model is loaded yet
WARM_UP_POLL_SECONDS = 0.5
WARM_UP_WATCH_SECONDS = 15 * 60  # a compile takes a minute or two; stop watching a stuck one


@dataclass
class ModelPicker:
    dropdown: gr.Dropdown
    refresh: gr.Button
    status: gr.HTML
    vae: gr.Dropdown  # A1111's "SD VAE": each Generate's own pick, as the checkpoint is
    refreshed: object  # the refresh click's event, for what follows it


class ModelActions:
    def __init__(self, services: Services):
        self.services = services

    def names(self) -> list[str]:
        """The models folder's models."""
        return [entry.name for entry in self.services.registry.entries()]

    def choices(self) -> list[str]:
        """The dropdown's list: the models folder, and the loaded model when it came from elsewhere (a
        --ckpt path, a hub id). Gradio refuses a dropdown value that is not in its list."""
        names, current = self.names(), self.current()
        return names if current in names else [*names, current]

    def picker(self, value: str | None = None) -> dict:
        """The dropdown as it should be now: today's list, showing value (the current model if None)."""
        return gr.update(choices=self.choices(), value=value or self.current())

    def on_page_load(self):
        """A new or reloaded page shows the model loaded now, not the one loaded when the UI was built.
        Outputs: dropdown, status, width, height."""
        size = self.native_size()
        return self.picker(), self.status(), size, size

    def current(self) -> str:
        """The loaded model, else the one tried at start."""
        model = self.services.engine.model
        return model.entry.name if model else (self.services.starting_model or self.services.settings.ckpt)

    @property
    def public(self) -> bool:
        """Served to other machines: then only listed models may be picked (no server paths or
        multi-GB hub downloads chosen by a visitor); locally, a typed path or hub id also works."""
        return self.services.settings.public

    def checked_choice(self, name: str) -> str:
        """The model name to use for a job or a load; raises ModelNotFound for a forbidden one."""
        if not self.public:
            return name
        loaded = self.services.engine.model
        return self.services.registry.find_listed(name, loaded.entry if loaded else None).name

    def find_pasted(self, name: str, short_hash: str | None) -> str | None:
        """The listed (or loaded) model that a pasted infotext or a history row means: by name, by A1111's
        base name for a model in a subfolder, else by its short hash; None if none is here."""
        registry, loaded = self.services.registry, self.services.engine.model
        if name:
            try:
                return registry.find_listed(name, loaded.entry if loaded else None).name
            except ModelNotFound:
                pass
        if loaded is not None and short_hash and loaded.short_hash == short_hash.strip().lower():
            return loaded.entry.name  # also a model from outside the models folder
        entry = registry.find_by_hash(short_hash or "")
        return entry.name if entry else None

    def native_size(self) -> int:
        model = self.services.engine.model
        return model.native_width if model else DEFAULT_SIZE

    def status(self) -> str:
        model = self.services.engine.model
        if model is None:
            return error_html(f"No model loaded: {self.current()!r} could not be loaded. "
                              "Pick another model or put one in the models folder and press refresh.")
        digest = f" [{model.short_hash}]" if model.short_hash else ""
        text = f"Model: {model.entry.name}{digest}, native size {model.native_width}x{model.native_height}"
        if self.services.engine.released:
            text += " · unloaded by an API client; the next image loads it again"
        elif self.services.engine.needs_warm_up:
            text += " · compiling; images wait until it is done"
        return notice_html(text)

    def status_after_run(self):
        """The status line again after a run, which loaded its tab's model (another tab may have loaded
        another since this page last said). Left alone while a load is on its way: that load's own
        status ("Loading…", then the result) is the news."""
        return gr.skip() if self.services.worker.loading_model() else self.status()

    def refresh(self, selected: str | None, vae: str | None = None):
        """Rescan the models folder and the VAE folder; keeps the selections (a VAE file gone: Automatic)."""
        self.services.registry.refresh()
        return self.picker(selected), self.vae_picker(vae)

    def vae_choices(self) -> list[str]:
        """Automatic, None, then the VAE folder's files."""
        return self.services.engine.vaes.choices()

    def vae_picker(self, value: str | None = None) -> dict:
        choices = self.vae_choices()
        return gr.update(choices=choices, value=value if value in choices else AUTOMATIC)

    async def load(self, name: str | None):
        """Load the picked model on the worker (after queued jobs); yields a status first.

        Awaited, not waited for on a thread: picks waiting behind a long job would otherwise fill the
        shared thread pool and starve every tab's events and the API's /progress and /interrupt.
        Outputs: status, dropdown, width, height (the size sliders follow the model)."""
        if not name:
            yield self.status(), self.picker(), gr.skip(), gr.skip()
            return
        yield notice_html(f"Loading {name}…"), gr.skip(), gr.skip(), gr.skip()
        try:
            model = await await_result(self.services.worker.queue_model_load(self.checked_choice(name)))
        except Exception as err:  # any failure becomes a readable line; the old model stays loaded
            log.warning("loading %s failed: %s", name, err)
            yield error_html(f"Could not load {name}: {err}"), self.picker(), gr.skip(), gr.skip()
            return
        yield self.status(), self.picker(model.entry.name), model.native_width, model.native_height
        if self._compiling(model):
            deadline = time.monotonic() + WARM_UP_WATCH_SECONDS
            while self._compiling(model) and time.monotonic() < deadline:
                yield notice_html(self.services.worker.activity or f"{name} compiles next"), \
                    gr.skip(), gr.skip(), gr.skip()
                await asyncio.sleep(WARM_UP_POLL_SECONDS)
            yield self.status(), gr.skip(), gr.skip(), gr.skip()

    def _compiling(self, model) -> bool:
        """The worker has yet to warm up this model (and has not moved on to another one)."""
        engine, worker = self.services.engine, self.services.worker
        return engine.model == model and engine.needs_warm_up and worker.alive


def build_model_picker(actions: ModelActions) -> ModelPicker:
    with gr.Row(elem_id="model_row"):
        dropdown = gr.Dropdown(
            choices=actions.choices(), value=actions.current(), label="Stable Diffusion checkpoint",
            allow_custom_value=not actions.public,  # locally, a typed path or hub id also works
            elem_id="model_dropdown", scale=4,
        )
        vae = gr.Dropdown(choices=actions.vae_choices(), value=AUTOMATIC, label="SD VAE", elem_id="vae_dropdown",
                          scale=2, info="Automatic: a VAE file named after the model, else its own")
        refresh = gr.Button("↻", elem_id="model_refresh", scale=0, min_width=48, size="lg")
        status = gr.HTML(actions.status(), label="Model status", show_label=False, elem_id="model_status",
                         padding=False)
    refreshed = refresh.click(actions.refresh, inputs=[dropdown, vae], outputs=[dropdown, vae],
                              api_name="refresh_models", show_progress="hidden")
    return ModelPicker(dropdown, refresh, status, vae, refreshed)
