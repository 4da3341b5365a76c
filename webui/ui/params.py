"""Turn saved parameters (history rows, PNG infotext) into updates for the txt2img widgets."""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.engine.samplers import SCHEDULE_TYPES, resolve_sampler
from webui.storage.history import HistoryImage

# GenerationRequest fields the txt2img tab has a widget for, in the order of Txt2ImgTab.field_components.
TXT2IMG_FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale",
                  "width", "height", "seed", "clip_skip", "model")


def fields_from_history(image: HistoryImage) -> dict[str, Any]:
    return {
        "prompt": image.prompt, "negative_prompt": image.negative_prompt, "sampler_name": image.sampler,
        "scheduler": image.scheduler, "steps": image.steps, "cfg_scale": image.cfg_scale,
        "width": image.width, "height": image.height, "seed": image.seed, "clip_skip": image.clip_skip,
        "model": image.model_name,
    }


def txt2img_updates(fields: dict[str, Any], model_names: list[str]) -> list[Any]:
    """One value (or gr.skip()) per TXT2IMG_FIELDS entry; unknown samplers and models are left alone."""
    fields = dict(fields)
    if "sampler_name" in fields:
        try:
            # Splits old combined names ("DPM++ 2M Karras") into the two dropdowns.
            fields["sampler_name"], fields["scheduler"] = resolve_sampler(
                fields["sampler_name"], fields.get("scheduler") or "Automatic")
        except ValueError:
            fields.pop("sampler_name")
            fields.pop("scheduler", None)
    if fields.get("scheduler") not in SCHEDULE_TYPES:
        fields.pop("scheduler", None)
    if fields.get("model") not in model_names:
        fields.pop("model", None)
    return [fields[name] if fields.get(name) is not None else gr.skip() for name in TXT2IMG_FIELDS]
