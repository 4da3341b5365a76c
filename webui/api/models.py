"""Typed request and response bodies of the REST API, with stable-diffusion-webui's field names.

Defaults follow stable-diffusion-webui's API (steps 50, sampler "Euler" through `sampler_index`,
save_images False), with one deliberate difference: width/height left out mean the loaded model's
native size (512 for SD 1.x, as there) instead of a fixed 512.

Fields that stable-diffusion-webui accepts but we cannot honour yet are declared too, so its
clients validate; the adapter rejects them when they ask for something (enable_hr=True, a script)
and ignores them when they hold their defaults.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from webui.storage.infotext import MAX_INFOTEXT_CHARS


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # --- honoured ---------------------------------------------------------------------------
    prompt: str | None = ""
    negative_prompt: str | None = ""
    seed: int = Field(-1, description="-1 picks a random seed; image i of the run uses seed + i")
    subseed: int | None = Field(-1, description="variation seed (-1: random); image i uses subseed + i")
    subseed_strength: float | None = Field(0, description="variation strength, 0 to 1: how far the starting noise "
                                                          "moves towards the variation seed's (0: none)")
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M'; None uses sampler_index")
    sampler_index: str | None = Field("Euler", description="older name of sampler_name, used when that is empty")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Karras, Exponential, SGM Uniform; "
                                  "A1111's others, or one the sampler cannot follow, run as Automatic (see "
                                  "info's warnings)")
    batch_size: int = 1
    n_iter: int = Field(1, description="batch count")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="multiple of 8; left out = the model's native size")
    height: int | None = Field(None, description="multiple of 8; left out = the model's native size")
    override_settings: dict[str, Any] | None = Field(
        None, description="honoured keys: sd_model_checkpoint (switches the model), CLIP_stop_at_last_layers "
                          "(else the one set with POST /sdapi/v1/options)")
    send_images: bool = True
    save_images: bool = Field(False, description="also write the PNGs to outputs/ and the history")
    # The most of an infotext that is ever read: room for prompts and extensions' long parameter lines.
    infotext: str | None = Field(None, max_length=MAX_INFOTEXT_CHARS,
                                 description="fill fields not given from an A1111 infotext")

    # --- accepted for compatibility; the adapter rejects values that ask for a missing feature --
    styles: list[str] | None = None
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool | None = False
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)

    # --- accepted and ignored (sampler fine-tuning, hires-fix details, A1111 internals) ----------
    script_args: list[Any] | None = Field(default_factory=list)
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None


class Txt2ImgResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs, each with its infotext in the 'parameters' chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, width, height, sd_model_name, ...")


class PNGInfoRequest(BaseModel):
    image: str = Field(description="a base64 image, optionally as a data: URL")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the infotext ('parameters' text chunk), or '' when the image has none")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the infotext parsed: Prompt, Negative prompt, Steps, Size-1, ...")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 over the whole running job")
    eta_relative: float = Field(description="seconds left, estimated")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="base64 PNG live preview, when there is one")
    textinfo: str | None = None
    current_task: str | None = Field(None, description="id of the running job, only when it is the caller's")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    """GET /loras: one file of the LoRA folder, named in prompts as <lora:name:0.8>."""
    name: str
    alias: str  # kohya's ss_output_name where the file has one, else the name
    path: str
    metadata: dict[str, Any] = {}


class PromptStyleItem(BaseModel):
    """GET /prompt-styles: one style of styles.csv."""
    name: str
    prompt: str
    negative_prompt: str


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str] = []
    img2img: list[str] = []


class OptionsUpdateResponse(BaseModel):
    applied: list[str] = Field(description="keys that changed something")
    ignored: list[str] = Field(description="keys this server does not let you change (read-only or unknown)")


# --- our own per-job routes -------------------------------------------------------------------
class JobProgress(BaseModel):
    step: int
    total_steps: int
    fraction: float
    eta_seconds: float | None
    image_index: int
    image_count: int
    note: str | None = Field(None, description="what holds the first step back, such as a compile")


class JobCreated(BaseModel):
    id: str
    state: str
    position: int | None = Field(description="jobs ahead of this one, the running job included")


class JobStatus(BaseModel):
    id: str
    state: str = Field(description="queued, running, done, failed or cancelled")
    origin: str | None = None
    position: int | None = None
    progress: JobProgress | None = None
    error: str | None = None
    warnings: list[str] = Field(default_factory=list, description="what went wrong without failing the job, "
                                "such as an image that could not be saved")
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    current_image: str | None = Field(None, description="live preview (base64 PNG) when asked for")
    result: Txt2ImgResponse | None = Field(None, description="images and info once the job has finished")


class JobCancelReply(BaseModel):
    id: str
    cancelled: bool
    state: str


class ErrorResponse(BaseModel):
    error: str = Field(description="the kind of error")
    detail: str = Field(description="what went wrong, naming each field to fix")
