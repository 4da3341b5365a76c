"""sd-webui-controlnet's API: its unit in `alwayson_scripts.controlnet.args` of /sdapi/v1/txt2img and img2img, and
its routes GET /controlnet/model_list, /controlnet/module_list, /controlnet/version, /controlnet/settings and
POST /controlnet/detect. One unit runs here; the others a client sends must be off."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from PIL import Image
from pydantic import BaseModel, Field

from webui.api.convert import ApiError, decode_image, encode_image
from webui.api.models import GenerationBody, Img2ImgRequest
from webui.controlnet import CANNY_HIGH, CANNY_LOW, CN_MODULES, CN_PROCESSOR_RES, CN_RESIZE_MODES, CONTROL_MODE
from webui.engine.controlnet import detect_map
from webui.engine.img2img import as_rgb, check_picture_size

API_VERSION = 3  # the extension's get_api_version()
SCRIPT = "controlnet"
# The extension's labels where they are not the names (alias_names=true), and its older names of the resize modes.
_LABELS = {"invert": "invert (from white bg & black line)"}
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                   "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
_RESOLUTION = {"name": "Resolution", "value": CN_PROCESSOR_RES, "min": 64, "max": 2048, "step": 8}
_SLIDERS = {"none": [_RESOLUTION], "invert": [],
            "canny": [_RESOLUTION, {"name": "Low Threshold", "value": CANNY_LOW, "min": 1, "max": 255, "step": 1},
                      {"name": "High Threshold", "value": CANNY_HIGH, "min": 1, "max": 255, "step": 1}]}
# Unit fields -> request fields, read as they are.
_PLAIN = {"module": "controlnet_module", "model": "controlnet_model", "weight": "controlnet_weight",
          "guidance_start": "controlnet_guidance_start", "guidance_end": "controlnet_guidance_end",
          "pixel_perfect": "controlnet_pixel_perfect"}


def _script(req: GenerationBody) -> Any:
    """The body's alwayson_scripts.controlnet (its name in any case, as A1111 matches it), or None."""
    return next((value for name, value in (req.alwayson_scripts or {}).items() if name.lower() == SCRIPT), None)


def _args(req: GenerationBody) -> list:
    script = _script(req)
    args = script.get("args") if isinstance(script, dict) else None
    return args if isinstance(args, list) else []


def units_of(req: GenerationBody) -> list[tuple[int, dict]]:
    """The enabled ControlNet units of a body, with their places in args (the extension's default is off)."""
    return [(i, unit) for i, unit in enumerate(_args(req)) if isinstance(unit, dict) and unit.get("enabled") is True]


def controlnet_fields(req: GenerationBody) -> tuple[dict[str, Any], list[str]]:
    """A body's ControlNet unit as request fields, and notes (a unit with a picture but not enabled); ApiError
    naming each field to fix."""
    script = _script(req)
    if script is None:
        return {}, []
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise ApiError(422, f"alwayson_scripts.{SCRIPT}: send {{\"args\": [unit, ...]}}, each unit an object",
                       "InvalidRequest")
    notes = [f"{where(i)}: not enabled (send \"enabled\": true), so it did not run" for i, unit in enumerate(_args(req))
             if isinstance(unit, dict) and "enabled" not in unit and (unit.get("image") or unit.get("input_image"))]
    units = units_of(req)
    if len(units) > 1:
        raise ApiError(422, f"alwayson_scripts.{SCRIPT}.args: {len(units)} units are enabled; one ControlNet unit "
                            "runs on this server", "InvalidRequest")
    if not units:
        return {}, notes
    # img2img: a unit without a picture is steered by the img2img picture, as the extension's
    fields, refused = unit_fields(units[0][1], where(units[0][0]), needs_image=not isinstance(req, Img2ImgRequest))
    if refused:
        raise ApiError(422, "; ".join(refused), "InvalidRequest")
    return fields, notes


def unit_fields(unit: dict, field: str, needs_image: bool = True) -> tuple[dict[str, Any], list[str]]:
    """One enabled unit as request fields (the extension's defaults for what it leaves out or sends as -1);
    `needs_image`: a unit without its picture is refused (txt2img)."""
    fields = {"controlnet_enabled": True, "controlnet_module": "none", "controlnet_model": None}
    fields |= {ours: unit[theirs] for theirs, ours in _PLAIN.items() if unit.get(theirs) is not None}
    if unit.get("guidance") is not None and unit.get("guidance_end") is None:  # the extension's older name
        fields["controlnet_guidance_end"] = unit["guidance"]
    module = fields["controlnet_module"]  # by name, or by its label as the extension matches it
    fields["controlnet_module"] = {label: name for name, label in _LABELS.items()}.get(module, module)
    if fields["controlnet_model"] == "None":
        fields["controlnet_model"] = None
    refused = []
    try:
        fields["controlnet_resize_mode"] = resize_mode(unit.get("resize_mode", CN_RESIZE_MODES[1]))
    except ValueError as err:
        refused.append(f"{field}.resize_mode: {err}")
    canny = fields["controlnet_module"] == "canny"
    for name, default, low in (("processor_res", CN_PROCESSOR_RES, 64), ("threshold_a", CANNY_LOW, 1),
                               ("threshold_b", CANNY_HIGH, 1)):
        value = unit.get(name, -1)
        # As the extension: a value out of the preprocessor's range (-1 by default) is its default.
        in_range = isinstance(value, (int, float)) and low <= value <= (2048 if name == "processor_res" else 255)
        fields[f"controlnet_{name}"] = value if in_range and (canny or name == "processor_res") else default
    if unit.get("control_mode", 0) not in (0, CONTROL_MODE):
        refused.append(f"{field}.control_mode: only {CONTROL_MODE} (0) is supported here")
    if unit.get("hr_option", "Both") not in ("Both", 0):
        refused.append(f"{field}.hr_option: only Both is supported here (ControlNet steers both hires passes)")
    if unit.get("mask") or unit.get("mask_image") or isinstance(unit.get("image"), (dict, list)):
        refused.append(f"{field}.image: send one base64 picture; a ControlNet mask is not supported here")
    if needs_image and not (unit.get("image") or unit.get("input_image")):
        refused.append(f"{field}.image: send the control picture (base64)")
    return fields, refused


def resize_mode(value: Any) -> int:
    """The extension's resize mode, by name (older names too) or number (3, the latent resize, is Just Resize)."""
    if isinstance(value, str):
        name = _RESIZE_ALIASES.get(value, value)
        if name in CN_RESIZE_MODES:
            return CN_RESIZE_MODES.index(name)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return 0 if value == 3 else value
    raise ValueError(f"{value!r} is no resize mode; send one of {', '.join(CN_RESIZE_MODES)} or 0, 1, 2")


def where(place: int) -> str:
    return f"alwayson_scripts.{SCRIPT}.args[{place}]"


def field_names(req: GenerationBody) -> dict[str, str]:
    """Our ControlNet field names -> the client's, for messages."""
    units = units_of(req)
    if len(units) != 1:
        return {}
    field = where(units[0][0])
    names = {ours: f"{field}.{theirs}" for theirs, ours in _PLAIN.items()}
    return names | {f"controlnet_{name}": f"{field}.{name}" for name in ("resize_mode", "processor_res",
                                                                         "threshold_a", "threshold_b")} | {
        "controlnet_image": f"{field}.image"}


def control_image_of(req: GenerationBody) -> Image.Image | None:
    """The enabled unit's picture, decoded; None without one (controlnet_fields allows that on img2img only)."""
    units = units_of(req)
    if len(units) != 1:
        return None
    place, unit = units[0]
    if not (unit.get("image") or unit.get("input_image")):  # img2img's: its own picture steers
        return None
    field = f"{where(place)}.{'image' if unit.get('image') else 'input_image'}"
    return decode_image(unit.get("image") or unit.get("input_image"), field=field, check_size=check_picture_size)


# --- the extension's own routes ---------------------------------------------------------------------------
class DetectRequest(BaseModel):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)  # for preprocessors that read masks; none here
    low_vram: bool = False


def add_controlnet_routes(router: APIRouter, services) -> None:
    library = services.engine.controlnets

    def model_list(update: bool = Query(True)) -> dict:
        """The ControlNet models, "name [hash]" (the folder is read at each look)."""
        return {"model_list": library.titles()}

    def module_list(alias_names: bool = Query(False)) -> dict:
        """The preprocessors, with their sliders as the extension describes them."""
        names = [_LABELS.get(name, name) if alias_names else name for name in CN_MODULES]
        detail = {shown: {"model_free": False, "sliders": _SLIDERS[name]} for shown, name in zip(names, CN_MODULES)}
        return {"module_list": names, "module_detail": detail}

    def detect(body: DetectRequest) -> dict:
        """The preprocessor's maps of the pictures (base64 PNGs)."""
        module = {label: name for name, label in _LABELS.items()}.get(body.controlnet_module, body.controlnet_module)
        if module not in CN_MODULES:
            raise ApiError(422, f"controlnet_module: {body.controlnet_module[:100]!r} is not available here; one of "
                                f"{', '.join(CN_MODULES)}", "InvalidRequest")
        if not body.controlnet_input_images:
            raise ApiError(422, "controlnet_input_images: no image selected; send base64 pictures", "InvalidRequest")
        fields, _ = unit_fields({"module": module, "processor_res": body.controlnet_processor_res,
                                 "threshold_a": body.controlnet_threshold_a,
                                 "threshold_b": body.controlnet_threshold_b, "image": "-"}, "")
        images = []
        for i, data in enumerate(body.controlnet_input_images):
            picture = as_rgb(decode_image(data, f"controlnet_input_images[{i}]", check_size=check_picture_size))
            images.append(encode_image(detect_map(picture, module, fields["controlnet_processor_res"],
                                                  fields["controlnet_threshold_a"], fields["controlnet_threshold_b"])))
        return {"info": "Success", "images": images}

    add = router.add_api_route
    add("/controlnet/model_list", model_list, methods=["GET"], tags=["controlnet"])
    add("/controlnet/module_list", module_list, methods=["GET"], tags=["controlnet"])
    add("/controlnet/version", lambda: {"version": API_VERSION}, methods=["GET"], tags=["controlnet"],
        summary="version")
    add("/controlnet/settings", lambda: {"control_net_unit_count": 1}, methods=["GET"], tags=["controlnet"],
        summary="settings (one unit here)")
    add("/controlnet/detect", detect, methods=["POST"], tags=["controlnet"])
