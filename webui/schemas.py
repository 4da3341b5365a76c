"""Typed requests and results shared by the UI, the API, the worker and the engine.

GenerationRequest is validated once, at the edge, with messages that say what to fix. Field names
follow stable-diffusion-webui's API (prompt, sampler_name, cfg_scale, n_iter, ...) so one model
serves both the REST API and the UI.
"""
from __future__ import annotations

import enum
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from webui.controlnet import (CANNY_HIGH, CANNY_LOW, CN_MODULES, CN_PROCESSOR_RES,
                              controlnet_problem)
from webui.engine.hires import HIRES_UPSCALERS, MAX_SCHEDULE, hires_size, schedule_steps
from webui.engine.prompts import EMPHASIS_MODES
from webui.engine.samplers import (BETA_ALPHA, BETA_BETA, ENDS_SCHEDULES, MAX_UNIPC_ORDER, NOISE_SCHEDULES,
                                  UNIPC_VARIANTS, ScheduleShape, UniPCOptions, discard_lays_out, get_sampler,
                                  resolve_sampler)
from webui.engine.step_options import LIMITS as STEP_LIMITS
from webui.engine.uncond_skip import MAX_NGMS
from webui.engine.token_merging import MAX_RATIO as MAX_MERGING_RATIO
from webui.sd_upscale import DEFAULT_UPSCALER, MAX_OVERLAP, MAX_SCALE, MIN_SCALE, UPSCALERS as SD_UPSCALERS

MAX_PROMPT_CHARS = 2000
MIN_SIZE, MAX_SIZE = 64, 2048
# torch's seeds, as A1111's (and ComfyUI's: 2**64 - 1); seeds picked at random stay below 2**32, as A1111's do
MAX_SEED = 2**64 - 1
RANDOM_SEEDS = 2**32 - 1


def random_seed() -> int:
    """A seed for -1: below 2**32, as A1111 picks them (short to type; the same on every random number source)."""
    return random.randint(0, RANDOM_SEEDS)


def seed_after(seed: int, count: int) -> int:
    """The seed `count` places after `seed` (image i of a batch: seed + i), past MAX_SEED starting again at 0."""
    return (seed + count) % (MAX_SEED + 1)
MAX_UPSCALER_NAME = 200  # a model upscaler is named by its file name
MAX_CLIP_SKIP = 12  # the layers of SD 1.x's text encoder; A1111's slider stops there too
# img2img's ways to fit the init image to the run's size, by A1111's numbers.
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
LATENT_RESIZE = 3
# Inpainting's choices, by A1111's numbers: inpainting_fill, inpainting_mask_invert, inpaint_full_res.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")
# Restore faces (webui/engine/face_restoration.py): A1111's face restorers, in its order, and its defaults
FACE_RESTORERS = ("CodeFormer", "GFPGAN")
DEFAULT_FACE_RESTORER = "CodeFormer"
DEFAULT_CODEFORMER_WEIGHT = 0.5  # 0 changes a face most, 1 least


def known_restorer(name: str) -> str:
    """A1111's name of a face restorer, whatever its case; ValueError listing them for any other."""
    known = {restorer.lower(): restorer for restorer in FACE_RESTORERS}.get((name or "").strip().lower())
    if known is None:
        raise ValueError(f"{(name or '')[:40]!r} is no face restorer; use one of {', '.join(FACE_RESTORERS)}")
    return known
MAX_MASK_BLUR, MAX_MASK_PADDING = 64, 256
_SHA1 = r"^[0-9a-f]{40}$"
# The infotext keys a script run through several jobs may add to its pictures' (A1111's Loopback's).
SCRIPT_INFOTEXT_KEYS = ("Final denoising strength", "Denoising curve")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The hires fix's checkpoint when it is the first pass's (A1111's words, which its API and paste send too).
SAME_CHECKPOINT = "Use same checkpoint"


MAX_SCHEDULE_SIGMA = 10000.0  # Schedule min/max sigma: a zero-terminal-SNR model's largest is 4096
MAX_SCHEDULE_RHO = 100.0
RANDN_SOURCES = ("CPU", "NV")  # A1111's Random number generator source; its GPU is NV here (webui/engine/philox.py)
RandnSource = Literal[RANDN_SOURCES]


def canonical_randn_source(value: Any) -> Any:
    """A random number source as written ("cpu", "GPU", ...) -> one of RANDN_SOURCES; A1111's GPU (an NVIDIA
    card's numbers) is NV. Anything else is left for the field's check to refuse."""
    if isinstance(value, str) and value.strip().upper() in (*RANDN_SOURCES, "GPU"):
        return "NV" if value.strip().upper() == "GPU" else value.strip().upper()
    return value


# A1111's settings that save more than the pictures: copies before a step, the mask, the start picture
SAVE_SETTINGS = ("save_images_before_highres_fix", "save_images_before_face_restoration",
                 "save_images_before_color_correction", "save_mask", "save_mask_composite", "save_init_img",
                 "save_incomplete_images")
COLOR_PATTERN = r"^#[0-9a-fA-F]{6}$"  # a colour as A1111's colour pickers give it
DEFAULT_BACKGROUND = "#ffffff"
# A1111's "Hires fix: which pass to enable refiner for"
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")
HiresRefinerPass = Literal[HIRES_REFINER_PASSES]
# The request fields that, left None, take the Settings tab's value of the same name (webui/storage/options.py) when
# the worker accepts the request
SETTINGS_FIELDS = ("emphasis", "randn_source", "face_restoration_model", "code_former_weight", "inpainting_mask_weight",
                   "sdxl_clip_l_skip", "img2img_fix_steps", "hires_fix_refiner_pass", "overlay_inpaint",
                   "upscaler_for_img2img", "comma_padding_backtrack", "img2img_background_color", "use_old_scheduling",
                   "refiner_switch_by_sample_steps", *SAVE_SETTINGS)


class GenerationRequest(BaseModel):
    """One txt2img request: everything needed to reproduce its images."""

    # extra: A1111 clients send fields we don't use. allow_inf_nan: JSON's NaN is no CFG scale.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to avoid")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="variation seed; -1 picks a random one")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="variation strength: how far the starting "
                                                                     "noise moves towards the variation seed's")
    seed_resize_from_w: int = Field(0, ge=0, le=MAX_SIZE, description="resize seed from width: the seed's noise "
                                    "drawn at this size and put in the middle, to keep a picture's composition at "
                                    "another size (0: off; give the height too)")
    seed_resize_from_h: int = Field(0, ge=0, le=MAX_SIZE, description="resize seed from height (0: off)")
    sampler_name: str = Field("Euler a", description="e.g. 'Euler a', 'DPM++ 2M', or 'DPM++ 2M Karras'")
    scheduler: str = Field("Automatic", description="schedule type: Automatic, Karras, Exponential, SGM Uniform")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0)
    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, description="None uses the model's native size")
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, description="None uses the model's native size")
    batch_size: int = Field(1, ge=1, le=8, description="images made together in one pass")
    n_iter: int = Field(1, ge=1, le=100, description="batch count: passes made one after another")
    clip_skip: int = Field(1, ge=1, le=MAX_CLIP_SKIP)
    sdxl_clip_l_skip: bool | None = Field(None, description="an SDXL model: Clip skip read by its first text encoder "
                                          "(CLIP-L), as A1111's Clip skip SDXL setting; else SDXL ignores Clip skip "
                                          "(None: the Settings tab's)")
    # img2img: the worker sets init_image (its pixels' sha1) when it is given the picture to start from.
    init_image: str | None = Field(None, pattern=_SHA1,
                                   description="img2img: the sha1 of the init image's pixels (set by the server)")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description="img2img: how much of the init image is "
                                                                         "noised away (1 keeps none of it)")
    resize_mode: int = Field(0, ge=0, le=len(RESIZE_MODES) - 1,
                             description="img2img: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just "
                                         "resize the picture's latents")
    # Inpainting (img2img with a mask): the worker sets mask (its pixels' sha1) when it is given one.
    mask: str | None = Field(None, pattern=_SHA1, description="inpainting: the sha1 of the mask's pixels, white "
                                                              "where to draw again (set by the server)")
    mask_blur: int = Field(4, ge=0, le=MAX_MASK_BLUR, description="inpainting: how far the mask's edge is blurred, "
                                                                  "in pixels")
    inpainting_fill: int = Field(1, ge=0, le=len(MASKED_CONTENT) - 1,
                                 description="inpainting: what the masked part starts from: 0 fill (the colours "
                                             "around it), 1 original, 2 latent noise, 3 latent nothing")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="inpainting: 0 draws the masked part again, "
                                                                   "1 the part outside it")
    inpaint_full_res: bool = Field(False, description="inpainting: draw only the masked part (with padding) at the "
                                                      "run's size, and paste it back (A1111's Only masked)")
    inpaint_full_res_padding: int = Field(32, ge=0, le=MAX_MASK_PADDING,
                                          description="inpainting, Only masked: pixels around the mask drawn too")
    # A1111's Soft inpainting (webui/engine/soft_inpainting.py): the blurred mask as a per-pixel strength; only with a
    # mask. Its defaults and ranges are A1111's sliders'.
    soft_inpainting: bool = Field(False, description="inpainting: A1111's Soft inpainting, which blends the picture "
                                  "and the new content by the blurred mask's shades (a high Mask blur helps)")
    soft_inpainting_schedule_bias: float = Field(1.0, ge=0.0, le=8.0, description="soft inpainting: when the "
                                                 "picture is kept during denoising (below 1: more near the end)")
    soft_inpainting_preservation_strength: float = Field(0.5, ge=0.0, le=8.0, description="soft inpainting: how "
                                                         "strongly partly masked content is kept")
    soft_inpainting_transition_contrast_boost: float = Field(4.0, ge=1.0, le=32.0, description="soft inpainting: "
                                                             "restores the contrast partly masked parts lose")
    soft_inpainting_mask_influence: float = Field(0.0, ge=0.0, le=1.0, description="soft inpainting: how far the "
                                                  "mask biases the difference threshold")
    soft_inpainting_difference_threshold: float = Field(0.5, ge=0.0, le=8.0, description="soft inpainting: how "
                                                        "much a part may change and still get the picture's pixels")
    soft_inpainting_difference_contrast: float = Field(2.0, ge=0.0, le=8.0, description="soft inpainting: how "
                                                       "sharp the change from picture to new pixels is")
    # Hires fix (txt2img): a second, img2img-like pass at a larger size, denoising_strength deep.
    enable_hr: bool = Field(False, description="hires fix: enlarge the picture and denoise it again")
    hr_scale: float = Field(2.0, ge=1.0, le=4.0, description="hires fix: how many times larger")
    hr_upscaler: str = Field("Latent", max_length=MAX_UPSCALER_NAME,
                             description=f"hires fix: one of {', '.join(HIRES_UPSCALERS)}, or a model upscaler's "
                                         "name (GET /sdapi/v1/upscalers)")
    hr_second_pass_steps: int = Field(0, ge=0, le=150, description="hires fix: steps of the second pass; 0 = steps")
    hr_sampler_name: str | None = Field(None, description="hires fix: the second pass's sampler (None: the first's)")
    hr_scheduler: str | None = Field(None, description="hires fix: the second pass's schedule type (None: the "
                                                       "first's, with the first's sampler; else Automatic)")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE, description="hires fix: width to enlarge to instead of the scale")
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE, description="hires fix: height to enlarge to instead of the scale")
    hr_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                  description="hires fix: the second pass's prompt (None or empty: the prompt). Its "
                                              "<lora:...> tags, if any, must be the prompt's: one set serves both")
    hr_negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                           description="hires fix: the second pass's negative prompt (None or empty: "
                                                       "the negative prompt)")
    hr_checkpoint_name: str | None = Field(None, max_length=300, description="hires fix: the checkpoint of the second "
                                           f"pass (None, '' or '{SAME_CHECKPOINT}': the first pass's)")
    # SD upscale (img2img): the picture enlarged, then drawn again in overlapping tiles of width x height.
    sd_upscale: bool = Field(False, description="img2img: A1111's SD upscale script; one picture per batch count")
    sd_upscale_overlap: int = Field(64, ge=0, le=MAX_OVERLAP, description="SD upscale: pixels neighbouring tiles "
                                                                          "share, at least")
    sd_upscale_scale: float = Field(2.0, ge=MIN_SCALE, le=MAX_SCALE, description="SD upscale: how many times larger")
    sd_upscale_upscaler: str = Field(DEFAULT_UPSCALER, min_length=1, max_length=MAX_UPSCALER_NAME,
                                     description=f"SD upscale: one of {', '.join(SD_UPSCALERS)}, or a model "
                                                 "upscaler's name (GET /sdapi/v1/upscalers)")
    tiling: bool = Field(False, description="pictures that tile seamlessly: right edge into left, bottom into top")
    restore_faces: bool = Field(False, description="draw each face found again with a face restorer (A1111's "
                                "Restore faces)")
    face_restoration_model: str | None = Field(None, description=f"the face restorer, {' or '.join(FACE_RESTORERS)} "
                                               "(None: the Settings tab's)")
    code_former_weight: float | None = Field(None, ge=0.0, le=1.0, description="CodeFormer's weight, 0 to 1: 0 changes "
                                             "the face most, 1 least (None: the Settings tab's)")
    inpainting_mask_weight: float | None = Field(None, ge=0.0, le=1.0, description="a model made for inpainting: how "
                                                 "far the picture it is given is greyed out where it is drawn again, "
                                                 "0 to 1 (below 1 it keeps more of the start picture; img2img, "
                                                 "inpainting and the hires pass; None: the Settings tab's)")
    color_correction: bool = Field(False, description="img2img: each result's colours matched to those of the picture "
                                                      "it started from, its lightness kept (A1111's setting)")
    # A1111's sampler options that leave the negative prompt out of some model calls (webui/engine/uncond_skip.py).
    s_min_uncond: float = Field(0.0, ge=0.0, le=MAX_NGMS, description="NGMS (Negative Guidance minimum sigma): below "
                                "this noise level every other model call leaves the negative prompt out, which is "
                                "faster (0: off; A1111's s_min_uncond)")
    sgm_noise_multiplier: bool = Field(False, description="A1111's SGM noise multiplier: txt2img on a k-diffusion "
                                       "sampler starts from noise of sqrt(1 + sigma0²), as the SGM code, not sigma0")
    s_min_uncond_all: bool = Field(False, description="NGMS leaves the negative prompt out of every call below its "
                                                      "sigma, not every other one")
    skip_early_cond: float = Field(0.0, ge=0.0, le=1.0, description="Skip Early CFG: the part of the steps, from the "
                                   "start, run without the negative prompt (0: none; A1111's skip_early_cond)")
    initial_noise_multiplier: float = Field(1.0, ge=0.0, le=1.5, description="img2img: the noise the picture is "
                                            "noised with, times this (A1111's Noise multiplier for img2img; 1: as is)")
    image_cfg_scale: float = Field(1.5, ge=0.0, le=3.0, description="img2img with an instruct-pix2pix model: how "
                                   "closely the result keeps to the start picture (A1111's Image CFG Scale; 1: plain "
                                   "CFG; other models ignore it)")
    img2img_extra_noise: float = Field(0.0, ge=0.0, le=1.0, description="img2img and the hires fix: that much more "
                                       "of the start noise added (A1111's Extra noise; 0: none)")
    emphasis: str | None = Field(None, description="how (word:1.2) weights are read: Original (A1111's default), No "
                                 "norm, Ignore or None, A1111's Emphasis mode (None: as the Settings tab says)")
    comma_padding_backtrack: int | None = Field(None, ge=0, le=74, description="a 75-token chunk that fills up at "
                                                "most this many tokens after its last comma ends at that comma (A1111's "
                                                "Prompt word wrap length limit; 0: never). None: the Settings tab's")
    prompt_comments: bool | None = Field(None, description="leave out of the prompts what follows a # on its line "
                                         "(None: as the Settings tab's Enable comments says)")
    # A1111's step options (webui/engine/step_options.py: which samplers follow each) and its Eta noise seed delta.
    eta_ddim: float = Field(0.0, ge=0.0, le=STEP_LIMITS["eta_ddim"], description="DDIM: how much fresh noise each step "
                            "adds (0: deterministic; A1111's Eta for DDIM)")
    eta_ancestral: float = Field(1.0, ge=0.0, le=STEP_LIMITS["eta_ancestral"], description="Euler a, DPM2 a, DPM++ 2S a "
                                 "and the SDE samplers: how much of each step is fresh noise (0: none, Euler a a plain "
                                 "Euler; A1111's Eta for ancestral samplers)")
    s_churn: float = Field(0.0, ge=0.0, le=STEP_LIMITS["s_churn"], description="Euler: sigma churn, noise added before "
                           "each step to raise its noise level (0: none)")
    s_tmin: float = Field(0.0, ge=0.0, le=STEP_LIMITS["s_tmin"], description="Euler: the churn applies from this sigma")
    s_tmax: float = Field(0.0, ge=0.0, le=STEP_LIMITS["s_tmax"], description="Euler: the churn applies up to this sigma "
                          "(0: no limit)")
    s_noise: float = Field(1.0, ge=0.0, le=STEP_LIMITS["s_noise"], description="the noise Euler's churn, DPM2 a, DPM++ 2S a "
                           "and the SDE samplers add, times this (sigma noise)")
    eta_noise_seed_delta: int = Field(0, ge=0, le=MAX_SEED, description="the noise a sampler draws after the start "
                                      "noise comes from seed + this (A1111's ENSD; 0: the seed's own)")
    randn_source: RandnSource | None = Field(None, description="where the noise comes from (A1111's Random number "
                                             "generator source): CPU, torch's CPU generator; NV, the numbers an "
                                             "NVIDIA card draws (A1111's default GPU source, read as NV), on any "
                                             "device. None: the Settings tab's")
    # A1111's beta_dist_alpha and beta_dist_beta options: the shape of the Beta schedule type's spacing.
    beta_dist_alpha: float = Field(BETA_ALPHA, ge=0.01, le=1.0, description="Beta schedule: the beta distribution's "
                                   "alpha, 0.01 to 1 (lower: more steps at low noise)")
    beta_dist_beta: float = Field(BETA_BETA, ge=0.01, le=1.0, description="Beta schedule: the beta distribution's "
                                  "beta, 0.01 to 1 (lower: more steps at high noise)")
    # A1111's sigma_min, sigma_max and rho options: where Karras, Exponential, Polyexponential, KL Optimal and Beta
    # begin and end
    sigma_min: float = Field(0.0, ge=0.0, le=MAX_SCHEDULE_SIGMA, description="Schedule min sigma: the smallest noise "
                             "level of Karras, Exponential, Polyexponential, KL Optimal and Beta (0: the model's, "
                             "~0.03)")
    sigma_max: float = Field(0.0, ge=0.0, le=MAX_SCHEDULE_SIGMA, description="Schedule max sigma: their largest "
                             "(0: the model's, ~14.6)")
    rho: float = Field(0.0, ge=0.0, le=MAX_SCHEDULE_RHO, description="Schedule rho: how steeply Karras's and "
                       "Polyexponential's noise levels fall (0: their own 7 and 1; higher falls faster at first)")
    always_discard_next_to_last_sigma: bool = Field(False, description="A1111's Always discard next-to-last sigma: a "
                                                    "k-diffusion sampler runs a schedule of one step more, its "
                                                    "next-to-last noise level left out (DPM2, DPM2 a and DPM++ 3M "
                                                    "SDE always do)")
    sd_noise_schedule: Literal[NOISE_SCHEDULES] = Field("Default", description="A1111's Noise schedule for sampling: "
                                                        "Default (the model's), or Zero Terminal SNR (its noise levels "
                                                        "rescaled so that the first step starts from almost pure noise)")
    # Two of A1111's Compatibility options, for seeds made by its older versions
    use_old_karras_scheduler_sigmas: bool = Field(False, description="A1111's Use old karras scheduler sigmas: Karras, "
                                                  "(Poly)exponential, KL Optimal and Beta run from 10 down to 0.1 "
                                                  "(where "
                                                  "sigma_max and sigma_min leave them to the default), as its first "
                                                  "versions did")
    use_downcasted_alpha_bar: bool = Field(False, description="A1111's Downcast model alphas_cumprod to fp16 before "
                                           "sampling: the model's noise levels rounded as its versions before 1.8 "
                                           "kept them on an fp16 model, for their seeds")
    # A1111's UniPC settings (webui/engine/samplers.py UniPCOptions), read by the UniPC sampler alone
    uni_pc_variant: Literal[UNIPC_VARIANTS] = Field(UniPCOptions.variant, description="UniPC variant: bh1 or bh2 (A1111's "
                                                    "vary_coeff is not offered)")
    uni_pc_order: int = Field(UniPCOptions.order, ge=1, le=MAX_UNIPC_ORDER, description="UniPC order: how many past model outputs "
                              "each step reads, 1 to 50 (higher: smoother, less stable at few steps)")
    uni_pc_lower_order_final: bool = Field(UniPCOptions.lower_order_final, description="UniPC lower order final: the last steps read fewer "
                                           "past outputs (keeps runs of few steps stable)")
    # A1111's Token merging (webui/engine/token_merging.py), its settings here per request as every generation setting.
    token_merging_ratio: float = Field(0.0, ge=0.0, le=MAX_MERGING_RATIO, description="token merging: the part of the "
                                       "tokens merged away before self-attention at the full latent resolution; 0: off "
                                       "(A1111's token_merging_ratio, on img2img its token_merging_ratio_img2img)")
    token_merging_ratio_hr: float = Field(0.0, ge=0.0, le=MAX_MERGING_RATIO, description="hires fix: the token "
                                          "merging ratio of the second pass; 0: token_merging_ratio")
    # What a script run through several jobs (Loopback) writes into each picture's infotext, as A1111's
    # extra_generation_params; only the keys in SCRIPT_INFOTEXT_KEYS.
    script_params: dict[str, StrictStr | StrictFloat | StrictInt] = Field(default_factory=dict, description="infotext keys a script adds")
    # ControlNet (webui/engine/controlnet.py): one unit, as sd-webui-controlnet's. The worker sets controlnet_image
    # (its pixels' sha1) when it is given the control picture.
    controlnet_enabled: bool = Field(False, description="ControlNet: steer the picture by a control map")
    controlnet_image: str | None = Field(None, pattern=_SHA1, description="ControlNet: the sha1 of the control "
                                         "picture's pixels (set by the server)")
    controlnet_module: str = Field("none", description=f"ControlNet: the preprocessor, one of {', '.join(CN_MODULES)} "
                                   "(none: the picture is the control map)")
    controlnet_model: str | None = Field(None, max_length=MAX_UPSCALER_NAME,
                                         description="ControlNet: the model, 'name [hash]' as GET /controlnet/model_list "
                                                     "lists it, or its name")
    controlnet_weight: float = Field(1.0, ge=0.0, le=2.0, description="ControlNet: how strongly it steers")
    controlnet_guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="ControlNet: the part of the steps "
                                             "done before it starts")
    controlnet_guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="ControlNet: the part of the steps "
                                           "done when it stops")
    controlnet_resize_mode: int = Field(1, ge=0, le=2, description="ControlNet: how the map is fitted to the size: "
                                        "0 just resize, 1 crop and resize, 2 resize and fill")
    controlnet_processor_res: int = Field(CN_PROCESSOR_RES, ge=MIN_SIZE, le=MAX_SIZE,
                                          description="ControlNet: the preprocessor's resolution (the short side)")
    controlnet_threshold_a: float = Field(CANNY_LOW, ge=1, le=255, description="ControlNet canny: low threshold")
    controlnet_threshold_b: float = Field(CANNY_HIGH, ge=1, le=255, description="ControlNet canny: high threshold")
    controlnet_pixel_perfect: bool = Field(False, description="ControlNet: the preprocessor's resolution picked "
                                                              "from the size (the extension's Pixel Perfect)")
    styles: list[str] = Field(default_factory=list, max_length=20,
                              description="prompt styles (styles.csv) joined into the prompts before the run")
    model: str | None = Field(None, description="checkpoint name; None keeps the loaded model")
    sd_vae: str = Field("Automatic", max_length=300, description="the VAE: Automatic (a file named after the "
                        "model, else its own), None (the model's own), or a file of the VAE folder")
    # A1111's refiner: the rest of the denoising by another checkpoint, from where the run has come this far.
    refiner_checkpoint: str | None = Field(None, max_length=300, description="the refiner's checkpoint name (None, "
                                           "'' or 'None': no refiner)")
    refiner_switch_at: float = Field(0.8, description="refiner: the part of the denoising done when the refiner takes "
                                                      "over, by noise level (above 0, at most 1)")
    hires_fix_refiner_pass: HiresRefinerPass | None = Field(
        None, description="with the hires fix: the pass the refiner takes over in, 'first pass', 'second pass' or "
                          "'both passes' (None: the Settings tab's, 'second pass' by default, as A1111's)")
    # A1111's options of these names: the aesthetic score an SDXL refiner is conditioned on (other models ignore them)
    sdxl_refiner_high_aesthetic_score: float = Field(6.0, ge=0.0, le=10.0, description="an SDXL refiner: the "
                                                     "aesthetic score of the prompt's conditioning")
    sdxl_refiner_low_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0, description="an SDXL refiner: the aesthetic "
                                                    "score of the negative prompt's conditioning")
    restore_model: bool = Field(False, description="load the previous model again after this job "
                                                   "(A1111's override_settings_restore_afterwards)")
    keep_model: bool = Field(False, description="make this job's model the server's, for the requests that name "
                             "none and the next start (A1111's override_settings sd_model_checkpoint, not restored "
                             "afterwards)")
    img2img_fix_steps: bool | None = Field(None, description="img2img: run exactly `steps` steps, as the last of a "
                                           "schedule of steps / denoising_strength (A1111's 'With img2img, do exactly "
                                           "the amount of steps the slider specifies'; else steps x strength run). "
                                           "None: the Settings tab's")
    refiner_switch_by_sample_steps: bool | None = Field(None, description="A1111's Switch to refiner by sampling "
                                                        "steps instead of model timesteps: the refiner takes over "
                                                        "after that share of the pass's model calls, as A1111 before "
                                                        "1.8. None: the Settings tab's")
    use_old_scheduling: bool | None = Field(None, description="A1111's Use old prompt editing timelines: in "
                                            "[a:b:N], N below 1 is a fraction of the steps and any other a step "
                                            "number, and the hires fix's second pass reads on the first pass's clock "
                                            "(now: N with a decimal point is a fraction). None: the Settings tab's")
    upscaler_for_img2img: str | None = Field(None, max_length=200, description="img2img: the picture upscaler that "
                                             "enlarges the start picture (or inpainting's part drawn) where the run "
                                             "is larger (A1111's Upscaler for img2img; None or 'None': resampling "
                                             "alone). None: the Settings tab's")
    img2img_background_color: str | None = Field(None, pattern=COLOR_PATTERN, description="img2img: the colour a "
                                                 "transparent part of the start picture is laid on, #rrggbb (A1111's "
                                                 "'With img2img, fill transparent parts of the input image with this "
                                                 "color'). None: the Settings tab's")
    overlay_inpaint: bool | None = Field(None, description="inpainting: the result laid into the original through the "
                                         "mask (A1111's Overlay original for inpaint); False: the part drawn shows as "
                                         "the model drew it, edges and all. None: the Settings tab's")
    save_images: bool = True
    # A1111's settings "Save a copy of image before ..." (None: the Settings tab's)
    save_images_before_highres_fix: bool | None = Field(None, description="also save each picture as the first pass "
                                                        "left it, before the hires fix")
    save_images_before_face_restoration: bool | None = Field(None, description="also save each picture as it was "
                                                             "before Restore faces")
    save_images_before_color_correction: bool | None = Field(None, description="img2img: also save each picture as it "
                                                             "was before colour correction")
    save_mask: bool | None = Field(None, description="inpainting: also save the mask beside each picture")
    save_mask_composite: bool | None = Field(None, description="inpainting: also save each picture where the mask is, "
                                             "transparent elsewhere")
    save_init_img: bool | None = Field(None, description="img2img: also save the picture it starts from, once, in "
                                       "outputs/init-images, named by the md5 of its pixels")
    save_incomplete_images: bool | None = Field(None, description="also save the pictures an Interrupt or Skip cut "
                                                "short, as they stood")
    saving_options: dict[str, Any] = Field(default_factory=dict, description="the Settings tab's options of how "
                                           "outputs are written (samples_format, jpeg_quality, "
                                           "samples_filename_pattern, n_rows, return_grid, add_model_hash_to_info, "
                                           "...) this job sets for itself (A1111's override_settings)")
    send_images: bool = True

    @field_validator("saving_options")
    @classmethod
    def _saving_options_checked(cls, value: dict[str, Any]) -> dict[str, Any]:
        from webui.storage.options import SAVING_KEYS, SavedOptions  # (it reads this module's names)

        unknown = sorted(set(value) - set(SAVING_KEYS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of how outputs are written; use "
                             f"{', '.join(SAVING_KEYS)}")
        try:
            checked = SavedOptions(**value)
        except ValidationError as err:
            raise ValueError(describe_validation_errors(err.errors())) from None
        return checked.model_dump(include=set(value))

    @field_validator("randn_source", mode="before")
    @classmethod
    def _nv_for_gpu(cls, value: Any) -> Any:
        return canonical_randn_source(value)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None, info) -> int | None:
        if value is not None and value % 8:
            below = value - value % 8
            raise ValueError(f"must be a multiple of 8, got {value}; use {below} or {below + 8}")
        return value

    @field_validator("steps")
    @classmethod
    def _within_the_samplers_limit(cls, steps: int, info) -> int:
        try:  # sampler_name and scheduler come before steps, so they are in info.data when valid
            sampler = get_sampler(resolve_sampler(info.data["sampler_name"], info.data["scheduler"])[0])
        except (KeyError, ValueError):
            return steps  # the sampler's own check reports it
        if sampler.max_steps is not None and steps > sampler.max_steps:
            raise ValueError(f"{sampler.name} takes at most {sampler.max_steps} steps, got {steps}")
        return steps

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
    @classmethod
    def _no_control_characters(cls, text: str | None, info) -> str | None:
        # The infotext goes into a PNG text chunk, which cannot hold them (readers cut a NUL short).
        bad = _CONTROL_CHARACTER.search(text or "")
        if bad:
            raise ValueError(f"holds the control character U+{ord(bad.group()):04X} at "
                             f"position {bad.start()}; remove it (line breaks and tabs are fine)")
        return text

    @field_validator("hr_upscaler", mode="before")
    @classmethod
    def _known_upscaler(cls, name: Any) -> Any:
        if name in (None, ""):  # A1111's API: none named is its default, Latent
            return "Latent"
        if name == "None":  # A1111's "None": the picture resized plainly (with Lanczos)
            return "Lanczos"
        return name  # a model upscaler's name is checked against the server's files when the job is queued

    @field_validator("token_merging_ratio", "token_merging_ratio_hr", mode="before")
    @classmethod
    def _merging_ratio_in_range(cls, value: Any) -> Any:
        # Before the bounds' own check, whose "less than or equal to 0.9" does not say what the number is.
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            return value  # not a number: the type check says so
        except OverflowError:  # an integer beyond any float
            raise ValueError(f"must be from 0 (off) to {MAX_MERGING_RATIO}, got a number of {len(str(value))} digits")
        if not 0 <= ratio <= MAX_MERGING_RATIO:
            raise ValueError(f"must be from 0 (off) to {MAX_MERGING_RATIO}, got {ratio:g}")
        return value

    @field_validator("refiner_checkpoint")
    @classmethod
    def _no_refiner_is_none(cls, name: str | None) -> str | None:
        name = (name or "").strip()
        return None if name in ("", "None", "none") else name

    @field_validator("hr_checkpoint_name")
    @classmethod
    def _same_checkpoint_is_none(cls, name: str | None) -> str | None:
        name = (name or "").strip()
        return None if name in ("", SAME_CHECKPOINT) else name

    @field_validator("face_restoration_model")
    @classmethod
    def _known_face_restorer(cls, name: str | None) -> str | None:
        return None if name is None else known_restorer(name)

    @field_validator("emphasis")
    @classmethod
    def _known_emphasis(cls, mode: str | None) -> str | None:
        if mode is None:
            return None
        known = {name.lower(): name for name in EMPHASIS_MODES}.get(mode.strip().lower())
        if known is None:
            raise ValueError(f"{mode[:40]!r} is no emphasis mode; use one of {', '.join(EMPHASIS_MODES)}")
        return known

    @field_validator("refiner_switch_at")
    @classmethod
    def _switch_within_the_run(cls, fraction: float) -> float:
        if not 0 < fraction <= 1:
            raise ValueError(f"must be above 0 and at most 1 (the part of the denoising done before the refiner takes "
                             f"over; 0.8 is usual), got {fraction:g}")
        return fraction

    @field_validator("sd_vae")
    @classmethod
    def _vae_choice(cls, value: str) -> str:
        return vae_choice(value)

    @field_validator("script_params")
    @classmethod
    def _known_script_keys(cls, params: dict[str, str | float]) -> dict[str, str | float]:
        unknown = [key for key in params if key not in SCRIPT_INFOTEXT_KEYS]
        if unknown:
            raise ValueError(f"unknown keys {', '.join(map(repr, unknown))}; scripts write "
                             f"{', '.join(SCRIPT_INFOTEXT_KEYS)}")
        for key, value in params.items():  # a short word or a number: what an infotext value is
            if isinstance(value, str) and (len(value) > 100 or _CONTROL_CHARACTER.search(value) or "\n" in value):
                raise ValueError(f"{key}: a value of at most 100 characters on one line")
        return params

    @field_validator("seed_resize_from_w", "seed_resize_from_h")
    @classmethod
    def _seed_resize_multiple_of_8(cls, value: int) -> int:
        if value % 8:
            below = value - value % 8
            raise ValueError(f"must be a multiple of 8 (0: off), got {value}; use {below} or {below + 8}")
        return value

    @model_validator(mode="after")
    def _seed_resize_both_or_neither(self) -> "GenerationRequest":
        if bool(self.seed_resize_from_w) != bool(self.seed_resize_from_h):
            given, missing = (("seed_resize_from_w", "seed_resize_from_h") if self.seed_resize_from_w
                              else ("seed_resize_from_h", "seed_resize_from_w"))
            raise ValueError(f"{missing}: give it too, since {given} is set (or set both to 0 for no seed resize)")
        return self

    @model_validator(mode="after")
    def _sigma_range_in_order(self) -> "GenerationRequest":
        if self.sigma_min and self.sigma_max and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min: {self.sigma_min:g} is not below sigma_max {self.sigma_max:g}; lower it, or "
                             "set either to 0 for the model's own")
        return self

    @model_validator(mode="after")
    def _controlnet_runnable(self) -> "GenerationRequest":
        problem = self.uses_controlnet and controlnet_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def uses_controlnet(self) -> bool:
        return self.controlnet_enabled

    @model_validator(mode="after")
    def _sd_upscale_not_tiling(self) -> "GenerationRequest":
        if self.sd_upscale and self.tiling:  # each tile would wrap into itself, not the picture
            raise ValueError("tiling: SD upscale draws the picture in tiles, so it cannot make it tile seamlessly; "
                             "untick Tiling or SD upscale")
        return self

    @model_validator(mode="after")
    def _hires_prompts_only_where_they_differ(self) -> "GenerationRequest":
        # As A1111, an empty hires prompt is the prompt; kept only when it differs, so the infotext and the
        # history say a second prompt was used only when one was.
        # Blank is empty: an infotext cannot keep spaces alone, so they would not reproduce.
        if not self.enable_hr or self.hr_prompt == self.prompt or not (self.hr_prompt or "").strip():
            self.hr_prompt = None
        if (not self.enable_hr or self.hr_negative_prompt == self.negative_prompt
                or not (self.hr_negative_prompt or "").strip()):
            self.hr_negative_prompt = None
        return self

    @model_validator(mode="after")
    def _hires_checkpoint_only_with_the_hires_fix(self) -> "GenerationRequest":
        # As A1111, which reads it only with the hires fix: never checked, loaded or written without it.
        if not self.enable_hr:
            self.hr_checkpoint_name = None
        return self

    @property
    def hires_prompts(self) -> tuple[str, str]:
        """The prompt and negative prompt of the hires fix's second pass."""
        return self.hr_prompt or self.prompt, self.hr_negative_prompt or self.negative_prompt

    @property
    def seed_resize(self) -> tuple[int, int] | None:
        """(width, height) the seeds' noise is drawn at, or None."""
        return (self.seed_resize_from_w, self.seed_resize_from_h) if self.seed_resize_from_w else None

    @model_validator(mode="after")
    def _known_sampler(self) -> "GenerationRequest":
        # Also splits old combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").
        self.sampler_name, self.scheduler = resolve_sampler(self.sampler_name, self.scheduler)
        if self.hr_sampler_name or self.hr_scheduler:
            self.hr_sampler_name, self.hr_scheduler = self._hires_pair()
        return self

    def _hires_pair(self) -> tuple[str, str]:
        """As A1111: a hires schedule type alone goes with the first pass's sampler, and a hires sampler alone with
        the first pass's schedule type (its own default where it cannot follow that one)."""
        sampler = self.hr_sampler_name or self.sampler_name
        try:
            return resolve_sampler(sampler, self.hr_scheduler or self.scheduler)
        except ValueError as err:
            if self.hr_scheduler:
                raise ValueError(f"hr_sampler_name: {err}") from None
        try:
            return resolve_sampler(sampler, "Automatic")
        except ValueError as err:
            raise ValueError(f"hr_sampler_name: {err}") from None

    @property
    def hires_token_merging_ratio(self) -> float:
        """The token merging ratio of the hires fix's second pass: its own, else the first pass's (A1111's)."""
        return self.token_merging_ratio_hr or self.token_merging_ratio

    @property
    def schedule_shape(self) -> ScheduleShape:
        """A1111's options that reshape the schedule (the Beta schedule's alpha and beta, sigma range, rho, the
        next-to-last sigma's discard, the noise schedule)."""
        return ScheduleShape(self.beta_dist_alpha, self.beta_dist_beta, self.sigma_min, self.sigma_max, self.rho,
                             self.always_discard_next_to_last_sigma, self.sd_noise_schedule,
                             self.use_old_karras_scheduler_sigmas, self.use_downcasted_alpha_bar)

    @property
    def discard_changes_a_pass(self) -> bool:
        """Whether Always discard next-to-last sigma changed a pass: one of a k-diffusion sampler that keeps that
        sigma by itself, or one on A1111's timesteps (DDIM, PLMS on Automatic: a step more). A1111 writes its
        infotext key then; DPM2's own discard writes none."""
        def changed(name: str, schedule: str, from_noise: bool) -> bool:
            name, schedule = resolve_sampler(name, schedule)
            sampler = get_sampler(name)
            return ((sampler.k_diffusion and not sampler.discards_penultimate)
                    or (sampler.a1111_timesteps and schedule == "Automatic"
                        and (not from_noise or discard_lays_out(self.steps))))

        passes = [(self.sampler_name, self.scheduler, not self.is_img2img)]
        passes += [(*self.hires_sampler, False)] if self.enable_hr else []
        return self.always_discard_next_to_last_sigma and any(changed(*sampler) for sampler in passes)

    @property
    def unipc_options(self) -> UniPCOptions:
        return UniPCOptions(self.uni_pc_variant, self.uni_pc_order, self.uni_pc_lower_order_final)

    @property
    def uses_sgm_noise_multiplier(self) -> bool:
        """Whether A1111's SGM noise multiplier changes the run: txt2img's first pass on a k-diffusion sampler (A1111
        applies it there alone, and writes its infotext key then)."""
        return (self.sgm_noise_multiplier and not self.is_img2img
                and get_sampler(resolve_sampler(self.sampler_name, self.scheduler)[0]).k_diffusion)

    @property
    def uses_unipc(self) -> bool:
        """Whether a pass runs UniPC (A1111 writes its settings into the infotext then, where not its defaults)."""
        return "UniPC" in {self.sampler_name, self.hires_sampler[0] if self.enable_hr else self.sampler_name}

    @property
    def pass_schedules(self) -> set[str]:
        """The schedule types the passes run: the first pass's, and the hires fix's."""
        return {self.scheduler, self.hires_sampler[1]} if self.enable_hr else {self.scheduler}

    @property
    def reads_sigma_range(self) -> bool:
        """Whether a pass runs a schedule type that reads Schedule min or max sigma, and one is set (or the old
        Karras range stands for them)."""
        return (bool(self.sigma_min or self.sigma_max or self.use_old_karras_scheduler_sigmas)
                and bool(self.pass_schedules & set(ENDS_SCHEDULES)))

    @property
    def uses_beta_schedule(self) -> bool:
        """Whether a pass runs the Beta schedule type (A1111 writes its alpha and beta into the infotext then)."""
        return self.scheduler == "Beta" or (self.enable_hr and self.hires_sampler[1] == "Beta")

    @property
    def hires_sampler(self) -> tuple[str, str]:
        """The hires fix's sampler and schedule type: its own, or the first pass's."""
        if self.hr_sampler_name:
            return self.hr_sampler_name, self.hr_scheduler
        return self.sampler_name, self.scheduler

    @property
    def copies_before(self) -> frozenset[str]:
        """The steps (COPY_STEPS) before which each saved picture is also saved as it stood then: those the settings
        ask for that the run takes (not SD upscale's tiles)."""
        if not self.save_images or self.sd_upscale:
            return frozenset()
        wanted = {"highres_fix": self.enable_hr and self.save_images_before_highres_fix,
                  "face_restoration": self.restore_faces and self.save_images_before_face_restoration,
                  "color_correction": self.color_correction and self.is_img2img
                  and self.save_images_before_color_correction}
        return frozenset(step for step, kept in wanted.items() if kept)

    @property
    def image_count(self) -> int:
        """The pictures the job makes: SD upscale makes one from all its tiles for each batch count."""
        return self.n_iter if self.sd_upscale else self.batch_size * self.n_iter

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def is_inpainting(self) -> bool:
        return self.mask is not None

    def refiner_in(self, hires_pass: bool) -> bool:
        """Whether the refiner may take over in this pass: any pass without the hires fix, else the passes its
        hires_fix_refiner_pass names."""
        if not self.enable_hr:
            return True
        chosen = self.hires_fix_refiner_pass or "second pass"
        return chosen == "both passes" or (chosen == "second pass") == hires_pass

    @property
    def hires_steps(self) -> int:
        """The steps of the hires fix's second pass (none without it)."""
        return (self.hr_second_pass_steps or self.steps) if self.enable_hr else 0

    @property
    def total_steps(self) -> int:
        """Every sampler step of an image, both passes."""
        return self.denoising_steps + self.hires_steps

    def check_hires(self, width: int, height: int) -> None:
        """What the hires fix cannot do at this first-pass size (the model's own where the request gives none),
        refused before the run."""
        if not self.enable_hr:
            return
        problems = []
        if self.is_img2img:
            problems.append("enable_hr: hires fix is for txt2img; run img2img at the larger size instead")
        size = hires_size(width, height, self.hr_scale, self.hr_resize_x, self.hr_resize_y)
        if max(size.upscaled) > MAX_SIZE or min(size.final) < MIN_SIZE:
            # the fields that set the size: the resize ones where given (they win over hr_scale)
            given = [name for name in ("hr_resize_x", "hr_resize_y") if getattr(self, name)] or ["hr_scale"]
            problems.append(f"{', '.join(given)}: {width}x{height} enlarged comes to "
                            f"{size.upscaled[0]}x{size.upscaled[1]}; the size must stay within {MIN_SIZE} to {MAX_SIZE}")
        hires_sampler = self.hires_sampler[0]  # the second pass's schedule is its own sampler's
        most = get_sampler(hires_sampler).max_steps or MAX_SCHEDULE
        if self.denoising_strength == 0:
            problems.append("denoising_strength: hires fix needs a denoising strength above 0 (0.7 is usual)")
        elif schedule_steps(self.hires_steps, self.denoising_strength) > most:
            problems.append(f"denoising_strength: {self.hires_steps} hires steps at strength "
                            f"{self.denoising_strength:g} make a schedule of "
                            f"{schedule_steps(self.hires_steps, self.denoising_strength)} steps, and {hires_sampler} "
                            f"takes at most {most}; raise the strength or lower the hires steps")
        if problems:
            raise InvalidRequest("; ".join(problems))

    @property
    def denoising_steps(self) -> int:
        """The sampler steps that run. img2img runs the last int(steps x strength) + 1 (the strength kept below 1),
        as A1111 does: 16 of 20 at 0.75, one at 0, all at 1; with img2img_fix_steps, all of them."""
        if not self.is_img2img or self.img2img_fix_steps:
            return self.steps
        return min(int(self.steps * min(self.denoising_strength, 0.999)) + 1, self.steps)

    @property
    def img2img_schedule(self) -> int:
        """The schedule whose last denoising_steps img2img runs: the steps; with img2img_fix_steps, steps / strength
        (as A1111 makes it, and as the hires fix's), so that the steps asked for all run."""
        if self.is_img2img and self.img2img_fix_steps:
            return schedule_steps(self.steps, self.denoising_strength)
        return self.steps

    @model_validator(mode="after")
    def _exact_img2img_steps_runnable(self) -> "GenerationRequest":
        if not (self.is_img2img and self.img2img_fix_steps):
            return self
        if self.denoising_strength == 0:
            raise ValueError("denoising_strength: 0 draws nothing, and img2img_fix_steps would run its steps over "
                             "an endless schedule; raise the strength or untick exact img2img steps")
        most = get_sampler(self.sampler_name).max_steps or MAX_SCHEDULE
        if self.img2img_schedule > most:
            raise ValueError(f"denoising_strength: {self.steps} exact img2img steps at strength "
                             f"{self.denoising_strength:g} make a schedule of {self.img2img_schedule} steps, and "
                             f"{self.sampler_name} takes at most {most}; raise the strength or lower the steps")
        return self


def vae_choice(value: str) -> str:
    """An SD VAE pick as one name: Automatic and None in any case (A1111 writes "automatic" too), others as given."""
    value = value.strip()
    return {"automatic": "Automatic", "none": "None"}.get(value.lower(), value)


def a1111_seed_resize(width: int | None, height: int | None) -> tuple[int, int]:
    """A seed resize as A1111 runs it, in our fields: each side rounded down to a multiple of 8 (A1111 draws the
    noise at side // 8), and none, (0, 0), when either side is 0 or less (A1111's API default is -1)."""
    width, height = (max(side or 0, 0) // 8 * 8 for side in (width, height))
    return (width, height) if width and height else (0, 0)


class InvalidRequest(ValueError):
    """A request that fails validation; the message names each field and what to fix."""


_EIGHTS_FIELDS = ("width", "height", "seed_resize_from_w", "seed_resize_from_h")  # multiples of 8 (or 0)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic/FastAPI error dicts -> "field: what to fix; other: ..." (no body/query prefix)."""
    parts = []
    for problem in errors:
        loc = [str(p) for p in problem.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:] or loc[:1]
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        if problem.get("type") == "json_invalid":  # loc holds the character position, not a field
            reason = (problem.get("ctx") or {}).get("error", "")
            parts.append(f"body: not valid JSON at character {loc[0] if loc else '?'} ({reason}); "
                         "send a JSON object such as {\"prompt\": \"a cat\"}")
            continue
        if problem.get("type") == "string_too_long" and isinstance(problem.get("input"), str):
            message += f"; it has {len(problem['input'])}"
        if problem.get("type") == "int_from_float" and isinstance(problem.get("input"), float):
            step = 8 if loc[-1:] and loc[-1] in _EIGHTS_FIELDS else 1  # sizes: the multiples of 8 either side
            below = math.floor(problem["input"] / step) * step
            message += f"; use {below} or {below + step}"
        if loc == ["seed"]:  # pydantic's "exceeded maximum size" (1e30) gives no range
            message += f"; use -1 for a random seed, or a whole number from 0 to {MAX_SEED}"
        # A check of the whole request (the sampler) names what it is about itself.
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


def parse_request(data: dict[str, Any] | GenerationRequest) -> GenerationRequest:
    """Validate a dict (from the UI or the API) into a GenerationRequest or raise InvalidRequest."""
    if isinstance(data, GenerationRequest):
        data = data.model_dump()
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as err:
        raise InvalidRequest(describe_validation_errors(err.errors())) from None


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass
class GeneratedImage:
    """One finished image with what is needed to reproduce and display it."""

    image: Any  # PIL.Image.Image
    seed: int
    index: int  # position in the run: image i uses seed + i
    infotext: str
    nsfw: bool = False
    path: str | None = None
    history_id: int | None = None
    unfinished: bool = False  # Interrupt or Skip came before its last step: shown, never saved (as A1111)


@dataclass
class Progress:
    """Where a job is; read by the UI and /sdapi/v1/progress."""

    step: int = 0
    total_steps: int = 0
    image_index: int = 0  # the image being denoised, 0-based
    image_count: int = 0
    eta_seconds: float | None = None
    fraction: float = 0.0
    note: str | None = None  # what holds the first step back, such as a compile
