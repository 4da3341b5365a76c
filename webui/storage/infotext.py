"""A1111 infotext: the `parameters` text that stable-diffusion-webui puts in its PNGs.

Layout (a format other tools read):
    <prompt, may span lines>
    Negative prompt: <negative prompt>          (omitted when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ..., Model: ...
A value holding ',', ':' or a newline is written JSON-quoted. A parser treats the last line as
parameters only when it holds at least 3 `Key: value` pairs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import astuple
from typing import Any

from packaging.version import InvalidVersion, Version

from webui.controlnet import controlnet_fields
from webui.engine.samplers import BETA_ALPHA, BETA_BETA, NOISE_SCHEDULES, UNIPC_VARIANTS, UniPCOptions
from webui.engine.soft_inpainting import DEFAULTS as SOFT_DEFAULTS, ENABLED_KEY as SOFT_INPAINTING_ENABLED
from webui.engine.soft_inpainting import SOFT_INPAINTING_FIELDS, SOFT_INPAINTING_KEYS
from webui.engine.step_options import DEFAULTS as STEP_DEFAULTS
from webui.schemas import HIRES_REFINER_PASSES, canonical_randn_source
from webui.schemas import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, SAME_CHECKPOINT, a1111_seed_resize, known_restorer

NEGATIVE_PREFIX = "Negative prompt:"
# Real infotexts are a few KiB. Longer text (a 178-byte compressed PNG chunk can inflate to 60 KB)
# is cut to this many characters, so no reader spends unbounded work on it.
MAX_INFOTEXT_CHARS = 64 * 1024
# A `Key: value` pair is read in two steps so that parsing stays linear in the line's length.
# The key is a run of key characters that must end at a colon (greedy: ':' is not a key character).
_KEY = re.compile(r"\s*(\w[\w \-/+()]*)")
_SPACES = re.compile(r"\s*")
# The value is a JSON string followed by a comma or the end, or else everything up to the next comma.
_VALUE = re.compile(r'\s*("(?:\\.|[^\\"])*"(?=,|$)|[^,]*),?')

def _flag(value: str) -> bool:
    """A True or False as A1111 writes them (any case); ValueError for anything else, which a paste then skips."""
    word = value.strip().lower()
    if word not in ("true", "false"):
        raise ValueError(f"{value.strip()[:20]!r} is neither True nor False")
    return word == "true"


def _one_of(choices: tuple[str, ...]):
    """A value that must be one of A1111's choices (Hires refiner's passes, Noise Schedule's); ValueError for another,
    which a paste then skips."""
    def read(value: str) -> str:
        if value.strip() not in choices:
            raise ValueError(f"{value.strip()[:20]!r} is none of {', '.join(choices)}")
        return value.strip()
    return read


# Infotext key -> GenerationRequest field, for the keys that map one to one ("model_hash" is no request
# field: it finds the model when its name does not).
_REQUEST_FIELDS = {
    "Model hash": ("model_hash", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Denoising strength": ("denoising_strength", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires checkpoint": ("hr_checkpoint_name", str),  # its title, "name [short hash]", as the refiner's
    "Clip skip": ("clip_skip", int),
    "Clip skip SDXL": ("sdxl_clip_l_skip", _flag),
    "Img2img exact steps": ("img2img_fix_steps", _flag),
    "Old prompt editing timelines": ("use_old_scheduling", _flag),
    "Refiner switch by sampling steps": ("refiner_switch_by_sample_steps", _flag),
    "Batch size": ("batch_size", int),
    "Model": ("model", str),
    "X Type": ("x_type", str), "X Values": ("x_values", str),
    "Y Type": ("y_type", str), "Y Values": ("y_values", str),
    "Z Type": ("z_type", str), "Z Values": ("z_values", str),
    # the seeds a plot picked for its -1s: pasted instead of the -1s, so the grid is made again
    "Fixed X Values": ("x_values", str), "Fixed Y Values": ("y_values", str), "Fixed Z Values": ("z_values", str),
    "VAE": ("sd_vae", str),
    "Tiling": ("tiling", _flag),
    "Face restoration": ("face_restoration_model", known_restorer),  # and restore_faces: the key is there
    "Color correction": ("color_correction", _flag),
    "Refiner": ("refiner_checkpoint", str),  # its title, "name [short hash]", which finds it as a model name does
    "Refiner switch at": ("refiner_switch_at", float),
    "Hires refiner": ("hires_fix_refiner_pass", _one_of(HIRES_REFINER_PASSES)),
    "Skip Early CFG": ("skip_early_cond", float),
    "NGMS": ("s_min_uncond", float),
    "NGMS all steps": ("s_min_uncond_all", _flag),
    "SGM noise multiplier": ("sgm_noise_multiplier", _flag),
    "Discard penultimate sigma": ("always_discard_next_to_last_sigma", _flag),
    "Noise Schedule": ("sd_noise_schedule", _one_of(NOISE_SCHEDULES)),
    "Downcast alphas_cumprod": ("use_downcasted_alpha_bar", _flag),
    "Noise multiplier": ("initial_noise_multiplier", float),
    "Image CFG scale": ("image_cfg_scale", float),
    "Conditional mask weight": ("inpainting_mask_weight", float),
    "Emphasis": ("emphasis", str),
    "RNG": ("randn_source", canonical_randn_source),
    "Extra noise": ("img2img_extra_noise", float),
    "Eta DDIM": ("eta_ddim", float),
    "Eta": ("eta_ancestral", float),
    "Sigma churn": ("s_churn", float),
    "Sigma tmin": ("s_tmin", float),
    "Sigma tmax": ("s_tmax", float),
    "Sigma noise": ("s_noise", float),
    "ENSD": ("eta_noise_seed_delta", int),
    "Beta schedule alpha": ("beta_dist_alpha", float),
    "Beta schedule beta": ("beta_dist_beta", float),
    "Schedule min sigma": ("sigma_min", float),
    "Schedule max sigma": ("sigma_max", float),
    "Schedule rho": ("rho", float),
    "UniPC variant": ("uni_pc_variant", _one_of(UNIPC_VARIANTS)),  # not A1111's vary_coeff: no such variant here
    "UniPC order": ("uni_pc_order", int),
    "UniPC lower order final": ("uni_pc_lower_order_final", _flag),
    "Token merging ratio": ("token_merging_ratio", float),
    "Token merging ratio hr": ("token_merging_ratio_hr", float),
}

PROGRAM = "diffusers-webui"  # how our infotexts' Version begins
# A1111's UniPC settings, by request field: written where UniPC ran and they are not these defaults
UNIPC_INFOTEXT_KEYS = {"uni_pc_variant": "UniPC variant", "uni_pc_order": "UniPC order",
                       "uni_pc_lower_order_final": "UniPC lower order final"}
UNIPC_DEFAULTS = dict(zip(UNIPC_INFOTEXT_KEYS, astuple(UniPCOptions())))

# The Settings tab's options an infotext records (A1111's settings with an infotext label), by request field: a paste
# offers those that differ from the Settings tab's in the page's Override settings, for the page's runs only.
SETTING_KEYS = {"emphasis": "Emphasis", "face_restoration_model": "Face restoration",
                "inpainting_mask_weight": "Conditional mask weight", "sdxl_clip_l_skip": "Clip skip SDXL",
                "img2img_fix_steps": "Img2img exact steps", "hires_fix_refiner_pass": "Hires refiner",
                "use_old_scheduling": "Old prompt editing timelines",
                "refiner_switch_by_sample_steps": "Refiner switch by sampling steps"}

def quote(value: Any) -> str:
    # A float in full (7.1234567 reads back as itself), without ".0" for whole numbers ("CFG scale: 7").
    text = (str(int(value)) if value.is_integer() else repr(value)) if isinstance(value, float) else str(value)
    if any(ch in text for ch in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Join prompt, negative prompt and parameters; params with value None are left out. The whole text is
    stripped, as A1111's create_infotext does: an empty prompt leaves no empty first line."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines).strip()


def with_params(infotext: str, params: dict[str, Any]) -> str:
    """The infotext with more parameters at the end of its parameters line (a script's, on its grid)."""
    if not params:
        return infotext
    return infotext + ", " + ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)


def parse_infotext(text: str, backcompat: bool = True) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, {key: value as text}), with the keys an older A1111's Version
    implies (backcompat; as A1111's parse_generation_parameters; off: the text's own keys alone)."""
    # Windows line ends (a text copied from a .txt file or a Windows clipboard) are line ends, not prompt text
    lines = text[:MAX_INFOTEXT_CHARS].replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    params: dict[str, str] = {}
    if lines:
        pairs = _parse_pairs(lines[-1])
        if len(pairs) >= 3:
            params = pairs
            lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines).strip()
    return prompt, "\n".join(negative_lines).strip(), params | (_backcompat(prompt, params) if backcompat else {})


def a1111_version(text: str) -> Version | None:
    """The A1111 version an infotext's Version names ("v1.5.1", "v1.7.0-RC-58-gabc": 1.7.0rc0), read as A1111 reads
    it; None for another program's (ours, Forge's "f2.0.1v1.10.1-...") or none."""
    if not text or text.startswith(PROGRAM):
        return None
    match = re.match(r"([^-]+-[^-]+)-.*", text)
    try:
        return Version(match.group(1) if match else text)
    except InvalidVersion:
        return None


def _backcompat(prompt: str, params: dict[str, str]) -> dict[str, str]:
    """A1111's Automatic backward compatibility: the keys an older A1111 did not write because it behaved so
    without any option (its infotext_versions.backcompat): old prompt editing timelines before 1.6.0 (for a
    prompt with brackets), alpha bars downcast to fp16 before 1.7.0's dev build 225, and the refiner switched by
    sampling steps before 1.8.0. Keys written win."""
    version = a1111_version(params.get("Version", ""))
    implied = {}
    if version is not None and version < Version("1.6.0") and "[" in prompt:
        implied["Old prompt editing timelines"] = "True"
    if version is not None and version < Version("1.7.0-225"):
        implied["Downcast alphas_cumprod"] = "True"
    if version is not None and version < Version("1.8.0") and "Refiner" in params:
        implied["Refiner switch by sampling steps"] = "True"
    return {key: value for key, value in implied.items() if key not in params}


def setting_pair(name: str, value: Any) -> str:
    """One of the page's Override settings: a SETTING_KEYS field as its infotext pair ("Emphasis: No norm")."""
    return f"{SETTING_KEYS[name]}: {quote(value)}"


def setting_fields(pairs: list[str]) -> dict[str, Any]:
    """The request fields of the page's Override settings, each pair read as a paste reads its infotext key.
    ValueError, saying which pair, for one that is no such setting or whose value does not read."""
    fields, names = {}, {key: name for name, key in SETTING_KEYS.items()}
    for pair in pairs:
        parsed = _parse_pairs(pair)
        key = next(iter(parsed), "")
        if len(parsed) != 1 or key not in names:
            raise ValueError(f"{pair[:60]!r} is none of the settings a pasted infotext sets here "
                             f"({', '.join(SETTING_KEYS.values())}); remove it")
        name, convert = _REQUEST_FIELDS[key]
        try:
            fields[name] = convert(parsed[key])
        except ValueError as err:
            raise ValueError(f"{pair[:60]!r} does not read: {err}; remove it") from None
    return fields


def _parse_pairs(line: str) -> dict[str, str]:
    """The `Key: value` pairs of a line; text between them that is no pair is skipped.

    Linear time: a key that fails is skipped whole, since every start inside the same run of key
    characters reaches the same non-colon (a regex findall would rescan the run from each start).
    """
    pairs, pos = {}, 0
    while pos < len(line):
        key = _KEY.match(line, pos)
        if key is None:  # no word character after the spaces here: try just past it
            pos = _SPACES.match(line, pos).end() + 1
        elif not line.startswith(":", key.end()):
            pos = key.end()
        else:
            value = _VALUE.match(line, key.end() + 1)
            pairs[key.group(1).strip()] = _unquote(value.group(1).strip())
            pos = value.end()
    return pairs


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # keep the text as written: a half-quoted value is still useful to show
    return value


def request_fields_from_infotext(text: str) -> dict[str, Any]:
    """Turn an infotext (ours or stable-diffusion-webui's) into GenerationRequest fields.

    Keys we don't know are left out; values that don't convert are skipped rather than failing,
    since a PNG from another tool may carry keys in formats we never wrote.
    """
    prompt, negative, params = parse_infotext(text)
    # The Settings-tab options the text itself records (the page offers only these as Override settings, as A1111;
    # those of ours it leaves out are filled in below for the API's paste, and are no record)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative,
                              "recorded_settings": [name for name, key in SETTING_KEYS.items() if key in params]}
    if params:
        # "Clip skip: 1" and "Batch size: 1" are left out when written (as A1111 does), so a parameters line
        # without them means 1; A1111's paste resets the Clip skip slider the same way. A single image sent
        # to a page set to batch 4 would otherwise be made again inside a batch, a few pixel values off.
        fields["clip_skip"] = fields["batch_size"] = 1
        fields["tiling"] = fields["color_correction"] = False
        fields["restore_faces"] = "Face restoration" in params
        # Left out when off: a picture made without them is made again without them.
        fields["skip_early_cond"] = fields["s_min_uncond"] = 0.0
        fields["s_min_uncond_all"] = fields["sgm_noise_multiplier"] = False
        fields["always_discard_next_to_last_sigma"] = False  # (DPM2 discards without it)
        fields["sd_noise_schedule"] = "Default"
        # the old Karras range is written as Schedule min and max sigma: pasted, they give it whatever this says
        fields["use_downcasted_alpha_bar"] = fields["use_old_karras_scheduler_sigmas"] = False
        fields["initial_noise_multiplier"] = 1.0
        fields["img2img_extra_noise"] = 0.0
        fields |= STEP_DEFAULTS | {"eta_noise_seed_delta": 0}
        # Written with the Beta schedule only: without them, its defaults (a paste never keeps a stale shape)
        fields["beta_dist_alpha"], fields["beta_dist_beta"] = BETA_ALPHA, BETA_BETA
        fields["sigma_min"] = fields["sigma_max"] = fields["rho"] = 0.0  # likewise left out when the model's own
        fields |= UNIPC_DEFAULTS  # likewise UniPC's settings
        fields["refiner_checkpoint"] = ""  # A1111 leaves the key out without a refiner: none was used
        # A1111 leaves RNG out for its GPU source (NV here); ours wrote none before it was there, from the CPU
        ours = params.get("Version", "").startswith(PROGRAM)
        fields["randn_source"] = "CPU" if ours else "NV"
        if ours:  # we write these only when on: without them, a picture of ours was made with them off
            fields["sdxl_clip_l_skip"] = fields["img2img_fix_steps"] = False
        fields["seed_resize_from_w"] = fields["seed_resize_from_h"] = 0
        fields["subseed_strength"] = 0.0  # likewise left out at 0: a pasted image without one had no variation
        fields["token_merging_ratio"] = fields["token_merging_ratio_hr"] = 0.0  # likewise: made without merging
        # Left out where the first pass's: A1111's paste empties them, so an old hires prompt never lingers.
        fields["hr_prompt"] = fields["hr_negative_prompt"] = ""
        fields["hr_checkpoint_name"] = SAME_CHECKPOINT  # likewise A1111's paste, in its words
        # The script that made it (A1111's X/Y/Z plot on its grids); none named is none, as A1111's paste reads it.
        fields["script"] = params.get("Script", "")
    for key, (name, convert) in _REQUEST_FIELDS.items():
        if key in params:
            try:
                fields[name] = convert(params[key])
            except ValueError:
                continue
    size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", params.get("Size", ""))
    if size:
        fields["width"], fields["height"] = int(size.group(1)), int(size.group(2))
    seed_resize = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", params.get("Seed resize from", ""))
    if seed_resize:
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = a1111_seed_resize(*map(int, seed_resize.groups()))
    resize = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", params.get("Hires resize", ""))
    if resize:
        fields["hr_resize_x"], fields["hr_resize_y"] = int(resize.group(1)), int(resize.group(2))
    if params:  # a parameters line with a Hires key made its picture with the hires fix, as A1111 reads it
        fields["enable_hr"] = any(key.startswith("Hires ") for key in params)
    if fields.get("enable_hr"):  # left out when written at 0 (by the scale; as many steps as the first pass)
        for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
            fields.setdefault(name, 0)
    return fields | _inpainting_fields(params) | _soft_inpainting_fields(params) | controlnet_fields(params)


# Inpainting's keys, each left out where it is the default (a blur of 0 included), as A1111 writes them.
_INPAINTING_KEYS = ("Mask blur", "Mask mode", "Masked content", "Inpaint area", "Masked area padding")


def _inpainting_fields(params: dict[str, str]) -> dict[str, Any]:
    """The inpainting fields of a parameters line with an inpainting key (made by inpainting); the defaults
    for the keys it leaves out, as A1111's paste reads them."""
    if not any(key in params for key in _INPAINTING_KEYS):
        return {}
    fields = {"mask_blur": 0, "inpainting_mask_invert": 0, "inpainting_fill": 1, "inpaint_full_res": False,
              "inpaint_full_res_padding": 32}
    choices = (("Mask mode", "inpainting_mask_invert", MASK_MODES), ("Masked content", "inpainting_fill", MASKED_CONTENT),
               ("Inpaint area", "inpaint_full_res", INPAINT_AREAS))
    for key, name, names in choices:
        if params.get(key) in names:
            fields[name] = names.index(params[key])
    fields["inpaint_full_res"] = bool(fields["inpaint_full_res"])
    for key, name in (("Mask blur", "mask_blur"), ("Masked area padding", "inpaint_full_res_padding")):
        if params.get(key, "").strip().isdigit():
            fields[name] = int(params[key])
    return fields


def _soft_inpainting_fields(params: dict[str, str]) -> dict[str, Any]:
    """Soft inpainting's fields: on with its numbers (A1111's defaults for those left out or unreadable) where the
    parameters line says it was on; off for any other parameters line, since its picture was made without it."""
    if not params:
        return {}
    if params.get(SOFT_INPAINTING_ENABLED, "").strip().lower() != "true":
        return {"soft_inpainting": False}
    fields: dict[str, Any] = {"soft_inpainting": True}
    for key, name, default in zip(SOFT_INPAINTING_KEYS, SOFT_INPAINTING_FIELDS, SOFT_DEFAULTS):
        try:
            value = float(params[key])
        except (KeyError, ValueError):
            value = default
        fields[name] = value if math.isfinite(value) else default
    return fields
