"""Turn saved parameters (history rows, PNG infotext) into updates for the txt2img or img2img widgets."""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable

import gradio as gr

from webui.controlnet import CN_RESIZE_MODES
from webui.engine.hires import HIRES_UPSCALERS
from webui.engine.samplers import SCHEDULE_TYPES, get_sampler, resolve_sampler, split_sampler_name
from webui.engine.soft_inpainting import LABELS as SOFT_LABELS, SOFT_INPAINTING_FIELDS
from webui.schemas import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, SAME_CHECKPOINT
from webui.storage.history import HistoryImage
from webui.storage.infotext import SETTING_KEYS, request_fields_from_infotext, setting_pair
from webui.storage.options import SavedOptions
from webui.xyz_plot import AXIS_TYPES, SCRIPT

# The X/Y/Z plot's switch and axes (generate() parameters), which a grid's infotext sets (A1111's "Script" keys).
PLOT_FIELDS = ("xyz_plot", "x_type", "x_values", "y_type", "y_values", "z_type", "z_values")
# The other scripts' switches, each unticked by sent parameters (A1111 has one script list: a paste sets it).
OTHER_SCRIPTS = ("prompt_matrix", "prompt_list")
IMG2IMG_SCRIPTS = ("outpainting", "loopback", "sd_upscale")
# ControlNet's unit (webui/ui/controlnet.py); its picture never comes with parameters.
CONTROLNET_FIELDS = ("controlnet_enabled", "controlnet_module", "controlnet_model", "controlnet_weight",
                     "controlnet_guidance_start", "controlnet_guidance_end", "controlnet_resize_mode",
                     "controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b",
                     "controlnet_pixel_perfect")
# The fields (GenerationRequest's, and the plot's) a tab takes from a sent image, in the order of
# GenerationTab.field_components.
# img2img's leave the batch size alone (one picture sent need not become several), and take the size of the
# picture sent rather than its infotext's (blocks.py).
# A1111's sampler options both tabs have (Sampler parameters).
SAMPLER_FIELDS = ("skip_early_cond", "s_min_uncond", "s_min_uncond_all", "img2img_extra_noise", "eta_ddim",
                  "eta_ancestral", "s_churn", "s_tmin", "s_tmax", "s_noise", "eta_noise_seed_delta", "beta_dist_alpha",
                  "beta_dist_beta", "sigma_min", "sigma_max", "rho", "always_discard_next_to_last_sigma",
                  "sd_noise_schedule", "use_old_karras_scheduler_sigmas", "use_downcasted_alpha_bar",
                  "uni_pc_variant", "uni_pc_order", "uni_pc_lower_order_final")
COMMON_FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
                 "seed", "clip_skip", "model", "subseed", "subseed_strength", "seed_resize_from_w",
                 "seed_resize_from_h", "randn_source", "styles", "denoising_strength", "tiling", "restore_faces", "sd_vae", *PLOT_FIELDS,
                 *OTHER_SCRIPTS, "refiner", "refiner_checkpoint", "refiner_switch_at", *CONTROLNET_FIELDS,
                 *SAMPLER_FIELDS, "token_merging_ratio", "override_settings")
SOFT_INPAINTING = ("soft_inpainting", *SOFT_INPAINTING_FIELDS)
INPAINTING_FIELDS = ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
                     "inpaint_full_res_padding", *SOFT_INPAINTING)
IMG2IMG_FIELDS = (*COMMON_FIELDS, "color_correction", "initial_noise_multiplier", "image_cfg_scale", *INPAINTING_FIELDS,
                  *IMG2IMG_SCRIPTS)
HIRES_FIELDS = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_checkpoint_name",
                "token_merging_ratio_hr")
# The Random number generator source's choice that leaves it to the Settings tab.
SETTINGS_SOURCE = "Settings"
# The Refiner section's Checkpoint when none is picked.
NO_REFINER = "None"
# The hires fix's sampler and schedule type when they are the first pass's (A1111's words).
SAME_SAMPLER, SAME_SCHEDULE = "Use same sampler", "Use same scheduler"
# txt2img's Denoising strength is its hires fix's.
TXT2IMG_FIELDS = (*COMMON_FIELDS, "batch_size", *HIRES_FIELDS, "sgm_noise_multiplier")
# Fields whose widget is a list of choices picked by their index: the widget takes the choice's label.
_INDEXED_CHOICES = {"inpainting_mask_invert": MASK_MODES, "inpainting_fill": MASKED_CONTENT,
                    "inpaint_full_res": INPAINT_AREAS, "controlnet_resize_mode": CN_RESIZE_MODES}
TAB_FIELDS = {"txt2img": TXT2IMG_FIELDS, "img2img": IMG2IMG_FIELDS}
# The Settings tab's options a pasted infotext may override on each tab (txt2img runs no img2img steps, img2img no
# hires fix).
TAB_SETTINGS = {"txt2img": tuple(name for name in SETTING_KEYS if name != "img2img_fix_steps"),
                "img2img": tuple(name for name in SETTING_KEYS if name != "hires_fix_refiner_pass")}


# What the page calls each request field, for messages: "Batch count", not "n_iter".
FIELD_LABELS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "sampler_name": "Sampling method",
                "scheduler": "Schedule type", "steps": "Sampling steps", "cfg_scale": "CFG scale", "width": "Width",
                "height": "Height", "seed": "Seed", "n_iter": "Batch count", "batch_size": "Batch size",
                "clip_skip": "Clip skip", "tiling": "Tiling", "restore_faces": "Restore faces", "skip_early_cond": "Ignore negative prompt during early sampling",
                "sgm_noise_multiplier": "SGM noise multiplier",
                "s_min_uncond": "Negative Guidance minimum sigma", "initial_noise_multiplier": "Noise multiplier for img2img",
                "image_cfg_scale": "Image CFG Scale",
                "img2img_extra_noise": "Extra noise multiplier for img2img and hires fix", "s_min_uncond_all": "Negative Guidance minimum sigma all steps",
                "eta_ddim": "Eta for DDIM", "eta_ancestral": "Eta for ancestral samplers", "s_churn": "Sigma churn",
                "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise",
                "eta_noise_seed_delta": "Eta noise seed delta", "beta_dist_alpha": "Beta schedule alpha",
                "beta_dist_beta": "Beta schedule beta", "sigma_min": "Schedule min sigma",
                "sigma_max": "Schedule max sigma", "rho": "Schedule rho",
                "always_discard_next_to_last_sigma": "Always discard next-to-last sigma",
                "sd_noise_schedule": "Noise schedule for sampling",
                "use_old_karras_scheduler_sigmas": "Use old karras scheduler sigmas",
                "use_downcasted_alpha_bar": "Downcast alphas_cumprod", "uni_pc_variant": "UniPC variant",
                "uni_pc_order": "UniPC order", "uni_pc_lower_order_final": "UniPC lower order final", "color_correction": "Color correction", "model": "Stable Diffusion checkpoint", "subseed": "Variation seed",
                "subseed_strength": "Variation strength", "seed_resize_from_w": "Resize seed from width",
                "seed_resize_from_h": "Resize seed from height", "randn_source": "Random number generator source",
                "styles": "Styles",
                "denoising_strength": "Denoising strength", "resize_mode": "Resize mode", "init_image": "Image",
                "enable_hr": "Hires. fix", "hr_scale": "Upscale by", "hr_upscaler": "Upscaler",
                "hr_second_pass_steps": "Hires steps", "hr_resize_x": "Resize width to",
                "hr_resize_y": "Resize height to", "hr_sampler_name": "Hires sampling method",
                "hr_scheduler": "Hires schedule type", "hr_prompt": "Hires prompt",
                "hr_negative_prompt": "Hires negative prompt", "hr_checkpoint_name": "Hires checkpoint",
                "mask": "Mask", "mask_blur": "Mask blur",
                "inpainting_mask_invert": "Mask mode", "inpainting_fill": "Masked content",
                "inpaint_full_res": "Inpaint area", "inpaint_full_res_padding": "Only masked padding",
                "sd_vae": "SD VAE", "refiner_checkpoint": "Refiner checkpoint", "refiner_switch_at": "Switch at",
                "controlnet_enabled": "ControlNet", "controlnet_image": "ControlNet picture",
                "controlnet_module": "ControlNet Preprocessor", "controlnet_model": "ControlNet Model",
                "controlnet_weight": "Control Weight", "controlnet_guidance_start": "Starting Control Step",
                "controlnet_guidance_end": "Ending Control Step", "controlnet_processor_res": "Preprocessor Resolution",
                "controlnet_threshold_a": "Canny Low Threshold", "controlnet_threshold_b": "Canny High Threshold",
                "token_merging_ratio": "Token merging ratio",
                "token_merging_ratio_hr": "Token merging ratio for high-res pass",
                "soft_inpainting": "Soft inpainting", "override_settings": "Override settings",
                "upscaler_for_img2img": "Upscaler for img2img (Settings)",
                "comma_padding_backtrack": "Prompt word wrap length limit (Settings)",
                "img2img_background_color": "Fill colour of transparent parts (Settings)"} | {
    name: f"Soft inpainting {label.lower()}" for name, label in zip(SOFT_INPAINTING_FIELDS, SOFT_LABELS)} | {
    name: f"Override settings ({key})" for name, key in SETTING_KEYS.items()}  # the page sets them there alone


def with_labels(message: str) -> str:
    """A request check's message ("n_iter: ...; steps: ...") with the page's labels for its fields."""
    parts = message.split("; ")
    for index, part in enumerate(parts):
        fields, colon, rest = part.partition(": ")
        names = fields.split(", ")  # one problem of several fields: "hr_resize_x, hr_resize_y: ..."
        if colon and all(name in FIELD_LABELS for name in names):
            parts[index] = f"{', '.join(FIELD_LABELS[name] for name in names)}: {rest}"
    return "; ".join(parts)


# A model's name in the models folder, from the name and short hash an infotext or history row gives;
# None when no listed model matches.
FindModel = Callable[[str, str | None], str | None]


def fields_from_history(image: HistoryImage) -> dict[str, Any]:
    """What a History picture sends to a tab: every field its infotext gives, as PNG Info's paste (a list of its own
    here drifted: SGM noise multiplier was left out), with the row's own columns over them."""
    return request_fields_from_infotext(image.infotext) | {
        "prompt": image.prompt, "negative_prompt": image.negative_prompt, "sampler_name": image.sampler,
        "scheduler": image.scheduler, "steps": image.steps, "cfg_scale": image.cfg_scale,
        "width": image.width, "height": image.height, "seed": image.seed, "clip_skip": image.clip_skip,
        "model": image.model_name, "model_hash": image.model_hash,
    }


def override_settings(fields: dict[str, Any], current: SavedOptions, kind: str) -> dict:
    """The tab's Override settings after a paste (A1111's): the settings the pasted infotext records (its
    recorded_settings) where the Settings tab has them otherwise now, each as its infotext pair, all picked; hidden
    when there are none."""
    recorded = fields.get("recorded_settings") or ()
    pairs = [setting_pair(name, fields[name]) for name in TAB_SETTINGS[kind]
             if name in recorded and fields.get(name) is not None and fields[name] != getattr(current, name)]
    return gr.update(choices=pairs, value=pairs, visible=bool(pairs))


Limits = dict[str, tuple[float | None, float | None]]


def widget_updates(fields: dict[str, Any], names: tuple[str, ...], model_names: list[str],
                   find_model: FindModel, vae_names: list[str] = (), upscaler_names: list[str] = HIRES_UPSCALERS,
                   limits: Limits | None = None) -> list[Any]:
    """One value (or gr.skip()) per entry of names (a tab's TAB_FIELDS). A sampler, schedule type or model
    that cannot be applied is left out with a warning in the page saying why, since its dropdown would otherwise keep
    its old value without a word. model_names: the model dropdown's list as it is now, which the
    dropdown gets again (another tab may have rescanned the models folder since this page was built); vae_names:
    the SD VAE dropdown's, likewise; upscaler_names: the hires fix's upscalers (with the model upscalers' files);
    limits: the widgets' own ends (GenerationTab.field_limits), a value past which is left out likewise."""
    fields = dict(fields)
    if "prompt" in fields:  # a sent prompt has its styles joined in already: a style left picked would join twice
        fields["styles"] = []
    model_note = _apply_model(fields, model_names, find_model)
    for note in (_apply_sampler(fields), _apply_hires_sampler(fields), model_note, _apply_vae(fields, vae_names),
                 _apply_refiner(fields, model_names, find_model),
                 _apply_hires_checkpoint(fields, model_names, find_model) if "hr_checkpoint_name" in names else None,
                 _apply_plot(fields, names),
                 _apply_upscaler(fields, upscaler_names) if "hr_upscaler" in names else None,
                 *_round_sizes(fields),
                 *_drop_out_of_range(fields, names, limits or {})):
        if note:
            gr.Warning(note)
    for name, choices in _INDEXED_CHOICES.items():
        if fields.get(name) is not None:
            fields[name] = choices[int(fields[name])]
    if fields.get("scheduler"):  # the Schedule type list follows the sampler (txt2img.schedules_for)
        fields["scheduler"] = gr.update(choices=schedules_of(fields.get("sampler_name")), value=fields["scheduler"])
    return [fields[name] if fields.get(name) is not None else gr.skip() for name in names]


def schedules_of(sampler_name: str | None) -> list[str]:
    """The schedule types a sampler can follow; all of them when the sampler on the page is not known here."""
    return list(get_sampler(sampler_name).schedules if sampler_name else SCHEDULE_TYPES)


# The browser's numbers hold whole numbers exactly up to 2**53: a larger seed sent to the page comes back another
PAGE_EXACT_WHOLE = 2**53


def seed_the_page_holds(value: int, label: str) -> str | None:
    """Why a seed cannot go to the page's number box (None: it can)."""
    if value <= PAGE_EXACT_WHOLE:
        return None
    return (f"{label} {value} not applied: the page holds whole numbers exactly up to {PAGE_EXACT_WHOLE}, and this "
            "one would come back another seed. Make it through the API (or paste its infotext there).")


def _drop_out_of_range(fields: dict[str, Any], names: tuple[str, ...], limits: Limits) -> list[str]:
    """Leave out numbers past their widget's ends (Steps: 200 from another tool), which Gradio would refuse at every
    Generate, and say so for each of the fields sent (names): a tab has no word to say about a field it does not
    have. A Clip skip deeper than a model's text encoder is the job's to refuse: it depends on the model the job runs
    on."""
    notes = []
    for name in names:
        value = fields.get(name)
        low, high = limits.get(name, (None, None))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name in ("seed", "subseed") and (note := seed_the_page_holds(value, FIELD_LABELS[name])):
            fields.pop(name)
            notes.append(note)
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            fields.pop(name)
            takes = " to ".join(f"{end:g}" for end in (low, high) if end is not None)
            if low is None or high is None:
                takes = f"{'at most' if low is None else 'at least'} {takes}"
            notes.append(f"{FIELD_LABELS.get(name, name)} {value} not applied: this page takes {takes}. "
                         "It is left as it was.")
    return notes


def _round_sizes(fields: dict[str, Any]) -> list[str]:
    """Sizes here are multiples of 8 (one latent pixel each); another tool's 516 becomes 512, the size
    stable-diffusion-webui's latents have for it too, and the user is told."""
    notes = []
    for name, label in (("width", "Width"), ("height", "Height")):
        value = fields.get(name)
        if isinstance(value, int) and value % 8:
            fields[name] = value - value % 8
            notes.append(f"{label} {value} set to {fields[name]}: sizes here are multiples of 8.")
    return notes


def _apply_upscaler(fields: dict[str, Any], upscaler_names: list[str]) -> str | None:
    """An upscaler this server lacks (a model upscaler whose file is not here) is left out, with a warning."""
    upscaler = fields.get("hr_upscaler")
    if upscaler is None:
        return None
    if upscaler in upscaler_names:  # with the list as it is now: the file may be newer than the page
        fields["hr_upscaler"] = gr.update(choices=list(upscaler_names), value=upscaler)
        return None
    fields.pop("hr_upscaler")
    return (f"Upscaler not applied: {upscaler!r} is not on this server (it has {', '.join(upscaler_names)}; a model "
            "upscaler's file goes in models/ESRGAN). The upscaler is left as it was.")


def _apply_model(fields: dict[str, Any], model_names: list[str], find_model: FindModel) -> str | None:
    model, short_hash = fields.pop("model", None), fields.pop("model_hash", None)
    if not model and not short_hash:
        return None
    found = find_model(model or "", short_hash)
    if found is None:
        what = repr(model) if model else f"the model with hash {short_hash}"
        return f"Model not applied: {what} is not in the models folder. The model is left as it was."
    fields["model"] = gr.update(choices=[*model_names, *([found] if found not in model_names else [])], value=found)
    return None


def _apply_plot(fields: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The X/Y/Z plot a grid's infotext names, switched on with its axes (those it names not: Nothing); any other
    parameters switch it off, as A1111's paste does. An axis this tab lacks (the hires fix's, on img2img) is left
    out with a note."""
    script = fields.pop("script", None)
    if script is None:  # no parameters line at all: the scripts are left alone
        return None
    fields["xyz_plot"] = script == SCRIPT
    for other in (*OTHER_SCRIPTS, *IMG2IMG_SCRIPTS):  # one script at a time, as Generate runs them
        fields[other] = False
    axes = ("x", "y", "z")
    if script != SCRIPT:
        for axis in axes:
            fields.pop(f"{axis}_type", None), fields.pop(f"{axis}_values", None)
        return None
    notes = []
    for axis in axes:
        label = fields.setdefault(f"{axis}_type", "Nothing")
        fields.setdefault(f"{axis}_values", "")
        known = AXIS_TYPES.get(label)
        if known is None or (known.tab == "txt2img" and "enable_hr" not in names) or (
                known.tab == "img2img" and "image_cfg_scale" not in names):
            fields[f"{axis}_type"], fields[f"{axis}_values"] = "Nothing", ""
            notes.append(f"{axis.upper()} type {label!r} not applied: this tab has no such axis.")
    return " ".join(notes) or None


def _apply_vae(fields: dict[str, Any], vae_names: list[str]) -> str | None:
    """The VAE an infotext names, where the VAE folder has it; none named leaves the pick alone (an image made with
    the model's own VAE names none, and neither does one made by another tool)."""
    vae = fields.pop("sd_vae", None)
    if not vae:
        return None
    if vae not in vae_names:  # A1111 writes a file in a subfolder by its base name: found where one file has it
        same_base = [name for name in vae_names if vae in (PurePosixPath(name).name, PurePosixPath(name).stem)]
        if len(same_base) != 1:
            return f"SD VAE not applied: {vae!r} is not in the VAE folder. The VAE is left as it was."
        vae = same_base[0]
    fields["sd_vae"] = gr.update(choices=list(vae_names), value=vae)
    return None


def _apply_refiner(fields: dict[str, Any], model_names: list[str], find_model: FindModel) -> str | None:
    """The refiner an infotext names (its title, "name [short hash]") ticks the Refiner and picks it; a parameters
    line without one unticks it, as A1111's paste; a refiner not in the models folder is left out with a note."""
    title = fields.pop("refiner_checkpoint", None)
    if title is None:  # no parameters line: left alone
        fields.pop("refiner_switch_at", None)
        return None
    if not title:
        fields["refiner"] = False
        return None
    picked = _checkpoint_pick(title, NO_REFINER, model_names, find_model)
    if picked is None:
        fields.pop("refiner_switch_at", None)
        return f"Refiner not applied: {title!r} is not in the models folder. The Refiner is left as it was."
    fields["refiner"] = True
    if not 0 < (fields.get("refiner_switch_at") or 0) <= 1:  # the slider's range; A1111's default otherwise
        fields["refiner_switch_at"] = 0.8
    fields["refiner_checkpoint"] = picked
    return None


def _apply_hires_checkpoint(fields: dict[str, Any], model_names: list[str], find_model: FindModel) -> str | None:
    """The hires checkpoint an infotext names (its title, "name [short hash]") picked in its list; "Use same
    checkpoint" where it names none (as A1111's paste); one not in the models folder is left out with a note."""
    title = fields.pop("hr_checkpoint_name", None)
    if title is None:  # no parameters line: left alone
        return None
    if title in ("", SAME_CHECKPOINT):
        fields["hr_checkpoint_name"] = SAME_CHECKPOINT
        return None
    picked = _checkpoint_pick(title, SAME_CHECKPOINT, model_names, find_model)
    if picked is None:
        return (f"Hires checkpoint not applied: {title!r} is not in the models folder. The hires checkpoint is left "
                "as it was.")
    fields["hr_checkpoint_name"] = picked
    return None


def _checkpoint_pick(title: str, first: str, model_names: list[str], find_model: FindModel) -> dict | None:
    """A checkpoint list (`first`, then the models) showing the model an infotext's title ("name [short hash]", or a
    name alone) means, found by its name or else its hash; None when no model here is it."""
    named = re.fullmatch(r"(.*?)\s*\[([0-9a-f]{8,10})\]", title)
    name, short_hash = (named.group(1), named.group(2)) if named else (title, None)
    found = find_model(name, short_hash)
    if found is None:
        return None
    return gr.update(choices=[first, *model_names, *([found] if found not in model_names else [])], value=found)


def _apply_hires_sampler(fields: dict[str, Any]) -> str | None:
    """The hires fix's sampler and schedule type as the page's lists name them: "Use same ..." for what a hires fix
    sent leaves to the first pass (as A1111 reads it); left as they were, with a note, where ours cannot run them."""
    if not fields.get("enable_hr"):
        if fields.get("enable_hr") is False:  # a picture made without it: as A1111's paste, back to "Use same ..."
            fields["hr_sampler_name"], fields["hr_scheduler"] = SAME_SAMPLER, SAME_SCHEDULE
        return None
    sampler, schedule = fields.get("hr_sampler_name"), fields.get("hr_scheduler")
    try:
        if sampler:  # an old combined name ("DPM++ 2M Karras") brings its schedule type
            name, implied = split_sampler_name(sampler)
            schedule = schedule or implied
            sampler = resolve_sampler(name, schedule or "Automatic")[0]
        if schedule:  # alone, it goes with the first pass's sampler
            schedule = resolve_sampler(sampler or fields.get("sampler_name") or "Euler a", schedule)[1]
    except ValueError as err:
        fields["hr_sampler_name"] = fields["hr_scheduler"] = None
        return f"Hires sampler not applied: {err}. The hires sampling method and schedule type are left as they were."
    fields["hr_sampler_name"], fields["hr_scheduler"] = sampler or SAME_SAMPLER, schedule or SAME_SCHEDULE
    return None


def _apply_sampler(fields: dict[str, Any]) -> str | None:
    """Put our names for the sampler and schedule type back in fields, only those we can use;
    returns what was left out and why, if anything was."""
    sampler, schedule = fields.pop("sampler_name", None), fields.pop("scheduler", None)
    if not sampler:
        if schedule in SCHEDULE_TYPES:
            fields["scheduler"] = schedule
        elif schedule:
            return (f"Schedule type not applied: unknown schedule type {schedule!r}; choose one of: "
                    f"{', '.join(SCHEDULE_TYPES)}. The schedule type is left as it was.")
        return None
    try:
        # Also splits old combined names ("DPM++ 2M Karras") into the two dropdowns.
        fields["sampler_name"], implied = resolve_sampler(sampler, "Automatic")
    except ValueError as err:
        # The schedule is left out too: it may not suit the sampler that stays.
        return f"Sampler not applied: {err}. Sampling method and schedule type are left as they were."
    try:
        fields["scheduler"] = resolve_sampler(sampler, schedule or "Automatic")[1]
    except ValueError as err:
        # A1111 allows pairs we refuse (DDIM with Karras: it ignores the schedule type there).
        fields["scheduler"] = implied
        return f"Schedule type not applied: {err}. Using {implied} with {fields['sampler_name']}."
    return None
