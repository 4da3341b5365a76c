"""Typed request and response bodies of the REST API, with stable-diffusion-webui's field names.

Defaults follow stable-diffusion-webui's API (steps 50, sampler "Euler" through `sampler_index`,
save_images False), with one deliberate difference: width/height left out mean the loaded model's
native size (512 for SD 1.x, as there) instead of a fixed 512 for txt2img, and the init image's size
(rounded down to a multiple of 8) for img2img.

Fields that stable-diffusion-webui accepts but we cannot honour yet are declared too, so its
clients validate; the adapter rejects them when they ask for something (a face restorer, a script not here)
and ignores them when they hold their defaults.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from webui.extras import MAX_PICTURES, UpscaleSettings
from webui.storage.infotext import MAX_INFOTEXT_CHARS


class GenerationBody(BaseModel):
    """The fields txt2img and img2img share (stable-diffusion-webui's StableDiffusionProcessing)."""
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
                          "(else the one set with POST /sdapi/v1/options), sd_vae, img2img_color_correction (img2img: "
                          "the results' colours matched to the picture's), s_min_uncond, s_min_uncond_all, "
                          "skip_early_cond (A1111's NGMS and Skip Early CFG), img2img_extra_noise (img2img and the hires fix: more "
                          "of the start noise, 0 to 1), token_merging_ratio (0 to 0.9; 0: off), "
                          "token_merging_ratio_img2img (img2img, where token_merging_ratio is 0), "
                          "token_merging_ratio_hr (the hires fix's pass; 0: token_merging_ratio), eta_ddim, eta_ancestral, s_churn, "
                          "s_tmin, s_tmax, s_noise (where the body's eta and s_* fields are null), "
                          "eta_noise_seed_delta (A1111's ENSD), beta_dist_alpha, beta_dist_beta (the Beta "
                          "schedule's shape, 0.01 to 1), sigma_min, sigma_max, rho (Schedule min and max sigma "
                          "and rho; 0: the model's, Karras's 7), sdxl_refiner_high_aesthetic_score, "
                          "sdxl_refiner_low_aesthetic_score (an SDXL refiner's: 6.0 and 2.5), enable_prompt_comments "
                          "(else the Settings tab's)")
    send_images: bool = True
    save_images: bool = Field(False, description="also write the PNGs to outputs/ and the history")
    # The most of an infotext that is ever read: room for prompts and extensions' long parameter lines.
    infotext: str | None = Field(None, max_length=MAX_INFOTEXT_CHARS,
                                 description="fill fields not given from an A1111 infotext")

    styles: list[str] | None = Field(None, description="prompt styles (styles.csv) joined into the prompts")
    tiling: bool | None = Field(None, description="a picture that tiles seamlessly")
    seed_resize_from_w: int | None = Field(-1, description="resize seed from width (-1 or 0: none; give the height "
                                                           "too)")
    seed_resize_from_h: int | None = Field(-1, description="resize seed from height (-1 or 0: none)")

    # --- accepted for compatibility; the adapter rejects values that ask for a missing feature --
    restore_faces: bool | None = None
    refiner_checkpoint: str | None = Field(None, description="a checkpoint that does the rest of the denoising "
                                           "(A1111's refiner; null, '' or 'None': none)")
    refiner_switch_at: float | None = Field(None, description="refiner: the part of the denoising done when it takes "
                                                              "over, by noise level (null: 0.8)")
    script_name: str | None = Field(None, description="A1111's script, in any case: 'x/y/z plot', 'prompt matrix', "
                                    "'prompts from file or textbox'; img2img also 'loopback', \"poor man's "
                                    "outpainting\", 'sd upscale' (GET /sdapi/v1/scripts)")
    script_args: list[Any] | None = Field(default_factory=list, description="the script's arguments by A1111's "
                                          "positions (GET /sdapi/v1/script-info); those left out or null take "
                                          "A1111's defaults")
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    s_min_uncond: float | None = Field(None, description="NGMS (Negative Guidance minimum sigma): below this noise "
                                       "level every other model call leaves the negative prompt out (null: "
                                       "override_settings.s_min_uncond, else 0, off); override_settings."
                                       "s_min_uncond_all makes it every call, override_settings.skip_early_cond "
                                       "(0 to 1) leaves it out of that part of the steps from the start")

    # A1111's step options (null: override_settings' eta_ddim / eta_ancestral, s_churn, ..., else the defaults)
    eta: float | None = Field(None, description="the run's eta, whichever its sampler reads: DDIM's (0 to 1, default "
                              "0), Euler a's (0 to 1, default 1: 0 makes it a plain Euler)")
    s_churn: float | None = Field(None, description="Euler: sigma churn, 0 to 100 (0: none)")
    s_tmax: float | None = Field(None, description="Euler: the churn up to this sigma, 0 to 999 (0: no limit)")
    s_tmin: float | None = Field(None, description="Euler: the churn from this sigma, 0 to 10")
    s_noise: float | None = Field(None, description="Euler: its churn noise times this, 0 to 1.1")

    # --- accepted and ignored (A1111 internals) -----------------------------------------------
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    override_settings_restore_afterwards: bool | None = True
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The request as the response's `parameters` echo it."""
        return self.model_dump()


class Txt2ImgRequest(GenerationBody):
    # --- honoured: the hires fix ---------------------------------------------------------------
    enable_hr: bool | None = Field(False, description="hires fix: enlarge the picture and denoise it again")
    denoising_strength: float | None = Field(None, description="hires fix: how deep the second pass goes (null: 0.75)")
    hr_scale: float | None = Field(2.0, description="hires fix: 1 to 4 times larger")
    hr_upscaler: str | None = Field(None, description="hires fix: Latent (null), Latent (antialiased), Latent (bicubic), "
                                    "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), "
                                    "Lanczos or Nearest")
    hr_second_pass_steps: int | None = Field(0, description="hires fix: steps of the second pass (0: steps)")
    hr_resize_x: int | None = Field(0, description="hires fix: width to enlarge to, instead of hr_scale")
    hr_resize_y: int | None = Field(0, description="hires fix: height to enlarge to, instead of hr_scale")

    hr_sampler_name: str | None = Field(None, description="hires fix: the second pass's sampler (null, \"\" or "
                                        "\"Use same sampler\": the first pass's)")
    hr_scheduler: str | None = Field(None, description="hires fix: the second pass's schedule type (null, \"\" or "
                                     "\"Use same scheduler\": the first pass's)")
    hr_prompt: str | None = Field("", description="hires fix: the second pass's prompt (empty: the prompt)")
    hr_negative_prompt: str | None = Field("", description="hires fix: the second pass's negative prompt (empty: the "
                                           "negative prompt)")
    hr_checkpoint_name: str | None = Field(None, description="hires fix: the second pass's checkpoint, a model of the "
                                           "models folder of the model's kind (null, \"\" or \"Use same checkpoint\": "
                                           "the first pass's)")

    # --- accepted; the adapter refuses a size (A1111's old hires fix) -------------------------
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0


class Img2ImgRequest(GenerationBody):
    # --- honoured ---------------------------------------------------------------------------
    init_images: list[str] | None = Field(None, description="the picture to start from: exactly one base64 image "
                                          "(PNG, JPEG or WebP), optionally as a data: URL")
    denoising_strength: float | None = Field(0.75, description="0 to 1: how much of the init image is noised away "
                                             "(1 keeps none of it); steps x strength steps run")
    resize_mode: int | None = Field(0, description="fitting the init image to width x height: 0 just resize, "
                                    "1 crop and resize, 2 resize and fill, 3 just resize its latents")
    include_init_images: bool | None = Field(False, description="echo init_images and mask in the response's "
                                             "parameters")
    width: int | None = Field(None, description="multiple of 8; left out = the init image's size")
    height: int | None = Field(None, description="multiple of 8; left out = the init image's size")

    # Inpainting, with A1111's API defaults (its UI's differ: original content, whole picture, padding 32).
    mask: str | None = Field(None, description="inpainting: a base64 image, white where the picture is drawn again "
                             "(or, with transparency, opaque there); the picture's size, else stretched to it")
    mask_blur: int | None = Field(None, description="pixels the mask's edge is blurred; null: mask_blur_x")
    mask_blur_x: int | None = Field(4, description="the mask's blur, when mask_blur is null (equal to mask_blur_y)")
    mask_blur_y: int | None = Field(4, description="the mask's blur, when mask_blur is null (equal to mask_blur_x)")
    inpainting_fill: int | None = Field(0, description="masked content: 0 fill, 1 original, 2 latent noise, "
                                        "3 latent nothing")
    inpaint_full_res: bool | None = Field(True, description="true: draw only the masked part, with padding, at "
                                          "width x height, and paste it back (Only masked); false: the whole picture")
    inpaint_full_res_padding: int | None = Field(0, description="Only masked: pixels around the mask drawn too")
    inpainting_mask_invert: int | None = Field(0, description="1 draws the part outside the mask instead")

    initial_noise_multiplier: float | None = Field(None, description="img2img: the noise the picture is noised with, "
                                                   "times this, 0 to 1.5 (null: override_settings."
                                                   "initial_noise_multiplier, else 1)")
    image_cfg_scale: float | None = Field(None, description="instruct-pix2pix models: how closely the result keeps "
                                          "to the init image, 0 to 3 (null or 1: plain CFG; other models ignore it)")

    # --- accepted for compatibility; the adapter rejects values that ask for a missing feature --
    mask_round: bool | None = Field(True, description="only true (or null) is supported")
    latent_mask: Any = Field(None, description="not supported: send null")

    def parameters(self) -> dict[str, Any]:
        # The init image is not echoed unless asked for, as in stable-diffusion-webui (its include_init_images):
        # the client already has it, and sending megabytes of base64 back to it is waste.
        echo = super().parameters()
        if not self.include_init_images:
            echo["init_images"] = echo["mask"] = None
        return echo


class GenerationResponse(BaseModel):
    """txt2img's and img2img's answer (stable-diffusion-webui's TextToImageResponse and ImageToImageResponse)."""
    images: list[str] | None = Field(None, description="base64 PNGs, each with its infotext in the 'parameters' chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, width, height, sd_model_name, ...")


class ExtrasBody(UpscaleSettings):
    """What extra-single-image and extra-batch-images share (A1111's ExtrasBaseRequest)."""
    upscale_first: bool = Field(False, description="ignored: the upscalers run first, then GFPGAN, then CodeFormer, "
                                                   "as A1111 orders them")
    show_extras_results: bool = Field(True, description="ignored: the pictures are always returned")


class ExtrasSingleImageRequest(ExtrasBody):
    image: str = Field("", description="a base64 image, optionally as a data: URL")


class ExtrasImage(BaseModel):
    data: str = Field(description="a base64 image, optionally as a data: URL")
    name: str = Field("", description="its file name (only to name it in an error)")


class ExtrasBatchImagesRequest(ExtrasBody):
    imageList: list[ExtrasImage] = Field(description=f"the pictures, at most {MAX_PICTURES}")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="what was done, as A1111's 'postprocessing' infotext in HTML")
    image: str = Field(description="base64 PNG; the original's 'parameters' chunk kept, what was done in "
                                   "'postprocessing'")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field(description="what was done, as A1111's 'postprocessing' infotext in HTML")
    images: list[str] = Field(description="base64 PNGs, in the order sent")


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


class RealesrganItem(BaseModel):
    name: str
    path: str | None = None  # the file, or the address it is downloaded from when first used
    scale: int | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


class PNGInfoRequest(BaseModel):
    image: str = Field(description="a base64 image, optionally as a data: URL")


class InterrogateRequest(BaseModel):
    image: str = Field(description="a base64 image, optionally as a data: URL")
    model: str = Field("clip", max_length=100, description="clip (A1111's Interrogate CLIP: a caption, then a medium, "
                                                           "an art movement and three flavours)")


class InterrogateResponse(BaseModel):
    caption: str = Field(description="a prompt describing the picture")


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


class VaeItem(BaseModel):
    """GET /sd-vae: one file of the VAE folder, as A1111 lists it (sd_vae and override_settings.sd_vae take the
    model_name)."""
    model_name: str
    filename: str


class LoraItem(BaseModel):
    """GET /loras: one file of the LoRA folder, named in prompts as <lora:name:0.8>."""
    name: str
    alias: str  # kohya's ss_output_name where the file has one, else the name
    path: str
    metadata: dict[str, Any] = {}


class HypernetworkItem(BaseModel):
    """GET /hypernetworks: one file of the hypernetworks folder, named in prompts as <hypernet:name:0.6>."""
    name: str
    path: str | None = None


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


class ScriptArg(BaseModel):
    """One of a script's script_args, as A1111's /sdapi/v1/script-info describes it."""
    label: str | None = None
    value: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str
    is_alwayson: bool = False
    is_img2img: bool = False
    args: list[ScriptArg] = []


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
    result: GenerationResponse | None = Field(None, description="images and info once the job has finished")


class JobCancelReply(BaseModel):
    id: str
    cancelled: bool
    state: str


class ErrorResponse(BaseModel):
    error: str = Field(description="the kind of error")
    detail: str = Field(description="what went wrong, naming each field to fix")
