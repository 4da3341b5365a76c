"""Translate between stable-diffusion-webui's API shapes and ours: requests in, jobs out.

Kept apart from the routes so each route stays a few lines: read, call the worker, answer.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import io
import json
import re
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from webui import __version__
from webui.api import scripts
from webui.api.models import (
    ExtrasBody, GenerationBody, GenerationResponse, Img2ImgRequest, JobProgress, Txt2ImgRequest,
)
from webui.config import A1111_IGNORED_SWITCHES, A1111_IGNORED_VALUES, A1111_REFUSED_FLAGS, Settings
from webui.engine.generate import LoadedModel
from webui.engine.img2img import check_picture_size
from webui.extras import FILTERS_ONLY, MAX_PICTURES, MAX_REQUEST_PIXELS, Upscalers, upscale, upscaled_size
from webui.engine.models import ModelEntry, ModelNotFound, ModelRegistry
from webui.engine.vae import AUTOMATIC
from webui.engine.hires import NO_UPSCALER
from webui.engine.samplers import resolve_sampler, schedule_key, split_sampler_name
from webui.engine.step_options import INFOTEXT_KEYS as STEP_INFOTEXT_KEYS, StepOptions, unfollowed
from webui.schemas import (SAVE_SETTINGS, GeneratedImage, GenerationRequest, InvalidRequest, a1111_seed_resize,
                           parse_request, vae_choice as read_vae_choice)
from webui.storage.infotext import PROGRAM, UNIPC_INFOTEXT_KEYS, parse_infotext, request_fields_from_infotext
from webui.storage.options import SAVING_KEYS, SavedOptions
from webui.storage.outputs import MAX_SCANNED_PIXELS, image_bytes, png_texts_only, read_infotext, text_chunks
from webui.worker import Job


class ApiError(Exception):
    """An error with the HTTP status and message the client gets."""

    def __init__(self, status: int, message: str, kind: str = "ApiError", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


# Fields that name a feature we lack: (field, asks for it?, what to say); a field a request type lacks asks nothing.
_UNSUPPORTED = (
    ("alwayson_scripts", lambda v: any(name.lower() not in ("controlnet", scripts.SOFT_INPAINTING) for name in v or {}),
     "no always-on script but ControlNet (alwayson_scripts.controlnet) and Soft inpainting (alwayson_scripts."
     "soft inpainting, on img2img) are installed on this server; leave the others out"),
    ("firstphase_width", lambda v: bool(v), "the old hires fix's first-pass size is not supported; send 0, and "
                                            "hr_scale or hr_resize_x/hr_resize_y for the larger size"),
    ("firstphase_height", lambda v: bool(v), "the old hires fix's first-pass size is not supported; send 0, and "
                                             "hr_scale or hr_resize_x/hr_resize_y for the larger size"),
    ("mask_round", lambda v: v is False, "only a rounded latent mask is supported (send true or null)"),
    ("latent_mask", lambda v: v is not None, "a separate latent mask is not supported (send null)"),
)
# Infotext fields the `infotext` request field may fill (the model is left out on purpose: pasting
# an infotext should not switch the server's model behind the client's back; its refiner runs for that job alone).
_INFOTEXT_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed",
                    "subseed", "subseed_strength", "width", "height", "refiner_checkpoint", "refiner_switch_at")
_IMG2IMG_INFOTEXT_FIELDS = _INFOTEXT_FIELDS + ("denoising_strength", "image_cfg_scale")
# body fields whose own defaults stand for "none given" (0 or -1, false): an infotext fills each group where the body
# sends none of it
_PASTED_BODY_FIELDS = (("seed_resize_from_w", "seed_resize_from_h"), ("tiling",), ("batch_size",))
# A1111's options that are request fields here, by their infotext keys: a field or override_settings gives one,
# else the `infotext` (option_fields)
_OPTION_KEYS = {"s_min_uncond": "NGMS", "s_min_uncond_all": "NGMS all steps", "skip_early_cond": "Skip Early CFG",
                "sgm_noise_multiplier": "SGM noise multiplier",
                "always_discard_next_to_last_sigma": "Discard penultimate sigma", "sd_noise_schedule": "Noise Schedule",
                "use_downcasted_alpha_bar": "Downcast alphas_cumprod",
                "img2img_extra_noise": "Extra noise", "initial_noise_multiplier": "Noise multiplier"}
_OPTION_KEYS |= {name: key for name, key in STEP_INFOTEXT_KEYS.items()} | {"eta_noise_seed_delta": "ENSD"}
_OPTION_KEYS |= {"beta_dist_alpha": "Beta schedule alpha", "beta_dist_beta": "Beta schedule beta",
                 "sigma_min": "Schedule min sigma", "sigma_max": "Schedule max sigma", "rho": "Schedule rho"}
_OPTION_KEYS |= UNIPC_INFOTEXT_KEYS
_OPTION_FIELDS = ("s_min_uncond", "s_min_uncond_all", "skip_early_cond", "sgm_noise_multiplier", "img2img_extra_noise",
                  "always_discard_next_to_last_sigma", "sd_noise_schedule", "use_downcasted_alpha_bar",
                  "use_old_karras_scheduler_sigmas", *STEP_INFOTEXT_KEYS,
                  "eta_noise_seed_delta", "beta_dist_alpha", "beta_dist_beta", "sigma_min", "sigma_max", "rho",
                  *UNIPC_INFOTEXT_KEYS,
                  # an SDXL refiner's aesthetic scores: no infotext key (A1111 writes none)
                  "sdxl_refiner_high_aesthetic_score", "sdxl_refiner_low_aesthetic_score")
# Options a body field of another name gives: A1111's `eta` is whichever eta the run's sampler reads.
_BODY_FIELDS = {"eta_ddim": "eta", "eta_ancestral": "eta"}
_IMG2IMG_OPTION_FIELDS = _OPTION_FIELDS + ("initial_noise_multiplier",)
# The options POST /sdapi/v1/options sets for the API requests that give none (A1111's), each -> the request field it is
# checked as (img2img's token merging ratio is checked as the ratio is)
API_OPTIONS = {name: name for name in _IMG2IMG_OPTION_FIELDS} | {
    "token_merging_ratio": "token_merging_ratio", "token_merging_ratio_hr": "token_merging_ratio_hr",
    "token_merging_ratio_img2img": "token_merging_ratio"}
# stable-diffusion-webui's schedule types (1.10). It never rejects one: those we lack run as Automatic.
A1111_SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                        "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
_A1111_SCHEDULE_BY_NAME = {name: label for label in A1111_SCHEDULE_TYPES
                           for name in (label.lower(), schedule_key(label))}


def to_generation_request(req: GenerationBody, registry: ModelRegistry, loaded: ModelEntry | None,
                          default_clip_skip: int = 1, default_model: str | None = None,
                          default_vae: str = AUTOMATIC, vae_exists: Callable[[str], bool] = lambda name: True,
                          default_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A1111 txt2img or img2img body -> GenerationRequest fields and notes on what runs other than asked (a
    schedule type run as Automatic), or ApiError naming each field to fix. default_clip_skip, default_model and
    default_vae are for a request that gives none of its own (POST /options sets them, and default_options: A1111's
    sampler and token merging options, API_OPTIONS); an infotext's VAE that
    vae_exists says is not here is left out with a note, as A1111 runs on without it. An img2img body's picture is
    not among the fields: init_image_of decodes it."""
    img2img = isinstance(req, Img2ImgRequest)
    if isinstance(req, Txt2ImgRequest) and req.infotext:
        req = _with_pasted_hires(req)
    problems = [f"{name}: {message}" for name, asks, message in _UNSUPPORTED if asks(getattr(req, name, None))]
    if img2img and len(req.init_images or []) != 1:
        problems.append("init_images: send one base64 image" if not req.init_images else
                        f"init_images: only one image is supported, got {len(req.init_images)}")
    pasted_fields = _IMG2IMG_INFOTEXT_FIELDS if img2img else _INFOTEXT_FIELDS
    values = {name: getattr(req, name) for name in pasted_fields}
    values["sampler_name"] = req.sampler_name or req.sampler_index or "Euler"
    values["subseed"] = -1 if req.subseed is None else req.subseed  # null: A1111's defaults
    values["subseed_strength"] = req.subseed_strength or 0.0
    values["refiner_switch_at"] = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at  # A1111's default
    if img2img:
        values["denoising_strength"] = 0.75 if req.denoising_strength is None else req.denoising_strength
        # null: no image guidance (plain CFG with the picture), as A1111's API runs an instruct-pix2pix model then
        values["image_cfg_scale"] = 1.0 if req.image_cfg_scale is None else req.image_cfg_scale
    clip_skip, vae, notes, pasted = default_clip_skip, default_vae, [], {}
    option_vae_gone = not vae_exists(vae)  # deleted since it was set: as A1111, the run goes on without it
    if option_vae_gone:
        vae = AUTOMATIC
    if req.infotext:
        pasted = request_fields_from_infotext(req.infotext)
        given = set(req.model_fields_set)
        if given & {"sampler_name", "sampler_index"}:
            given |= {"sampler_name", "scheduler"}  # a sampler the client picks goes with its own schedule
        for name in pasted_fields:
            if name in pasted and name not in given:
                values[name] = pasted[name]
        clip_skip = pasted.get("clip_skip", clip_skip)
        pasted_vae = pasted.get("sd_vae")  # as A1111, an override of the option
        if pasted_vae is not None and vae_exists(pasted_vae):
            vae = pasted_vae
        elif pasted_vae is not None:
            notes.append(f"infotext: its VAE {pasted_vae[:100]!r} is not on this server; ran with {vae} (as A1111 "
                         "does; GET /sdapi/v1/sd-vae lists the VAEs here)")

    overrides = req.override_settings or {}
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = overrides["CLIP_stop_at_last_layers"]
    if overrides.get("sd_vae") is not None:
        try:
            vae = vae_choice(overrides["sd_vae"], "override_settings.sd_vae")
        except InvalidRequest as err:
            problems.append(str(err))
    elif option_vae_gone and (pasted.get("sd_vae") is None or not vae_exists(pasted["sd_vae"])):
        notes.append(f"sd_vae: the option's VAE {default_vae[:100]!r} is no longer on this server; ran with "
                     f"{AUTOMATIC} (POST /sdapi/v1/options sets another)")
    model = None
    if overrides.get("sd_model_checkpoint"):
        model = model_name(overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
        find_listed_model(registry, model, loaded, field="override_settings.sd_model_checkpoint")

    # Checked here, not only by the schema, so each message names the field it is about.
    try:
        *resolved, note = sampler_and_schedule(values["sampler_name"], values["scheduler"])
    except ValueError as err:  # named as the client sent it
        problems.append(str(err).replace("sampler_name: ", f"{_sampler_source(req, pasted)}: ", 1))
        resolved, note = ("Euler", "Automatic"), None  # placeholders, so the schema check below reports only the rest
    values["sampler_name"], values["scheduler"] = resolved

    data = values | {
        "batch_size": req.batch_size, "n_iter": req.n_iter, "model": model or default_model,
        "restore_model": bool(model) and req.override_settings_restore_afterwards is not False,
        "keep_model": bool(model) and req.override_settings_restore_afterwards is False,
        "save_images": req.save_images, "send_images": req.send_images, "clip_skip": clip_skip,
        "styles": req.styles or [], "tiling": bool(req.tiling), "sd_vae": vae,
        **dict(zip(("seed_resize_from_w", "seed_resize_from_h"),
                   a1111_seed_resize(req.seed_resize_from_w, req.seed_resize_from_h))),
    }
    # an infotext's seed resize (both sides, where the body sets neither), tiling and batch size, as A1111's paste
    # fields fill them
    data |= {name: pasted[name] for group in _PASTED_BODY_FIELDS if not set(group) & req.model_fields_set
             for name in group if name in pasted}
    if img2img:
        data["resize_mode"] = 0 if req.resize_mode is None else req.resize_mode
        # A1111's setting, by override_settings as A1111 takes it
        # (read by the schema: "false" is false, and a value that is no boolean is refused under its name)
        correction = overrides.get("img2img_color_correction")
        data["color_correction"] = False if correction is None else correction
    data |= option_fields(req, _IMG2IMG_OPTION_FIELDS if img2img else _OPTION_FIELDS, default_options)
    if overrides.get("enable_prompt_comments") is not None:  # else the Settings tab's, for everyone
        data["prompt_comments"] = overrides["enable_prompt_comments"]
    # A1111's Emphasis mode: override_settings, else an infotext's key (A1111 reads it into override_settings), else
    # the Settings tab's
    emphasis = overrides.get("emphasis", pasted.get("emphasis"))
    if emphasis is not None:
        data["emphasis"] = emphasis
    # Restore faces: the body's, else an infotext's (its key is there); the restorer and CodeFormer's weight by
    # override_settings, else an infotext's restorer, else the Settings tab's
    data["restore_faces"] = pasted.get("restore_faces", False) if req.restore_faces is None else req.restore_faces
    data["face_restoration_model"] = overrides.get("face_restoration_model", pasted.get("face_restoration_model"))
    data["code_former_weight"] = overrides.get("code_former_weight")
    # A1111's Inpainting conditioning mask strength: override_settings, else an infotext's, else the Settings tab's
    data["inpainting_mask_weight"] = overrides.get("inpainting_mask_weight", pasted.get("inpainting_mask_weight"))
    data["sdxl_clip_l_skip"] = overrides.get("sdxl_clip_l_skip", pasted.get("sdxl_clip_l_skip"))  # likewise
    data["img2img_fix_steps"] = overrides.get("img2img_fix_steps", pasted.get("img2img_fix_steps"))  # likewise
    for name in ("use_old_scheduling", "refiner_switch_by_sample_steps"):  # likewise
        data[name] = overrides.get(name, pasted.get(name))
    # no infotext key: override_settings, else the tab's
    for name in ("overlay_inpaint", "upscaler_for_img2img", "comma_padding_backtrack", "img2img_background_color"):
        data[name] = overrides.get(name)
    if "upscaler_for_img2img" in overrides and overrides["upscaler_for_img2img"] in (None, ""):
        data["upscaler_for_img2img"] = NO_UPSCALER  # null overrides the setting with none, as in A1111
    data["hires_fix_refiner_pass"] = overrides.get("hires_fix_refiner_pass", pasted.get("hires_fix_refiner_pass"))
    # A1111's Random number generator source: override_settings, else an infotext's (its key, or A1111's GPU where
    # it has none), else the Settings tab's
    data["randn_source"] = overrides.get("randn_source", pasted.get("randn_source"))
    for name in SAVE_SETTINGS:  # A1111's "Save a copy of image before ...", mask, init image: override_settings
        data[name] = overrides.get(name)
    # how this job's files are written (samples_format, jpeg_quality, ...): override_settings, else the Settings tab's
    data["saving_options"] = {name: overrides[name] for name in SAVING_KEYS if name in overrides}
    data |= token_merging_fields(req, pasted, default_options)
    script, refused = script_fields(req)
    data |= script
    problems.extend(refused)
    if img2img and req.mask:
        inpainting, refused = inpainting_fields(req)
        data |= inpainting
        problems.extend(refused)
    # poor man's outpainting inpaints with a mask of its own
    masked = bool(getattr(req, "mask", None)) or (req.script_name or "").strip().lower() == scripts.OUTPAINTING
    soft, refused, soft_notes = scripts.soft_inpainting_fields(req.alwayson_scripts, kind_of(req), masked)
    data |= soft
    problems.extend(refused)
    notes.extend(soft_notes)
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        hires, refused, hires_notes = hires_fields(req, values["sampler_name"])
        data |= hires
        problems.extend(refused)
        notes.extend(hires_notes)
    try:
        parse_request(data)
    except InvalidRequest as err:
        problems.extend(rename_fields(str(err), client_field_names(req)).split("; "))
    if problems:
        raise ApiError(422, "; ".join(dict.fromkeys(problems)), "InvalidRequest")
    notes += step_option_notes(parse_request(data))
    return data, [note, *notes] if note else notes


def step_option_notes(request: GenerationRequest) -> list[str]:
    """What a client asked of A1111's eta and sigma options that the run's sampler here cannot follow (A1111's would)."""
    options = StepOptions.of(request)
    samplers = dict.fromkeys([request.sampler_name] + ([request.hires_sampler[0]] if request.enable_hr else []))
    return [f"{_BODY_FIELDS.get(name, name)}: {sampler} here takes no {name} (diffusers' scheduler has none); it ran "
            "without"
            for sampler in samplers for name in unfollowed(sampler, options)]


def token_merging_fields(req: GenerationBody, pasted: dict[str, Any], defaults: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """A1111's token merging options as request fields: override_settings' (else a pasted infotext's, as A1111 takes
    those as overrides too, else `defaults`: the options POST /options set). img2img runs at
    token_merging_ratio_img2img where token_merging_ratio is 0, as A1111; the hires fix's pass at
    token_merging_ratio_hr, where it is not 0."""
    keys = parse_infotext(req.infotext)[2] if req.infotext else {}

    def option(name: str, infotext_key: str | None = None) -> float:
        for value in ((req.override_settings or {}).get(name), pasted.get(name) if infotext_key in keys else None,
                      (defaults or {}).get(name)):
            if value is not None:
                return value
        return 0.0

    ratio = option("token_merging_ratio", "Token merging ratio")
    if isinstance(req, Img2ImgRequest):
        return {"token_merging_ratio": ratio or option("token_merging_ratio_img2img")}
    return {"token_merging_ratio": ratio, "token_merging_ratio_hr": option("token_merging_ratio_hr",
                                                                           "Token merging ratio hr")}


def kind_of(req: GenerationBody) -> str:
    return "img2img" if isinstance(req, Img2ImgRequest) else "txt2img"


def script_fields(req: GenerationBody) -> tuple[dict[str, Any], list[str]]:
    """A body's script_name and script_args as request fields (img2img's SD upscale; the other scripts change the
    pictures or run several jobs: webui/api/scripts.py), and what is refused."""
    kind = kind_of(req)
    try:
        name = scripts.script_name(req.script_name, kind)
    except InvalidRequest as err:
        return {}, [str(err)]
    if name is None:
        return {}, []
    values, refused = scripts.read_args(kind, name, req.script_args)
    return (scripts.sd_upscale_fields(values) if name == scripts.SD_UPSCALE and not refused else {}), refused


_HIRES_PASTED = ("enable_hr", "denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                 "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
                 "hr_checkpoint_name")


def _with_pasted_hires(req: Txt2ImgRequest) -> Txt2ImgRequest:
    """A body whose pasted infotext made its picture with the hires fix, with that fix's fields where the body
    sets no hires fix of its own (as A1111 applies a pasted infotext)."""
    pasted = request_fields_from_infotext(req.infotext)
    if not pasted.get("enable_hr") or "enable_hr" in req.model_fields_set:
        return req
    return req.model_copy(update={name: pasted[name] for name in _HIRES_PASTED
                                  if name in pasted and name not in req.model_fields_set})


# A1111's values of the second pass's own settings that mean "as the first pass".
_SAME = (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler")


def hires_fields(req: Txt2ImgRequest, sampler: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """The hires fix's GenerationRequest fields (null means A1111's default), what is refused, and notes. `sampler`:
    the first pass's, which a hires schedule type alone goes with. As the first pass's, a hires schedule type the
    sampler cannot follow runs as Automatic with a note (the worker checks hr_checkpoint_name against the models
    folder when the job is queued)."""
    fields = {"enable_hr": True, "hr_scale": 2.0 if req.hr_scale is None else req.hr_scale,
              "hr_upscaler": req.hr_upscaler or "Latent", "hr_second_pass_steps": req.hr_second_pass_steps or 0,
              "hr_resize_x": req.hr_resize_x or 0, "hr_resize_y": req.hr_resize_y or 0,
              "denoising_strength": 0.75 if req.denoising_strength is None else req.denoising_strength,
              "hr_sampler_name": None if req.hr_sampler_name in _SAME else req.hr_sampler_name,
              "hr_scheduler": None if req.hr_scheduler in _SAME else req.hr_scheduler,
              # empty: the first pass's (GenerationRequest keeps them only where they differ)
              "hr_prompt": req.hr_prompt or None, "hr_negative_prompt": req.hr_negative_prompt or None,
              "hr_checkpoint_name": None if req.hr_checkpoint_name in _SAME else req.hr_checkpoint_name}
    refused, notes = [], []
    hires_sampler, hires_schedule = fields["hr_sampler_name"], fields["hr_scheduler"]
    if hires_schedule is not None or (hires_sampler is not None and split_sampler_name(hires_sampler)[1]):
        try:  # a schedule type asked for (also by an old combined name, "DDIM Karras")
            ran_sampler, ran_schedule, note = sampler_and_schedule(hires_sampler or sampler, hires_schedule)
        except ValueError as err:
            refused.append(f"hr_{err}")  # its field: hr_scheduler, or hr_sampler_name
            fields["hr_sampler_name"] = fields["hr_scheduler"] = None  # so the schema check reports only the rest
        else:
            fields["hr_scheduler"] = ran_schedule
            if hires_sampler is not None:
                fields["hr_sampler_name"] = ran_sampler
            if note:
                notes.append(f"hr_{note}")
    return fields, refused, notes


def inpainting_fields(req: Img2ImgRequest) -> tuple[dict[str, Any], list[str]]:
    """An img2img body's inpainting fields (A1111's API defaults for those left out or null; as in A1111, an
    `infotext` does not set them), and what is refused."""
    blur, refused = req.mask_blur, []
    if blur is None:
        blur_x, blur_y = (4 if value is None else value for value in (req.mask_blur_x, req.mask_blur_y))
        if blur_x != blur_y:
            refused.append(f"mask_blur_x: a blur across ({blur_x}) other than down ({blur_y}) is not supported; send "
                           "mask_blur")
        blur = blur_x
    defaults = Img2ImgRequest.model_fields
    fields = {"mask_blur": blur}
    for name in ("inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert"):
        value = getattr(req, name)
        fields[name] = defaults[name].default if value is None else value
    return fields, refused


def sampler_and_schedule(sampler_name: str, schedule: str | None) -> tuple[str, str, str | None]:
    """The sampler and schedule type that run, and a note when that schedule is not the one asked for.

    As in stable-diffusion-webui, a schedule type it knows never fails a request: one we lack, or one the
    sampler cannot follow, runs as Automatic. An unknown sampler, or a schedule name stable-diffusion-webui
    does not know either, raises ValueError("field: what to fix").
    """
    sampler_name, named_schedule = split_sampler_name(sampler_name)  # "Euler a Karras", as A1111 splits it
    schedule = named_schedule or schedule
    try:
        sampler, automatic = resolve_sampler(sampler_name, "Automatic")
    except ValueError as err:
        raise ValueError(f"sampler_name: {err}") from None
    try:
        return (*resolve_sampler(sampler_name, schedule), None)
    except ValueError as err:
        asked = _A1111_SCHEDULE_BY_NAME.get(schedule.strip().lower())
        if asked is None:
            raise ValueError(f"scheduler: {err}") from None
    ran = "Automatic" if automatic == "Automatic" else f"Automatic ({automatic} for {sampler})"
    return sampler, automatic, f"scheduler: {sampler} cannot follow the {asked} schedule here; it ran with {ran}"


def vae_choice(value: Any, field: str) -> str:
    """A1111's sd_vae value as a request's: a name; "Automatic" and "None" in any case."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{field}: expected Automatic, None or a VAE file's name (GET /sdapi/v1/sd-vae)")
    return read_vae_choice(value)


def clip_skip_option(value: Any) -> int:
    """POST /options' CLIP_stop_at_last_layers, checked by the request model so its bounds are a request's."""
    try:
        return parse_request({"clip_skip": value}).clip_skip
    except InvalidRequest as err:
        raise ApiError(422, f"CLIP_stop_at_last_layers: {str(err).removeprefix('clip_skip: ')}",
                       "InvalidRequest") from None


def check_clip_skip_depth(clip_skip: int, model: LoadedModel | None) -> None:
    """A CLIP_stop_at_last_layers deeper than the text encoder of the model it applies to is refused."""
    if model is not None and clip_skip > model.text_encoder_layers:
        raise ApiError(422, f"CLIP_stop_at_last_layers: {model.entry.name}'s text encoder has "
                            f"{model.text_encoder_layers} layers; use 1 to {model.text_encoder_layers}",
                       "InvalidRequest")


def clip_skip_for(req: GenerationBody, option: int, loaded: LoadedModel | None) -> tuple[int, list[str]]:
    """The CLIP_stop_at_last_layers option as the request's default clip skip, and a note when the request
    uses it (gives no clip skip of its own; an infotext always does) and it is deeper than the model loaded
    since it was set: the client never sent it, so it runs at the model's deepest instead of failing."""
    uses_option = not req.infotext and (req.override_settings or {}).get("CLIP_stop_at_last_layers") is None
    if not uses_option or loaded is None or option <= loaded.text_encoder_layers:
        return option, []
    deepest = loaded.text_encoder_layers
    return deepest, [f"clip_skip: the CLIP_stop_at_last_layers option {option} is deeper than "
                     f"{loaded.entry.name}'s text encoder; it ran with {deepest}"]


def option_fields(req: GenerationBody, names: tuple[str, ...], defaults: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """A1111's options that are request fields here (NGMS, Skip Early CFG, Extra noise, img2img's Noise multiplier, the
    eta and sigma options, ENSD), each from where A1111 takes it: the body's field (s_min_uncond,
    initial_noise_multiplier, eta, s_churn, ...), else override_settings, else
    the `infotext`'s key, which A1111 reads into override_settings, else `defaults` (the options POST /options set).
    The schema checks the values, under the names client_field_names gives."""
    pasted = {}
    if req.infotext:
        keys = parse_infotext(req.infotext)[2]
        pasted = {name: value for name, value in request_fields_from_infotext(req.infotext).items()
                  if name in _OPTION_KEYS and _OPTION_KEYS[name] in keys}
    given = {}
    for name in names:
        value = getattr(req, _BODY_FIELDS.get(name, name), None)
        for source in (req.override_settings or {}, pasted, defaults or {}):
            value = source.get(name) if value is None else value
        if value is not None:
            given[name] = value
    return given


def api_option_values(body: dict[str, Any]) -> dict[str, Any]:
    """The API_OPTIONS a POST /options body sets, checked as a request checks them (InvalidRequest naming the key to
    fix)."""
    values = {}
    for name, field in API_OPTIONS.items():
        if name in body:
            try:
                values[name] = getattr(parse_request({"prompt": "", field: body[name]}), field)
            except InvalidRequest as err:
                raise InvalidRequest(str(err).replace(field, name, 1)) from None
    return values


def _sampler_source(req: GenerationBody, pasted: dict[str, Any]) -> str:
    """Where a request's sampler came from, named as the client sent it."""
    if req.sampler_name:
        return "sampler_name"
    if "sampler_name" in pasted:
        return "infotext (Sampler)"
    return "sampler_index" if req.sampler_index else "sampler_name"


def _option_field_name(req: GenerationBody, name: str) -> str:
    """Where an option field's value came from, named as the client sent it."""
    if getattr(req, _BODY_FIELDS.get(name, name), None) is not None:
        return _BODY_FIELDS.get(name, name)
    if (req.override_settings or {}).get(name) is None and req.infotext and _OPTION_KEYS.get(name) in parse_infotext(
            req.infotext)[2]:
        return f"infotext ({_OPTION_KEYS[name]})"
    return f"override_settings.{name}"


def clip_skip_field(req: GenerationBody) -> str:
    """Where a request's clip skip came from, named as the client sent it."""
    if (req.override_settings or {}).get("CLIP_stop_at_last_layers") is not None:
        return "override_settings.CLIP_stop_at_last_layers"
    if req.infotext and parse_infotext(req.infotext)[2]:  # a parameters line: its Clip skip, or 1 without one
        return "infotext (Clip skip)"
    return "CLIP_stop_at_last_layers (the option)"


def client_field_names(req: GenerationBody) -> dict[str, str]:
    """Our names for the request fields a client sets under other names -> the names it used."""
    names = {"clip_skip": clip_skip_field(req), "model": "override_settings.sd_model_checkpoint",
             "sd_vae": "override_settings.sd_vae" if (req.override_settings or {}).get("sd_vae") is not None
             else "infotext (VAE)" if req.infotext and "VAE" in parse_infotext(req.infotext)[2] else "sd_vae"}
    names |= {name: _option_field_name(req, name) for name in _IMG2IMG_OPTION_FIELDS}
    overrides = req.override_settings or {}
    if overrides.get("token_merging_ratio") is not None:
        names["token_merging_ratio"] = "override_settings.token_merging_ratio"
    elif isinstance(req, Img2ImgRequest) and overrides.get("token_merging_ratio_img2img") is not None:
        names["token_merging_ratio"] = "override_settings.token_merging_ratio_img2img"
    if overrides.get("token_merging_ratio_hr") is not None:
        names["token_merging_ratio_hr"] = "override_settings.token_merging_ratio_hr"
    if isinstance(req, Img2ImgRequest):
        names["init_image"] = "init_images[0]"
        names["color_correction"] = "override_settings.img2img_color_correction"
        names |= scripts.sd_upscale_names()
    names["prompt_comments"] = "override_settings.enable_prompt_comments"
    names["saving_options"] = "override_settings"  # its message names the key
    names["emphasis"] = "override_settings.emphasis"
    names["face_restoration_model"] = "override_settings.face_restoration_model"
    names["code_former_weight"] = "override_settings.code_former_weight"
    names["inpainting_mask_weight"] = "override_settings.inpainting_mask_weight"
    names["sdxl_clip_l_skip"] = "override_settings.sdxl_clip_l_skip"
    names |= {name: f"override_settings.{name}" for name in ("randn_source", "img2img_fix_steps",
                                                               "use_old_scheduling", "refiner_switch_by_sample_steps",
                                                               "hires_fix_refiner_pass",
                                                               "overlay_inpaint",
                                                               "upscaler_for_img2img", "comma_padding_backtrack",
                                                               "img2img_background_color", *SAVE_SETTINGS)}
    return names


def rename_fields(message: str, names: dict[str, str]) -> str:
    """Our field names -> the names the client sent (client_field_names), in a validation message."""
    renames = {f"{ours}:": f"{theirs}:" for ours, theirs in names.items()}
    parts = message.split("; ")
    for i, part in enumerate(parts):
        for ours, theirs in renames.items():
            if part.startswith(ours):
                parts[i] = theirs + part[len(ours):]
    return "; ".join(parts)


def model_name(value: Any, field: str) -> str:
    """A model named in a request: a name or title as text, else a 422 that says so."""
    if not isinstance(value, str):
        raise ApiError(422, f"{field}: give a model's name or title as a string (see /sdapi/v1/sd-models), "
                            f"not {type(value).__name__} {value!r}"[:300], "InvalidRequest")
    return value


def find_listed_model(registry: ModelRegistry, name: str, loaded: ModelEntry | None,
                      field: str = "sd_model_checkpoint") -> ModelEntry:
    """As in stable-diffusion-webui, the API loads only models the server lists."""
    try:
        return registry.find_listed(name, loaded)
    except ModelNotFound as err:
        raise ApiError(404, f"{field}: {err} (see /sdapi/v1/sd-models)", "ModelNotFound") from None


# --- the server's flags -----------------------------------------------------------------------
def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")  # as argparse names it: --skip-torch-cuda-test -> skip_torch_cuda_test


def cmd_flags(settings: Settings) -> dict[str, Any]:
    """GET /cmd-flags: stable-diffusion-webui's flag names, with our values where we have the flag."""
    unused = (dict.fromkeys([_dest(flag) for flag in A1111_IGNORED_SWITCHES if flag.startswith("--")], False)
              | dict.fromkeys(map(_dest, A1111_IGNORED_VALUES + A1111_REFUSED_FLAGS)))
    return unused | {
        "api": settings.api, "nowebui": settings.nowebui, "listen": settings.listen,
        "server_name": settings.server_name, "port": settings.port, "share": settings.share,
        "ckpt": settings.ckpt, "ckpt_dir": str(settings.models_dir), "data_dir": None, "models_dir": None,
        "lora_dir": str(settings.lora_folder), "hypernetwork_dir": str(settings.hypernetwork_folder),
        "medvram": settings.medvram, "lowvram": settings.lowvram, "no_half": settings.no_half,
        "no_half_vae": settings.no_half_vae, "xformers": settings.xformers,
        "use_cpu": ["all"] if settings.device == "cpu" else [],
        # Whether a login is on, never the credentials. The API's login is the --gradio-auth one without --api-auth.
        "gradio_auth": "<set>" if settings.gradio_auth else None,
        "api_auth": "<set>" if settings.api_credentials else None,
    }


# --- images -----------------------------------------------------------------------------------
def encode_image(image: Image.Image, infotext: str | None = None, texts: dict[str, str] | None = None,
                 options: SavedOptions | None = None) -> str:
    """A PIL image -> base64 of a file in the settings' format (`options`; PNG without them), as A1111's API
    returns it: with the infotext (or the texts `texts`) where that format keeps it, PNG's text chunks or EXIF."""
    texts = texts if texts is not None else {"parameters": infotext or None}
    file_format = options.samples_format if options else "png"
    return base64.b64encode(image_bytes(image, texts, file_format, options)).decode("ascii")


def decode_image(data: str, field: str = "image", pixels_needed: bool = True,
                 check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """base64 (or a data: URL) -> PIL image, or ApiError 422 naming the field. pixels_needed=False
    leaves the pixels undecoded, for callers that want the metadata alone (read_infotext). check_size(width,
    height) may refuse the picture (ValueError) before its pixels are read."""
    text = (data or "").strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if not text:
        raise ApiError(422, f"{field}: empty; send a base64-encoded PNG, JPEG or WebP", "InvalidRequest")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)  # line-wrapped base64 is fine
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64", "InvalidRequest") from None
    unreadable = ApiError(422, f"{field}: the base64 data is not an image PIL can read", "InvalidRequest")
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:  # its header alone says it is far too large
        texts = None if pixels_needed else png_texts_only(io.BytesIO(raw))  # a PNG's text is read all the same
        if texts is not None:
            return texts
        limit = ("send one of at most 4096x4096" if pixels_needed
                 else "a PNG's text is read at any size, other formats' not")
        raise ApiError(422, f"{field}: the picture is too large to read ({err}); {limit}", "InvalidRequest") from None
    except (UnidentifiedImageError, OSError, ValueError):
        # PIL refuses a text chunk past its size limit (another program's embedded workflow): the rest is read here
        texts = None if pixels_needed else png_texts_only(io.BytesIO(raw))
        if texts is not None:
            return texts
        raise unreadable from None
    try:
        if check_size is not None:
            check_size(*image.size)
    except ValueError as err:
        raise ApiError(422, f"{field}: {err}", "InvalidRequest") from None
    try:
        if pixels_needed:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise unreadable from None
    if not pixels_needed and image.format == "PNG" and image.width * image.height > MAX_SCANNED_PIXELS:
        return png_texts_only(io.BytesIO(raw)) or image  # its text after the pixels too, without decoding them
    return image


def upscale_pictures(req: ExtrasBody, pictures: list[tuple[str, str]], options: SavedOptions | None = None,
                     upscalers: Upscalers = FILTERS_ONLY) -> tuple[list[str], str]:
    """An Extras body's pictures, given as (field, base64), resized: (base64 PNGs, html_info), or ApiError naming
    the field to fix. Every picture's size is checked first, from its header; then each is read in its turn, so a
    batch never holds every original at once."""
    problems = [f"{name}: {message}" for name, asks, message in _UNSUPPORTED if asks(getattr(req, name, None))]
    try:
        upscalers.check(req)
    except InvalidRequest as err:
        problems.append(str(err))
    if problems:
        raise ApiError(422, "; ".join(problems), "InvalidRequest")
    if not pictures or len(pictures) > MAX_PICTURES:
        raise ApiError(422, f"imageList: send from 1 to {MAX_PICTURES} pictures, got {len(pictures)}", "InvalidRequest")
    total = sum(_result_pixels(req, field, data) for field, data in pictures)
    if total > MAX_REQUEST_PIXELS:
        raise ApiError(422, f"the results would be {total / 1e6:.0f} megapixels in all; one request may make at most "
                            f"{MAX_REQUEST_PIXELS / 1e6:.0f}: send fewer pictures or a smaller size", "InvalidRequest")
    encoded, done = [], None
    for field, data in pictures:
        picture = decode_image(data, field, check_size=check_picture_size)
        try:
            done = upscale(picture, req, upscalers)
        except InvalidRequest as err:  # an upscaler's or face restorer's file that could not be had (no network)
            raise ApiError(422, str(err), "InvalidRequest") from None
        encoded.append(encode_image(done.image, texts=done.texts, options=options))
    return encoded, f"<p>{html.escape(done.infotext)}</p>"


def _result_pixels(req: ExtrasBody, field: str, data: str) -> int:
    """How many pixels a picture's result has, from the picture's header; ApiError naming the field when it is no
    picture or its result would be too large."""
    width, height = decode_image(data, field, pixels_needed=False, check_size=check_picture_size).size
    try:
        size = upscaled_size(width, height, req)[1]
    except ValueError as err:
        raise ApiError(422, f"{field}: {err}", "InvalidRequest") from None
    return size[0] * size[1]


def init_image_of(req: GenerationBody) -> Image.Image | None:
    """An img2img body's init image, decoded (to_generation_request has checked that it sent one); None for
    txt2img."""
    if not isinstance(req, Img2ImgRequest):
        return None
    return decode_image(req.init_images[0], field="init_images[0]", check_size=check_picture_size)


def mask_of(req: GenerationBody) -> Image.Image | None:
    """An img2img body's inpainting mask, decoded; None when it sends none (and for txt2img)."""
    if not isinstance(req, Img2ImgRequest) or not req.mask:
        return None
    return decode_image(req.mask, field="mask", check_size=check_picture_size)


def png_info(image: Image.Image) -> dict[str, Any]:
    """The infotext of an image, its other text chunks, and the infotext parsed as A1111 does."""
    infotext = read_infotext(image) or ""
    items = text_chunks(image)
    parameters: dict[str, Any] = {}
    if infotext:
        prompt, negative, params = parse_infotext(infotext)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
        for key, value in params.items():  # as A1111: every WxH value also as key-1 and key-2 (clients read those)
            size = re.fullmatch(r"(\d+)x(\d+)", value.strip())
            if size:
                parameters[f"{key}-1"], parameters[f"{key}-2"] = size.groups()
        parameters = _PNG_INFO_DEFAULTS | parameters
    return {"info": infotext, "items": items, "parameters": parameters}


# What A1111's png-info gives for keys a text leaves out (its parse_generation_parameters): clients read them.
_PNG_INFO_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "", "Mask mode": "Inpaint masked", "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable", "Refiner switch by sampling steps": False,
}


# --- results ----------------------------------------------------------------------------------
def job_result(job: Job, parameters: dict[str, Any], loaded: LoadedModel | None = None,
               options: SavedOptions | None = None) -> GenerationResponse:
    """A finished job -> A1111's {"images", "parameters", "info"}. `loaded`: the model loaded now, which a job
    that never started (cancelled while queued) reports when it would have run on it; `options`: the settings,
    whose format the images come in.

    As in stable-diffusion-webui, a saved multi-image run returns its grid first (index_of_first_image = 1) unless
    the settings' Show grid in gallery is off, and an interrupted run returns the images it finished.
    """
    grids = []
    shown = options is None or options.return_grid
    if job.grid_path and job.request.send_images and shown:
        grids.append(job.grid_image())
    return run_result([job], grids, [(job, image) for image in job.images], parameters, loaded, options)


def run_result(jobs: list[Job], grids: list[GeneratedImage], made: list[tuple[Job, GeneratedImage]],
               parameters: dict[str, Any], loaded: LoadedModel | None = None, options: SavedOptions | None = None,
               send_made: bool = True, notes: list[str] | None = None) -> GenerationResponse:
    """The jobs of one request (one, or a script's several) -> A1111's {"images", "parameters", "info"}: the grids
    first, then the images made (each with its job) where send_made. info's all_seeds, all_prompts and the infotexts
    after the grids' follow the images made, as A1111's do; the rest of it is the first job's."""
    job, request = jobs[0], jobs[0].request
    shown = grids + ([image for _, image in made] if send_made else [])
    encoded = [encode_image(im.image, im.infotext, options=options) for im in shown] if request.send_images else []
    # One seed per image made, in order (one Skip or Interrupt came before its first step returns none), so
    # all_seeds[i] labels image i; with no image at all, the seeds the job was given.
    seeds = [image.seed for _, image in made] or job.seeds or [request.seed]
    count = len(seeds)
    # Likewise one variation seed per image (a job that never started drew none).
    subseeds = [maker.subseeds[image.index] for maker, image in made] or job.subseeds or [request.subseed] * count
    model = job.model  # None when it never started; then the model it would have run, when known
    if model is None and loaded is not None and loaded.names(request.model):
        model = loaded
    started = dt.datetime.fromtimestamp(job.started_at or job.created_at)
    # As A1111's: prompt and negative_prompt as given, all_prompts with the styles joined in (a client that sends
    # info's prompt and styles back must not get the styles twice).
    prompt, negative_prompt = job.prompts_before_styles or (request.prompt, request.negative_prompt)
    info = {
        "prompt": prompt,
        "all_prompts": [maker.request.prompt for maker, _ in made] or [request.prompt] * count,
        "negative_prompt": negative_prompt,
        "all_negative_prompts": ([maker.request.negative_prompt for maker, _ in made]
                                 or [request.negative_prompt] * count),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": model.size_for(request)[0] if model else request.width,
        "height": model.size_for(request)[1] if model else request.height,
        "sampler_name": request.sampler_name,
        "scheduler": request.scheduler,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": request.restore_faces,
        "face_restoration_model": request.face_restoration_model if request.restore_faces else None,
        "sd_model_name": model.entry.name if model else None,
        "sd_model_hash": model.short_hash if model else None,
        "sd_vae_name": job.vae.name if job.vae else None,
        "sd_vae_hash": job.vae_hash,
        "seed_resize_from_w": request.seed_resize_from_w or -1,
        "seed_resize_from_h": request.seed_resize_from_h or -1,
        "denoising_strength": request.denoising_strength if request.is_img2img or request.enable_hr else None,
        "extra_generation_params": {"Schedule type": request.scheduler},
        "index_of_first_image": 1 if grids else 0,
        "infotexts": [grid.infotext for grid in grids] + [image.infotext for _, image in made],
        "styles": list(request.styles),
        "job_timestamp": started.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": bool(model and model.inpainting),
        "version": f"{PROGRAM} {__version__}",
        # ours, beyond A1111's keys
        "job_id": job.id,
        "state": jobs[-1].state.value,
        "nsfw": [image.nsfw for _, image in made],
        # what ran other than asked (a schedule type), a failed save
        "warnings": list(dict.fromkeys([*(notes or []), *(note for each in jobs for note in each.warnings)])),
    }
    if len(jobs) > 1:
        info["job_ids"] = [each.id for each in jobs]
    return GenerationResponse(images=encoded, parameters=parameters, info=json.dumps(info))


def job_progress(job: Job) -> JobProgress:
    p = job.progress
    return JobProgress(step=p.step, total_steps=p.total_steps or job.request.steps, fraction=min(p.fraction, 1.0),
                       eta_seconds=p.eta_seconds, image_index=p.image_index,
                       image_count=p.image_count or job.request.image_count, note=p.note)
