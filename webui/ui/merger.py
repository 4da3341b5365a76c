"""The Checkpoint Merger tab (A1111's): pick two or three models, a method and a multiplier, and a merged model
(webui/engine/merge.py) is written into the models folder and listed in the model picker.

A merge reads the models on the CPU in this page's request, not in the worker: pictures keep coming while it
runs. One merge at a time: each holds up to three models in memory."""
from __future__ import annotations

import html
import logging
import threading
from dataclasses import dataclass

import gradio as gr

from webui.engine.loader import ModelLoadError
from webui.engine.merge import METHODS, WEIGHTED_SUM, MergeError, MergeRecipe, merge_models
from webui.engine.models import ModelNotFound
from webui.engine.vae import NO_VAE
from webui.services import Services

log = logging.getLogger(__name__)
OPEN_TO_ANYONE = ("this page is served to other machines without a login, and a merge writes gigabytes into the "
                  "models folder; start the server with --gradio-auth to merge here")


class MergerActions:
    def __init__(self, services: Services):
        self.services = services
        self._one_at_a_time = threading.Lock()

    @property
    def locked_because(self) -> str | None:
        return OPEN_TO_ANYONE if self.services.settings.open_to_anyone else None

    def model_lists(self) -> list[dict]:
        """The three dropdowns with today's models (B and C may be left empty)."""
        names = [entry.name for entry in self.services.registry.refresh()]
        return [gr.update(choices=names), gr.update(choices=["", *names]), gr.update(choices=["", *names])]

    def vae_list(self) -> dict:
        """Bake in VAE's choices: None, then the VAE files."""
        return gr.update(choices=[NO_VAE, *(vae.name for vae in self.services.engine.vaes.files())])

    def merge(self, primary: str, secondary: str, tertiary: str, method: str, multiplier: float, save_as_half: bool,
              name: str, bake_in_vae: str = NO_VAE, discard_weights: str = "") -> str:
        """Make the merged model; a line saying where it went, or what to change."""
        if self.locked_because:
            return _message(f"Not merged: {self.locked_because}", error=True)
        recipe = MergeRecipe(primary or "", secondary or None, tertiary or None, method, float(multiplier),
                             bool(save_as_half), name or "", bake_in_vae or NO_VAE, discard_weights or "")
        if not self._one_at_a_time.acquire(blocking=False):
            return _message("Not merged: another merge is running; try again when it has finished", error=True)
        try:
            made = merge_models(recipe, self.services.registry, self.services.settings)
        except (MergeError, ModelNotFound, ModelLoadError) as err:
            return _message(f"Not merged: {err}", error=True)
        except OSError as err:
            log.exception("the merged model could not be written")
            return _message(f"Not merged: the model could not be written ({err}); nothing was left behind",
                            error=True)
        except (MemoryError, RuntimeError) as err:  # a CPU out of memory, in torch's words or Python's
            log.exception("the merge failed")
            return _message(f"Not merged: {type(err).__name__}: {err}. A merge holds two or three models in memory "
                            "at once in fp32; close other programs, or merge on a machine with more memory",
                            error=True)
        finally:
            self._one_at_a_time.release()
        return _message(f"Saved {made.name} in {made.parent}; pick it in the model list.")


def _message(text: str, error: bool = False) -> str:
    kind = "merge-error" if error else "merge-result"
    return f'<p class="{kind}">{html.escape(text)}</p>'


@dataclass
class MergerTab:
    primary: gr.Dropdown
    secondary: gr.Dropdown
    tertiary: gr.Dropdown
    method: gr.Radio
    multiplier: gr.Slider
    save_as_half: gr.Checkbox
    name: gr.Textbox
    bake_in_vae: gr.Dropdown
    discard_weights: gr.Textbox
    merge: gr.Button
    result: gr.HTML
    actions: MergerActions
    merged: object  # the Merge click's event, for what follows it

    @property
    def model_lists(self) -> list[gr.Dropdown]:
        return [self.primary, self.secondary, self.tertiary]


def build_merger(services: Services) -> MergerTab:
    actions = MergerActions(services)
    names = [entry.name for entry in services.registry.entries()]
    locked = actions.locked_because
    gr.Markdown(f"Shown, not usable: {locked}." if locked else
                "A new model from two or three: *Weighted sum* is A × (1 − M) + B × M; *Add difference* is "
                "A + (B − C) × M (to make an inpainting model of B: A an inpainting model, C the model B was "
                "trained from, M 1). It is saved as a folder in the models folder.")
    with gr.Row():
        primary = gr.Dropdown(names, value=names[0] if names else None, label="Primary model (A)",
                              elem_id="merger_primary")
        secondary = gr.Dropdown(["", *names], value="", label="Secondary model (B)", elem_id="merger_secondary")
        tertiary = gr.Dropdown(["", *names], value="", label="Tertiary model (C)", elem_id="merger_tertiary")
    name = gr.Textbox("", label="Custom name (optional)", elem_id="merger_name",
                      placeholder="empty: named after the models, as A1111 names them")
    multiplier = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                           elem_id="merger_multiplier")
    method = gr.Radio(list(METHODS), value=WEIGHTED_SUM, label="Interpolation method", elem_id="merger_method")
    with gr.Row():
        save_as_half = gr.Checkbox(False, label="Save as float16", elem_id="merger_half")
        bake_in_vae = gr.Dropdown([NO_VAE, *(vae.name for vae in services.engine.vaes.files())], value=NO_VAE,
                                  label="Bake in VAE", elem_id="merger_bake_in_vae",
                                  info="a VAE file (models/VAE) to put in the merged model instead of A's")
    discard_weights = gr.Textbox("", label="Discard weights", elem_id="merger_discard_weights",
                                 placeholder=r"a regular expression, such as ^text_encoder\. or ^unet\.up_blocks",
                                 info="the weights whose names it matches (unet.…, text_encoder.…, vae.…) are not "
                                      "merged: they stay A's. A1111 leaves them out of its file; a model folder "
                                      "without them would load them as random numbers")
    merge = gr.Button("Merge", variant="primary", elem_id="merger_merge", interactive=locked is None)
    result = gr.HTML("", elem_id="merger_result")
    merged = merge.click(actions.merge, [primary, secondary, tertiary, method, multiplier, save_as_half, name,
                                         bake_in_vae, discard_weights], result, api_visibility="private")
    return MergerTab(primary, secondary, tertiary, method, multiplier, save_as_half, name, bake_in_vae,
                     discard_weights, merge, result, actions, merged)

