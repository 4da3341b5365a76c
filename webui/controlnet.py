"""ControlNet's request side: the request's checks and its infotext, as sd-webui-controlnet writes it:

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize,
    Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0,
    Pixel Perfect: False, Control Mode: Balanced"

Pasting it back sets the fields; the control picture itself is not in an infotext, so it must be given again.
The engine's side (models, preprocessors, the UNet hook) is webui/engine/controlnet.py.
"""
from __future__ import annotations

from typing import Any

CN_MODULES = ("none", "canny", "invert")  # the extension's names; its others need models of their own
CANNY_LOW, CANNY_HIGH = 100.0, 200.0  # the extension's defaults, each 1..255
CN_PROCESSOR_RES = 512
CN_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's names, img2img's order
CONTROL_MODE = "Balanced"  # the only one here: the extension's "My prompt/ControlNet is more important" are not
INFOTEXT_KEY = "ControlNet 0"
NO_PICTURE = ("controlnet_image: ControlNet is on but has no control picture (an infotext cannot bring it back); "
              "give one (img2img without one uses its own picture), or turn ControlNet off")


def controlnet_problem(request) -> str | None:
    """What a request with ControlNet on asks that cannot run, naming each field; None when it can."""
    problems = []
    if not (request.controlnet_model or "").strip() or request.controlnet_model == "None":
        problems.append("controlnet_model: pick a ControlNet model (GET /controlnet/model_list lists them)")
    if request.controlnet_module not in CN_MODULES:
        problems.append(f"controlnet_module: {request.controlnet_module[:100]!r} is not here; pick one of "
                        f"{', '.join(CN_MODULES)} (other preprocessors need models this server lacks: give their "
                        "map as the picture with 'none')")
    if request.controlnet_guidance_start > request.controlnet_guidance_end:
        problems.append(f"controlnet_guidance_start: {request.controlnet_guidance_start:g} comes after "
                        f"controlnet_guidance_end ({request.controlnet_guidance_end:g}); the start must be at most the "
                        "end")
    if request.sd_upscale:
        problems.append("controlnet_enabled: SD upscale draws the picture in tiles, and ControlNet steers the whole; "
                        "use one or the other")
    if request.inpaint_full_res and request.mask is not None:
        problems.append("controlnet_enabled: inpainting Only masked with ControlNet is not supported; use Whole "
                        "picture")
    return "; ".join(problems) or None


def controlnet_infotext(request, title: str | None) -> dict[str, str]:
    """The infotext key of a request with ControlNet on (`title`: its model's "name [hash]"), as the extension's."""
    if not request.uses_controlnet:
        return {}
    values = {"Module": request.controlnet_module, "Model": title or request.controlnet_model,
              "Weight": float(request.controlnet_weight),
              "Resize Mode": CN_RESIZE_MODES[request.controlnet_resize_mode],
              "Processor Res": request.controlnet_processor_res,
              "Threshold A": float(request.controlnet_threshold_a), "Threshold B": float(request.controlnet_threshold_b),
              "Guidance Start": float(request.controlnet_guidance_start),
              "Guidance End": float(request.controlnet_guidance_end),
              "Pixel Perfect": request.controlnet_pixel_perfect, "Control Mode": CONTROL_MODE}
    return {INFOTEXT_KEY: ", ".join(f"{key}: {value}" for key, value in values.items())}


_FIELDS = {  # the extension's infotext keys -> request fields and their readers
    "Module": ("controlnet_module", lambda text: _known(text, CN_MODULES)),
    "Model": ("controlnet_model", str),
    "Weight": ("controlnet_weight", float),
    "Resize Mode": ("controlnet_resize_mode", lambda text: CN_RESIZE_MODES.index(text)),
    "Processor Res": ("controlnet_processor_res", int),
    "Threshold A": ("controlnet_threshold_a", lambda text: _threshold(float(text))),
    "Threshold B": ("controlnet_threshold_b", lambda text: _threshold(float(text))),
    "Guidance Start": ("controlnet_guidance_start", float),
    "Guidance End": ("controlnet_guidance_end", float),
    "Pixel Perfect": ("controlnet_pixel_perfect", lambda text: text == "True"),
}


def controlnet_fields(params: dict[str, str]) -> dict[str, Any]:
    """The ControlNet fields of an infotext's parameters: on, with its unit's values, where it has the key; off where
    it has parameters without it. Values this server cannot run (another preprocessor, another unit's) are left
    out; the picture must be given again."""
    if not params:
        return {}
    if INFOTEXT_KEY not in params:
        return {"controlnet_enabled": False}
    fields: dict[str, Any] = {"controlnet_enabled": True}
    for item in params[INFOTEXT_KEY].split(","):
        key, _, text = item.partition(":")
        if key.strip() in _FIELDS:
            name, read = _FIELDS[key.strip()]
            try:
                fields[name] = read(text.strip())
            except ValueError:
                continue
    return fields


def _known(text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ValueError(text)
    return text


def _threshold(value: float) -> float:
    """A canny threshold; the extension writes 0.5 for a preprocessor without one."""
    if not 1 <= value <= 255:
        raise ValueError(value)
    return value
