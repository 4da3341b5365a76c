"""The engine: holds the loaded pipeline and turns one batch of a request into images.

One readable path: scheduler from the sampler name -> one CPU generator per image (seed + i) ->
the diffusers pipeline to latents -> VAE decode (fp32 fall-back on NaN) -> safety checker. img2img takes
the same path, with diffusers' img2img pipeline over the same components and the init image's latents.
Only the worker thread calls into an Engine, so the pipeline never serves two runs at once.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from webui.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, Settings
from webui.engine.brownian import MULTISTEP_SDE_SAMPLERS, brownian_draws_from, with_brownian_noise
from webui.engine.controlnet import ControlNetLibrary, ControlPass, ControlUnit, controlled
from webui.engine.ddim_cfgpp import DDIMCFGPPScheduler, recording_uncond
from webui.engine.composable import composed_guidance, composition_error, is_composed, part_texts, split_parts
from webui.engine.fast_path import CompiledShapes, COMPILER_FAILURES, is_compiled, uncompiled, undo_compile
from webui.engine.embeddings import EmbeddingSet, load_embeddings, used_embeddings
from webui.engine.tiling import seamless
from webui.engine.hypernetworks import HypernetworkLibrary, bent_attention, hypernetwork_uses
from webui.engine.philox import drawing_from_philox, make_generator
from webui.engine.hires import (
    LATENT_UPSCALERS, crop_center, crop_center_picture, hires_size, schedule_steps, upscale_latents,
)
from webui.engine.img2img import pipeline_strength
from webui.engine.inpaint import Inpainting
from webui.engine.inpainting_model import masked_picture_input, takes_masked_picture
from webui.engine.instruct_pix2pix import EditPicture, edit_problem, model_input, takes_edit_picture
from webui.engine.lora import LoraError, LoraLibrary, LoraPatcher, lora_uses, strip_loras
from webui.engine.color_correction import match_colors
from webui.engine.interrogate import Interrogator
from webui.engine.face_restoration import FaceRestorers
from webui.engine.upscalers import UpscalerLibrary
from webui.engine.vae import VaeError, VaeFile, VaeLibrary, VaeSwap, read_vae_weights
from webui.engine.loader import (ModelFileError, ModelLoadError, Placement, park_on_cpu, pick_placement,
                                 place_pipeline, read_pipeline)
from webui.engine.models import ModelEntry, ModelRegistry, entry_for_path
from webui.engine.noise import start_noise
from webui.engine.preview import TinyDecoders, denoised_estimate, keeping_estimates, latents_to_preview
from webui.engine.prompt_schedule import PromptPhase, phase_at, prompt_phases, prompt_variants
from webui.engine.prompts import (COMMA_BACKTRACK, ORIGINAL, chunk_count, encode_parts, encode_prompt_pair,
                                  encode_sdxl_pair, encode_sdxl_parts, parse_attention, token_count)
from webui.engine.refiner import (SDXL_REFINER, aesthetic_scores, first_refiner_call, first_refiner_call_by_count,
                                  is_sdxl_refiner, kind_of_entry,
                                  kind_of_pipeline, kind_problem, pass_timesteps, refiner_size_inputs)
from webui.engine.samplers import (CFGPP_SAMPLER, ScheduleShape, UniPCOptions, get_sampler, make_scheduler,
                                   model_sigmas, runs_its_own_calls, sampler_steps_done)
from webui.engine.sdxl import is_sdxl, sdxl_problem
from webui.engine.single_file import SingleFileLoadError, detect_family, read_header, sdxl_refiner_refusal
from webui.engine.soft_inpainting import SoftInpainting, sigma_of
from webui.engine.step_options import StepOptions, use_step_options
from webui.engine.uncond_skip import SkipCalls, UncondSkip, skip_plan, skipping_uncond
from webui.engine.unet_hooks import stoppable_inside_calls
from webui.engine.token_merging import merged_tokens
from webui.schemas import MASKED_CONTENT, MAX_PROMPT_CHARS, GenerationRequest, seed_after

log = logging.getLogger(__name__)

# Called after every sampler step with (step, steps, latents), and with (0, steps, None) between the encodes
# of a prompt that reads several texts (editing, alternation: minutes of them on a CPU); it may raise to stop.
StepCallback = Callable[[int, int, torch.Tensor], None]

CONTROLNET_WITH_SDXL_REFINER = ("refiner_checkpoint: a ControlNet cannot steer an SDXL refiner (SDXL ControlNets read "
                                "the base's conditioning); turn the ControlNet off, or pick no refiner")


class DenoisingStopped(Exception):
    """Raised by a step callback to end the batch early (Interrupt, Skip). On its way out the engine puts the
    batch's images as they stand after the last finished step in `images`: A1111 shows an interrupted
    picture too (and does not save it)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.images: list[EngineImage] = []


class NonFiniteOutput(RuntimeError):
    """The model or the VAE produced NaN or infinity: the picture would be black, so say so instead."""


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [-1, 1] -> 8-bit images, rounded as diffusers' postprocess rounds them. The arithmetic runs
    where the pixels are (the GPU) and a quarter of the bytes cross to the CPU: diffusers copies float32
    and converts on the CPU, which took 11-14 ms for 8 images at 512x512 on this project's 2-core machine."""
    as_bytes = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(image) for image in as_bytes.permute(0, 2, 3, 1).cpu().numpy()]


def _negative_in_use(request: GenerationRequest, negative: str | None = None) -> str:
    """At CFG 1 diffusers runs the prompt alone: the negative prompt (the request's, or the one given) is not
    used, and must not pad the prompt to its length either."""
    return (request.negative_prompt if negative is None else negative) if request.cfg_scale > 1 else ""


def _phases(request: GenerationRequest) -> list[PromptPhase]:
    """The prompt and negative prompt texts each stretch of the run reads (prompt editing, alternation), the
    prompt without its <lora:...> tags."""
    # img2img too: A1111 times them over all the steps, counted from the first step that runs; the phases
    # past the steps it runs are left out (their texts are never read).
    phases = _first_pass_phases(request, bool(request.use_old_scheduling))
    return [phase for before, phase in zip([None, *phases], phases)
            if before is None or before.last_step < request.denoising_steps]


def _first_pass_phases(request: GenerationRequest, old_timelines: bool) -> list[PromptPhase]:
    return prompt_phases(strip_loras(request.prompt), _negative_in_use(request), request.steps,
                         old_timelines=old_timelines)


def _hires_phases(request: GenerationRequest, old_timelines: bool | None = None) -> list[PromptPhase]:
    """The prompt phases of the hires fix's second pass (its own prompts, where it has them), whose steps count
    on from the first pass's, as in A1111 (old_timelines: A1111's old rule; None: the request's)."""
    prompt, negative = request.hires_prompts
    old = bool(request.use_old_scheduling) if old_timelines is None else old_timelines
    return prompt_phases(strip_loras(prompt), _negative_in_use(request, negative), request.hires_steps,
                         first_pass_steps=request.steps, old_timelines=old)


def old_timelines_change_the_run(request: GenerationRequest) -> bool:
    """Whether A1111's Use old prompt editing timelines changes what a pass reads (A1111 writes its infotext key
    then alone)."""
    if not request.use_old_scheduling:
        return False
    passes = [_first_pass_phases] + ([_hires_phases] if request.enable_hr else [])
    return any(phases(request, True) != phases(request, False) for phases in passes)


def _reads_uncond_rows(sampler_name: str) -> bool:
    """DDIM CFG++ steps along each call's negative rows, which a hook keeps for it: such a pass runs uncompiled (a
    CUDA graph's next call would overwrite the rows kept)."""
    return get_sampler(sampler_name).name == CFGPP_SAMPLER


def _uncond_recorder(scheduler, images: int) -> Callable:
    """The hook a pass's UNets take for its sampler: DDIM CFG++ steps along each call's negative rows (of `images`
    images; webui/engine/ddim_cfgpp.py); the others need nothing."""
    if isinstance(scheduler, DDIMCFGPPScheduler):
        return lambda unet: recording_uncond(unet, scheduler, images)
    return lambda unet: contextlib.nullcontext()


def _part_weights(phases: list[PromptPhase]) -> list[float] | None:
    """The weights of a composed pass's parts (the request's check made them the same in every phase), or None."""
    if not any(is_composed(phase.prompt) for phase in phases):
        return None
    return [part.weight for part in split_parts(phases[0].prompt)]


def composition_problem(request: GenerationRequest) -> str | None:
    """Why the request's AND (or a prompt's own weight) cannot run, naming the prompt; None when it can."""
    passes = {"prompt": (request.prompt, _phases(request))}
    if request.enable_hr:
        passes["hr_prompt"] = (request.hires_prompts[0], _hires_phases(request))
    for name, (prompt, phases) in passes.items():
        problem = composition_error(prompt, [phase.prompt for phase in phases], guided=request.cfg_scale > 1)
        if problem:
            return f"{name}: {problem}"
    return None


def _prompt_reading(request: GenerationRequest) -> tuple[str, int]:
    """How the request's prompts are read into chunks: its emphasis mode and A1111's Prompt word wrap length limit
    (the defaults where the worker has not filled them in from the settings)."""
    backtrack = request.comma_padding_backtrack
    return request.emphasis or ORIGINAL, COMMA_BACKTRACK if backtrack is None else backtrack


def _all_phases(request: GenerationRequest) -> list[PromptPhase]:
    """The phases of every pass: all the texts the run reads."""
    return _phases(request) + (_hires_phases(request) if request.enable_hr else [])


def _noised_latents(pipe, noise: torch.Tensor, extra: float, image: torch.Tensor, timestep: torch.Tensor, *_unused,
                    **_also):
    """img2img's start (in place of the pipeline's prepare_latents, which draws noise of its own): the picture's
    latents noised to `timestep` with `noise`, by the pipeline's scheduler of this pass. `extra`: A1111's Extra noise,
    that much more of the same noise on top, counted as A1111 counts it (in sigmas: a scheduler that scales the
    latents by sqrt(alpha) scales it too)."""
    noise = noise.to(image.device, image.dtype)
    if getattr(pipe.scheduler, "a1111_start_level", None) is not None:  # A1111's layout: a level above its first call
        timestep = torch.full_like(timestep, pipe.scheduler.a1111_start_level)
    latents = pipe.scheduler.add_noise(image, noise, timestep)
    if extra:
        scale = pipe.scheduler.add_noise(torch.ones_like(image), torch.zeros_like(noise), timestep)
        latents = latents + scale * extra * noise
    return latents


def _check_files_of(entry: ModelEntry) -> None:
    """ModelFileError where a model's files plainly hold no model, told without reading its weights: a checkpoint
    file's header (damaged, cut off, a LoRA or VAE), a diffusers folder's index."""
    path = Path(entry.source)
    if entry.kind == "diffusers" and not (path / "model_index.json").is_file():
        raise ModelFileError(f"could not load model {entry.name!r}: {entry.source} holds no model_index.json (a "
                             "diffusers folder's index)")
    # (an old, unzipped .ckpt pickle would be read whole, beside the model still in RAM: it is left to the load)
    if entry.kind == "single_file" and (path.suffix.lower() != ".ckpt" or zipfile.is_zipfile(path)):
        try:
            detect_family(read_header(path)[0], entry.source)
        except SingleFileLoadError as err:
            raise ModelFileError(f"could not load model {entry.name!r}: {err}") from None


def _mask_weight(request: GenerationRequest | None) -> float:
    """A1111's Inpainting conditioning mask strength for a run (none given: 1, all greyed out)."""
    weight = None if request is None else request.inpainting_mask_weight
    return 1.0 if weight is None else weight


EXTREME_WEIGHT = 100.0  # an emphasis past this is no style choice but nested brackets run away


def _nan_advice(dtype: torch.dtype, request: GenerationRequest | None = None) -> str:
    heaviest = max((abs(weight) for text in (request.prompt, request.negative_prompt) if request
                    for _, weight in parse_attention(text) if weight is not None), default=1.0)
    if heaviest > EXTREME_WEIGHT:  # the prompt, not the model: say what to change
        return (f"the model produced NaN while denoising: the prompt's emphasis weighs words up to {heaviest:.3g} "
                "(each ( ) multiplies by 1.1, each [ ] divides); use fewer nested brackets or (word:1.5)")
    if dtype == torch.float32:
        return ("the model produced NaN while denoising, in full precision: its weights may be broken; try a "
                "lower CFG scale, another sampler or another model")
    return (f"the model produced NaN while denoising in {dtype}: not enough precision for this model or GPU. "
            "Start with --no-half, or try a lower CFG scale or another sampler")


class _Conds(NamedTuple):
    """One prompt phase's embeddings: the prompt's and the negative prompt's; an SDXL model's pooled ones too."""

    prompt: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def rows(self, count: int) -> "_Conds":
        """The same, `count` rows each (one row shown `count` times)."""
        return _Conds(*(None if part is None else part.expand(count, *part.shape[1:]) for part in self))

    def call_inputs(self) -> dict:
        """The pipeline call's embeddings arguments."""
        inputs = {"prompt_embeds": self.prompt, "negative_prompt_embeds": self.negative}
        if self.pooled is not None:
            inputs |= {"pooled_prompt_embeds": self.pooled, "negative_pooled_prompt_embeds": self.negative_pooled}
        return inputs

    def step_inputs(self, guided: bool) -> dict:
        """What a step's end hands the pipeline to read from the next step on (prompt editing, alternation): under
        CFG the negative and positive rows as one batch, as the pipeline reads them; SDXL's pooled ones likewise."""
        def batch(negative: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
            # Contiguous either way (the rows are one row shown `count` times): a compiled UNet would otherwise
            # compile again for the other memory layout.
            return torch.cat([negative, prompt]) if guided else prompt.contiguous()

        inputs = {"prompt_embeds": batch(self.negative, self.prompt)}
        if self.pooled is not None:
            inputs["add_text_embeds"] = batch(self.negative_pooled, self.pooled)
        return inputs


@dataclass
class _Run:
    """What the passes of one batch share (the hires fix runs two): the generators (the hires pass replaces them
    with fresh ones, as A1111 does), the encoded prompts, and the steps reported so far, counted over both passes."""

    seeds: list[int]
    on_step: StepCallback | None
    total_steps: int
    noise_seed_delta: int = 0  # A1111's Eta noise seed delta (ENSD)
    subseeds: list[int] | None = None  # with a variation strength, each image's variation seed
    variation_strength: float = 0.0
    seed_resize: tuple[int, int] | None = None  # the (width, height) the seeds' noise is drawn at
    rng: str = "CPU"  # A1111's random number source: "CPU" (torch's CPU generator) or "NV" (webui/engine/philox.py)
    done: int = 0  # the steps of the passes finished
    reported: int = 0
    latents: torch.Tensor | None = None  # as they stood after the last step reported
    encoded: dict[tuple[str, str], _Conds] = field(default_factory=dict)
    masked: "_MaskedStart | None" = None  # inpainting: what is kept, put back after every step
    # Tiling's wrap-around padding, on the model and on each checkpoint that takes over from it; undone after the run
    tiled: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    control: ControlUnit | None = None  # ControlNet: steers every pass (webui/engine/controlnet.py)
    # Hypernetworks (network, multiplier) of the running pass, and of the hires fix's (its prompt's, as in A1111)
    hypernetworks: list = field(default_factory=list)
    hires_hypernetworks: list = field(default_factory=list)
    # copies kept of each picture as it stood before a step, by step (copies_before): the hires fix's here
    earlier: dict[str, list[Image.Image]] = field(default_factory=dict)
    generators: list[torch.Generator] = field(init=False)

    def __post_init__(self):
        self.fresh_generators()

    def fresh_generators(self) -> None:
        """A generator per image from its seed, as at the start (the hires pass begins so too, as in A1111)."""
        self.generators = [make_generator(self.rng, seed) for seed in self.seeds]

    def after_start_noise(self) -> None:
        """A1111's Eta noise seed delta: the noise a sampler draws after the start noise (an ancestral step's, DDIM's
        with eta) comes from generators seeded seed + delta."""
        if self.noise_seed_delta:
            self.generators = [make_generator(self.rng, seed_after(seed, self.noise_seed_delta)) for seed in self.seeds]

    def after_step(self, pipe, call: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents a pass goes on with after its model call `call`: inpainting's kept part put back."""
        return latents if self.masked is None else self.masked.put_back(pipe, call, latents)

    def step(self, step: int, latents: torch.Tensor, estimate: torch.Tensor | None = None) -> None:
        """Report a step: on_step is shown the sampler's estimate of the finished latents where it has one (for the
        live preview), else the latents."""
        if self.on_step is not None and step > self.reported:
            self.reported, self.latents = step, latents
            self.on_step(step, self.total_steps, latents if estimate is None else self._with_kept_part(estimate))

    def _with_kept_part(self, estimate: torch.Tensor) -> torch.Tensor:
        """Inpainting's estimate with the part kept the picture's own, as the run will end there."""
        if self.masked is None:
            return estimate
        return self.masked.start * self.masked.keep + estimate * (1 - self.masked.keep)

    def between_encodes(self) -> None:
        """Let on_step stop the run (Interrupt, Skip) where no step ends: between the prompt's encodes, inside a
        model call."""
        if self.on_step is not None:
            self.on_step(0, self.total_steps, None)


@dataclass
class _MaskedStart:
    """Inpainting's latents: the picture's (`start`), its noise, and `keep` (1 where the picture stays; with soft
    inpainting, the blurred mask's shades between)."""

    start: torch.Tensor
    noise: torch.Tensor
    keep: torch.Tensor
    soft: SoftInpainting | None = None  # A1111's Soft inpainting: the kept part blended in by the mask's shades

    def put_back(self, pipe, call: int, latents: torch.Tensor) -> torch.Tensor:
        """After model call `call` of a pass: the kept part is the picture's, noised to where the schedule goes on
        from (un-noised after the last call), as diffusers' inpainting does with a plain model. Not half-way through
        a two-call step (DPM2, DPM++ SDE): the latents stand between two noise levels there, and the scheduler's
        add_noise knows only the next one."""
        if not getattr(pipe.scheduler, "state_in_first_order", True):
            return latents
        timesteps = pipe.scheduler.timesteps
        following = len(timesteps) - pipe.num_timesteps + call + 1  # the pass runs the schedule's tail
        kept = self.start
        if following < len(timesteps):
            kept = pipe.scheduler.add_noise(self.start, self.noise, timesteps[following:following + 1])
        if self.soft is not None:  # weighed by the noise level of the call just made, as A1111 weighs its blend
            return self.soft.blend(kept, latents, self.drawn, sigma_of(pipe.scheduler, timesteps[following - 1]))
        return self.finish(latents, kept)

    def finish(self, latents: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        if self.soft is not None:  # soft inpainting's last step has blended already: no hard blend (A1111's too)
            return latents
        kept = self.start if kept is None else kept
        return kept * self.keep + latents * (1 - self.keep)

    @property
    def drawn(self) -> torch.Tensor:
        return 1 - self.keep


@dataclass
class EngineImage:
    image: Image.Image
    seed: int
    nsfw: bool
    # the picture as it stood before each step the request keeps a copy from (GenerationRequest.copies_before)
    earlier: dict[str, Image.Image] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedModel:
    entry: ModelEntry
    short_hash: str | None
    native_width: int
    native_height: int
    text_encoder_layers: int  # the deepest Clip skip this model has
    inpainting: bool = False  # made for inpainting: its UNet also reads a mask and a masked picture
    edit: bool = False  # an instruct-pix2pix model: its UNet also reads the picture to edit
    sdxl: bool = False  # an SDXL (base) model: webui/engine/sdxl.py says what it cannot run yet

    def names(self, name: str | None) -> bool:
        """`name` means this model (None keeps whatever is loaded)."""
        return name is None or name in (self.entry.name, self.entry.source)

    def size_for(self, request: GenerationRequest) -> tuple[int, int]:
        """The request's width and height, the model's native size where it gives none."""
        return request.width or self.native_width, request.height or self.native_height


def decodes_in_tiles(width: int, height: int, tiling: bool = False) -> bool:
    """Above a megapixel the VAE decodes in tiles, so memory does not grow with the size; not for a Tiling run,
    whose picture must wrap around as a whole (a tile would wrap around itself)."""
    return width * height > 1024 * 1024 and not tiling


class Engine:
    def __init__(self, settings: Settings, registry: ModelRegistry, loras: LoraLibrary | None = None):
        self.settings = settings
        self.registry = registry
        self.loras = loras or LoraLibrary(settings.lora_folder)
        self.vaes = VaeLibrary(settings.vae_folder, registry)
        self.upscalers = UpscalerLibrary(settings.esrgan_folder, settings.real_esrgan_folder,
                                         downloads=not settings.offline)
        self.faces = FaceRestorers(settings.gfpgan_folder, settings.codeformer_folder, downloads=not settings.offline)
        self.tool_device_name: str | None = None  # upscalers and Interrogate; None: the model's (ZeroGPU: "cpu")
        self.interrogator = Interrogator(settings.blip_folder, settings.clip_folder, downloads=not settings.offline)
        self.controlnets = ControlNetLibrary(settings.controlnet_folder)
        self.hypernetworks = HypernetworkLibrary(settings.hypernetwork_folder)
        self.tiny_decoders = TinyDecoders(settings.taesd_folder, downloads=not settings.offline)  # TAESD previews
        self._vae_weights = VaeSwap()  # which VAE file the loaded VAE holds now
        self._lora_weights = LoraPatcher()  # what the loaded weights hold merged now
        self.embeddings = EmbeddingSet()  # the textual inversions the loaded model's tokenizer knows
        self.placement: Placement | None = None
        self.pipe = None
        self.tokenizer = None
        self.model: LoadedModel | None = None
        self._base_scheduler_config: dict | None = None
        self._warmed_up = False
        self._on_device = False  # False after release_device(): the next image brings the model back first
        self._compiled_shapes = CompiledShapes()  # outlives a model switch, as torch's variants do

    # --- models ---------------------------------------------------------------------------
    def load(self, name: str) -> LoadedModel:
        """Load a model by name; on failure the previously loaded model stays in place (on the CPU it is read again,
        and where its files are gone too, the embedded model is loaded: _replace_on_cpu)."""
        # The loaded model by its name, even from outside the models folder (--ckpt elsewhere), where
        # the registry cannot find it by name: every Generate names the model on the page.
        if self.model is not None and self.model.names(name):
            return self.model
        entry = self.registry.find(name)
        if kind_of_entry(entry) == SDXL_REFINER:  # before the loaded model goes (its reader refuses it too, later)
            raise ModelLoadError(sdxl_refiner_refusal(entry.name))
        return self._switch_to(entry)

    def _switch_to(self, entry: ModelEntry, refiner: bool = False) -> LoadedModel:
        """Make `entry` the loaded model (the refiner's switch and its way back use this too; `refiner`: for the
        refiner's role, the only one an SDXL refiner takes)."""
        if self.model is not None and self.model.entry == entry:
            return self.model
        _check_files_of(entry)  # what is plainly no model is refused at once (on the CPU, before the only model goes)
        self.placement = self.placement or pick_placement(self.settings)
        if self.placement.device == "cpu" and self.model is not None:
            return self._replace_on_cpu(entry, refiner)
        return self._load_entry(entry, refiner)

    def _load_entry(self, entry: ModelEntry, refiner: bool = False) -> LoadedModel:
        pipe = read_pipeline(entry, self.settings, self.placement, refiner)
        # Before placing: --lowvram's offload keeps its own copy of the token table, which must be the grown one.
        embeddings = self._load_embeddings(pipe)
        # Make room on the device, but keep the old model until the new one is in place.
        old_pipe = self.pipe
        parked = old_pipe is not None and park_on_cpu(old_pipe, self.settings, self.placement)
        try:
            place_pipeline(pipe, self.settings, self.placement)
        except Exception as err:
            if parked and not self.released:  # a released model stays off the device (another program has it)
                place_pipeline(old_pipe, self.settings, self.placement)
            raise ModelLoadError(f"could not move model {entry.name!r} to {self.placement.device}: {err}") from err
        short_hash = self.registry.short_hash(entry)  # before unloading: it reads the files
        self.unload()
        self.use_pipeline(pipe, entry, short_hash, embeddings)
        log.info("loaded model %s (%s) on %s", entry.name, self.model.short_hash, self.placement.device)
        return self.model

    def _replace_on_cpu(self, entry: ModelEntry, refiner: bool = False) -> LoadedModel:
        """On the CPU both models' weights would share the RAM (10 GB for two SD 1.5 in fp32): drop the old
        model first, and read it again if the new one fails to load."""
        previous, was_released = self.model.entry, self.released
        # Only the weights go: other threads (the API's options, a page's status line) still see the old
        # model named until the new one is in place, never "no model".
        self.pipe = None
        self._lora_weights.forget()
        self._vae_weights.forget()
        gc.collect()  # the old weights go now, not at some later collection
        try:
            return self._load_entry(entry, refiner)
        except Exception:
            if was_released:  # its RAM was given back on purpose: it stays released, and the next image reads it
                raise
            self._load_a_model_again(entry, previous)
            raise

    def _load_a_model_again(self, failed: ModelEntry, previous: ModelEntry) -> None:
        """After `failed` did not load in the old model's place: the old model again, else (its files gone too) the
        embedded one, so the worker is never left without a model while one can be had."""
        embedded = entry_for_path(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
        tried = {failed.source}
        for fallback in (previous, embedded):
            if fallback is None or fallback.source in tried:
                continue
            tried.add(fallback.source)
            log.warning("could not load %s; loading %s instead", failed.name, fallback.name)
            try:
                self._load_entry(fallback)
                return
            except Exception:  # the user needs the first error, not this one
                log.exception("could not load %s either", fallback.name)
        log.error("no model is loaded")
        self.unload()

    def _load_embeddings(self, pipe, already: EmbeddingSet | None = None) -> EmbeddingSet:
        try:
            found = load_embeddings(pipe, self.settings.embeddings_folder, already)
        except Exception as err:  # the model works without them: say why, and go on
            log.warning("textual inversion embeddings from %s were not loaded: %s: %s",
                        self.settings.embeddings_folder, type(err).__name__, err)
            return already or EmbeddingSet()
        if found.loaded or found.skipped:
            log.info("embeddings loaded: %d; skipped: %s", len(found.loaded),
                     ", ".join(f"{name} ({e.skipped})" for name, e in found.skipped.items()) or "none")
        return found

    def refresh_embeddings(self) -> EmbeddingSet:
        """Read the embeddings folder again (the API's refresh-embeddings): new and changed files get rows of
        their own; a deleted one stays loaded until the model is loaded again."""
        if self.pipe is None:
            return self.embeddings
        self.embeddings = self._load_embeddings(self.pipe, self.embeddings)
        return self.embeddings

    def ti_hashes(self, request: GenerationRequest) -> str | None:
        """The infotext's "TI hashes" ("name: hash, ..."): the embeddings the prompt or negative prompt uses."""
        if self.tokenizer is None:
            return None
        texts = [text for phase in _all_phases(request) for text in (phase.prompt, phase.negative)]  # what is read
        used = used_embeddings(self.tokenizer, texts, self.embeddings.loaded)
        return ", ".join(f"{e.name.translate(str.maketrans('', '', ':,'))}: {e.short_hash}" for e in used
                         if e.short_hash) or None

    @property
    def needs_warm_up(self) -> bool:
        """The loaded model is compiled and has not run yet: its first image would pay the compile."""
        return self.pipe is not None and is_compiled(self.pipe) and not self._warmed_up

    def warm_up(self, on_step: StepCallback | None = None) -> None:
        """Compile now (the worker runs this right after a load), so no user's image pays for it: one image
        at the native size, batch 1, CFG on. Three steps: torch compiles the UNet on the first call and
        records its CUDA graph on the second; the VAE decoder's graph is recorded by the first real image."""
        if not self.needs_warm_up:
            return
        width, height = self.model.native_width, self.model.native_height
        log.info("compiling %s for %dx%d (the first start at a size; later starts reuse the cache)",
                 self.model.entry.name, width, height)
        started = time.perf_counter()
        try:
            self.generate(GenerationRequest(prompt="warm-up", steps=3), [0], on_step)
        finally:
            self._warmed_up = True  # tried once: a failure (out of memory, say) is not retried at every load
        log.info("warm-up done in %.1f s", time.perf_counter() - started)

    def use_pipeline(self, pipe, entry: ModelEntry, short_hash: str | None = None,
                     embeddings: EmbeddingSet | None = None) -> LoadedModel:
        """Adopt a pipeline that is already on its device (load() and the GPU benchmark use this), with the
        textual inversions already loaded into it (else they are loaded here)."""
        self.pipe = pipe
        self._lora_weights.forget()
        self._vae_weights.forget()
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._warmed_up = False
        self._on_device = True
        # an SDXL refiner (loaded for a run's refiner) has the second tokenizer and text encoder alone
        first = pipe.text_encoder is not None
        # kept while the weights are released: the UI's token counter needs it
        self.tokenizer = pipe.tokenizer if first else pipe.tokenizer_2
        self.embeddings = embeddings if embeddings is not None else self._load_embeddings(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        text_encoder = pipe.text_encoder if first else pipe.text_encoder_2
        self.model = LoadedModel(entry, short_hash, size, size, text_encoder.config.num_hidden_layers,
                                 inpainting=takes_masked_picture(pipe.unet), edit=takes_edit_picture(pipe.unet),
                                 sdxl=is_sdxl(pipe))
        return self.model

    def unload(self) -> None:
        """Drop the current pipeline and give its memory back before another is used."""
        self.pipe = self.tokenizer = None
        self._lora_weights.forget()
        self._vae_weights.forget()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def released(self) -> bool:
        """A model is loaded but released from its device (release_device); the next image brings it back."""
        return self.model is not None and not self._on_device

    def release_device(self) -> bool:
        """Give the model's memory back to other programs (the API's unload-checkpoint) until the next image
        needs it. The weights wait in RAM when they can move there; a compiled, offloaded or CPU model is
        dropped instead and read again from disk. False when there was nothing to release."""
        if self.model is None or self.released:
            return False
        if is_compiled(self.pipe) or not park_on_cpu(self.pipe, self.settings, self.placement):
            self.pipe = None  # the compiled graphs hold device memory of their own; the CPU has nowhere to park
            self._lora_weights.forget()  # else its kept originals would keep the dropped layers alive
            self._vae_weights.forget()  # and the model's own VAE weights, kept while a file's are in
        self._on_device = False
        self.upscalers.forget()  # a model upscaler's network on the device too
        self.faces.forget()
        self.interrogator.forget()
        self.controlnets.forget()
        self.hypernetworks.forget()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("released %s from %s until the next image", self.model.entry.name, self.placement.device)
        return True

    def restore_device(self) -> LoadedModel:
        """Bring a released model back onto its device (the API's reload-checkpoint; every image does it too)."""
        model = self.require_model()
        if not self.released:
            return model
        if self.pipe is None:
            return self._load_entry(model.entry)
        try:
            self.pipe.to(self.placement.device)
        except Exception as err:  # most likely out of memory: the program it was released for still holds it
            self.pipe.to("cpu")  # all of it back in RAM, not half on the device
            raise ModelLoadError(f"could not move {model.entry.name} back to {self.placement.device} ({err}); another "
                                 "program may still hold its memory: free it and try again") from err
        self._on_device = True
        return model

    def use_vae(self, choice: str) -> VaeFile | None:
        """Make the loaded model decode and encode with the VAE `choice` names (Automatic, None or a file of the
        VAE folder); the file now in use, None for the model's own. VaeError when it cannot be used."""
        chosen = self.vaes.resolve(choice, self.require_model().entry)
        self._vae_weights.use(self.pipe.vae, chosen)
        return chosen

    def check_vae_fits(self, choice: str) -> None:
        """VaeError where the VAE file `choice` names would not fit the loaded model's VAE (a LoRA's file, another
        model family's): its weights are read, not used. Nothing to check with no model loaded."""
        model, pipe = self.model, self.pipe
        chosen = self.vaes.resolve(choice, model.entry) if model is not None and pipe is not None else None
        if chosen is not None:
            try:
                read_vae_weights(chosen.path, pipe.vae)
            except VaeError as err:
                raise VaeError(f"sd_vae: {err}") from None

    def upscale_picture(self, picture: Image.Image, size: tuple[int, int], upscaler: str) -> Image.Image:
        """The RGB picture at `size` (width, height) by a picture upscaler: a filter, or a model upscaler run on
        the model's device (UpscalerError when it cannot be used)."""
        return self.upscalers.resize(picture, size, upscaler, *self._tool_device())

    def restore_faces(self, picture: Image.Image, restorer: str, codeformer_weight: float) -> Image.Image:
        """The picture with its faces drawn again by the face restorer, on the model's device (in float32)."""
        return self.faces.restore(picture, restorer, codeformer_weight, self._tool_device()[0])

    def _tool_device(self) -> tuple[str, torch.dtype]:
        """Where the upscalers' and Interrogate's networks run, and in what precision: the model's device."""
        placement = self.placement or pick_placement(self.settings)
        device = self.tool_device_name or placement.device
        return device, placement.dtype if device != "cpu" else torch.float32

    def interrogate(self, picture: Image.Image) -> str:
        """A1111's Interrogate CLIP: a prompt describing the picture (InterrogateError when the models cannot be
        had)."""
        return self.interrogator.describe(picture, *self._tool_device())

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise ModelLoadError("no model is loaded; pick one in the model list")
        return self.model

    # --- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest, seeds: list[int], on_step: StepCallback | None = None,
                 subseeds: list[int] | None = None, init_image: Image.Image | list[Image.Image] | None = None,
                 inpainting: Inpainting | None = None, control: Image.Image | None = None,
                 color_reference: Image.Image | None = None) -> list[EngineImage]:
        """Denoise and decode one batch: image i uses seeds[i], and subseeds[i] as its variation seed when the
        request has a variation strength. img2img starts from init_image (RGB, at the run's size; a list gives
        each image its own, as SD upscale's tiles); inpainting draws again only where `inpainting` says; ControlNet
        steers by `control`, the control map (fitted to each pass's size here). Colour correction matches the
        results to color_reference where given, else to init_image."""
        if request.is_img2img != (init_image is not None):
            raise ValueError("an img2img request needs its init image, and only it may have one")
        if request.is_inpainting != (inpainting is not None):
            raise ValueError("an inpainting request needs its Inpainting, and only it may have one")
        if request.uses_controlnet != (control is not None):
            raise ValueError("a ControlNet request needs its control map, and only it may have one")
        main = self.require_model()
        problem = (main.sdxl and sdxl_problem(request)) or (main.edit and edit_problem(request))
        if problem:
            raise ValueError(problem)
        try:
            images = self._generate_and_return(main, request, seeds, on_step, subseeds, init_image, inpainting,
                                               control, color_reference)
        except COMPILER_FAILURES as err:
            if not is_compiled(self.pipe):
                raise
            # A compiler bug or an unsupported GPU must not cost the user the model: run it uncompiled.
            log.warning("torch.compile failed (%s: %s); running %s uncompiled from now on",
                        type(err).__name__, str(err).splitlines()[0], self.model.entry.name)
            undo_compile(self.pipe)
            images = self._generate_and_return(main, request, seeds, on_step, subseeds, init_image, inpainting,
                                               control, color_reference)
        self._warmed_up = True  # whatever ran has compiled its shapes
        if is_compiled(self.pipe) and not request.tiling:  # a tiled run runs eagerly: it compiled nothing
            self._compiled_shapes.record(self._shape_keys(request, len(seeds)))
        return images

    def _generate_and_return(self, main: LoadedModel, request: GenerationRequest, *args) -> list[EngineImage]:
        """_generate, and the model it started with loaded again after it: a refiner or hires checkpoint that took
        over is dropped, so the next batch and the next job begin with the main model (A1111 too loads it again)."""
        try:
            images = self._generate(request, *args)
        except BaseException:
            try:
                self._return_to(main, request)
            except Exception:  # the run's own error is the one to report
                log.exception("could not load %s again after another checkpoint", main.entry.name)
            raise
        self._return_to(main, request)
        return images

    def _return_to(self, main: LoadedModel, request: GenerationRequest) -> None:
        if self.model is not None and self.model.entry == main.entry:
            return
        log.info("loading %s again after another checkpoint (refiner, hires checkpoint)", main.entry.name)
        self._switch_to(main.entry)
        self.use_vae(request.sd_vae)  # the job's VAE pick, which the worker made for the main model

    def _take_over(self, request: GenerationRequest, run: "_Run", field: str) -> None:
        """Load the checkpoint the request's `field` names (its refiner, its hires checkpoint) in place of the running
        model (whose weights go, as in A1111), with the job's LoRAs, VAE pick and Tiling; it must be of the running
        model's kind to go on from its latents. Its own text encoder reads the prompts again."""
        main_kind = kind_of_pipeline(self.pipe)
        entry = self.registry.find(getattr(request, field))
        log.info("switching to %s (%s)", entry.name, field)
        with torch.inference_mode(False):  # weights read under inference mode could never be patched again
            self._switch_to(entry, refiner=field == "refiner_checkpoint")
            problem = kind_problem(main_kind, kind_of_pipeline(self.pipe), entry.name, field)
            if problem:
                raise ValueError(problem)
            if is_sdxl_refiner(self.pipe) and lora_uses(request.prompt):
                # SDXL LoRAs are made for the base's layers (the refiner's are of other widths): the base's part only
                log.info("LoRAs are not applied to the SDXL refiner %s; they changed the model's part of the run",
                         entry.name)
            else:
                self._use_loras(request)
            self.use_vae(request.sd_vae)
        run.tiled.enter_context(seamless(self.pipe, request.tiling))
        run.encoded.clear()  # the encodes so far are the other text encoder's

    def _refiner_call(self, request: GenerationRequest, steps: int, schedule: int, sampler: tuple[str, str],
                      hires_pass: bool) -> int | None:
        """Which model call of this pass the refiner takes over at; None when it does not (no refiner, not in this
        pass of a hires fix, the refiner is the running model already, or the pass does not get as far as the
        switch)."""
        if (not request.refiner_checkpoint or not request.refiner_in(hires_pass)
                or self.registry.find(request.refiner_checkpoint) == self.model.entry):
            return None
        # The timesteps the pass will run, from a scheduler of its own kind (the pass's own is set by diffusers).
        scheduler = self._pass_scheduler(request, sampler, steps, hires_pass)
        timesteps = pass_timesteps(scheduler, schedule, steps)
        if request.refiner_switch_by_sample_steps:
            return first_refiner_call_by_count(len(timesteps), steps, scheduler.order, request.refiner_switch_at)
        return first_refiner_call(timesteps, request.refiner_switch_at)

    def _uncond_skips(self, request: GenerationRequest, steps: int, schedule: int, sampler: tuple[str, str],
                      images: int, hires_pass: bool) -> SkipCalls | None:
        """The model calls of this pass that leave the negative prompt out (Skip Early CFG, NGMS), or None."""
        skip = UncondSkip(request.skip_early_cond, request.s_min_uncond, request.s_min_uncond_all)
        if not skip.active or request.cfg_scale <= 1:
            return None
        scheduler = self._pass_scheduler(request, sampler, steps, hires_pass)
        plan = skip_plan(skip, pass_timesteps(scheduler, schedule, steps), scheduler.alphas_cumprod,
                         steps * scheduler.order)  # A1111's count: steps x 2 for a second-order sampler
        return SkipCalls(plan, images) if any(plan) else None

    def pending_compiles(self, request: GenerationRequest, batch_size: int) -> list[str]:
        """The parts ("UNet", "VAE decoder") that will compile before this batch can run: a compiled
        model at shapes it has not run yet."""
        if self.pipe is None or not is_compiled(self.pipe) or request.tiling:
            return []
        return self._compiled_shapes.pending(self._shape_keys(request, batch_size))

    def _shape_keys(self, request: GenerationRequest, batch_size: int) -> dict[str, tuple]:
        """What picks a compiled variant: the input shapes, and the timestep dtype (samplers differ). The hires
        fix runs the UNet at a second size, and decodes there (and at the first size for a picture upscaler)."""
        pipe = self.pipe
        sizes = [self.require_model().size_for(request)]
        if request.enable_hr:
            sizes.append(hires_size(*sizes[0], request.hr_scale, request.hr_resize_x, request.hr_resize_y).final)
        decoded = sizes[-1:] if not request.enable_hr or request.hr_upscaler in LATENT_UPSCALERS else sizes
        samplers = [(request.sampler_name, request.scheduler), request.hires_sampler][:len(sizes)]
        passes = [_phases(request)] + ([_hires_phases(request)] if request.enable_hr else [])
        merging = [request.token_merging_ratio, request.hires_token_merging_ratio]
        unet_rows = batch_size * (2 if request.cfg_scale > 1 else 1)  # CFG runs both prompts in one batch
        factor = pipe.vae_scale_factor
        keys = {"UNet": set()}
        hypernetworks = [hypernetwork_uses(request.prompt), hypernetwork_uses(request.hires_prompts[0])]
        # (steps, schedule) of each pass: whether one leaves the negative prompt out of a call depends on them
        lengths = [(request.denoising_steps, request.img2img_schedule)] + (
            [(request.hires_steps, schedule_steps(request.hires_steps, request.denoising_strength))]
            if request.enable_hr else [])
        for hires_pass, (width, height), sampler, phases, bent, ratio, (steps, schedule) in zip(
                (False, True), sizes, samplers, passes, hypernetworks, merging, lengths):
            skips = self._uncond_skips(request, steps, schedule, sampler, batch_size, hires_pass) is not None
            uncompiled_pass = (_part_weights(phases) is not None or request.uses_controlnet or bent or skips or ratio
                               or _reads_uncond_rows(sampler[0]))
            if uncompiled_pass:
                continue
            dtype = self._timestep_dtype(*sampler, request.steps)
            keys["UNet"] |= {(height // factor, width // factor, unet_rows, max(chunks), dtype,
                              pipe.unet.config.cross_attention_dim) for chunks in self._chunk_counts(phases, request)}
        whole = [(width, height) for width, height in decoded if not decodes_in_tiles(width, height)]
        if whole:  # tiles are decoded uncompiled
            keys["VAE decoder"] = {(height // factor, width // factor, batch_size, pipe.vae.config.latent_channels)
                                   for width, height in whole}
        return keys

    def _scheduler(self, sampler_name: str, schedule: str, shape: ScheduleShape = ScheduleShape(),
                   unipc: UniPCOptions = UniPCOptions(), pass_steps: int | None = None, from_noise: bool = False):
        """A fresh scheduler of this sampler and schedule type for the loaded model (`shape`: A1111's options that
        reshape the schedule; `unipc`: its UniPC settings; `pass_steps`: the steps of the schedule's tail a pass
        runs; `from_noise`: the pass is txt2img's, from pure noise)."""
        return keeping_estimates(make_scheduler(self._base_scheduler_config, sampler_name, schedule,
                                                sdxl=is_sdxl(self.pipe), shape=shape, unipc=unipc,
                                                pass_steps=pass_steps, from_noise=from_noise))

    def _pass_scheduler(self, request: GenerationRequest, sampler: tuple[str, str], steps: int, hires_pass: bool):
        """A fresh scheduler as a pass of `steps` steps runs it: the sampler's options (eta moves DPM2 a's calls), the
        request's schedule shape, the tail it runs (Restart plans over it), and whether it starts from noise
        (txt2img's first pass; A1111's timestep samplers lay that out their own way). What plans a pass's model
        calls ahead (the refiner switch, skipped negative rows) must see the calls the pass makes."""
        scheduler = self._scheduler(*sampler, shape=request.schedule_shape, unipc=request.unipc_options,
                                    pass_steps=steps, from_noise=not (hires_pass or request.is_img2img))
        use_step_options(scheduler, sampler[0], StepOptions.of(request))
        return scheduler

    @property
    def model_scheduler_config(self) -> dict:
        """The loaded model's own scheduler config (the pipeline's scheduler is the last pass's, reshaped by its
        options: a Zero Terminal SNR run's betas)."""
        return dict(self._base_scheduler_config)

    def sigma_table(self, shape: ScheduleShape = ScheduleShape()) -> np.ndarray:
        """The loaded model's sigma at each training timestep, smallest first, under the shape's noise schedule (and
        fp16 rounding, where asked)."""
        noise_levels = ScheduleShape(noise_schedule=shape.noise_schedule, downcast_alpha_bar=shape.downcast_alpha_bar)
        return model_sigmas(self._scheduler("Euler", "Automatic", noise_levels))

    def _start_noise_factor(self, request: GenerationRequest) -> float:
        """What txt2img's unit noise is multiplied by besides the scheduler's start level, so that a k-diffusion sampler
        starts where A1111's does: from sigma0 x noise, or with A1111's SGM noise multiplier sqrt(1 + sigma0²) x noise,
        as the SGM code starts. DPM++ 2M and its kin step x / sqrt(1 + sigma²) from diffusers' unit noise, which is
        SGM's start: theirs is sigma0 / sqrt(1 + sigma0²) without it. Other samplers start from their own level."""
        if not get_sampler(request.sampler_name).k_diffusion:
            return 1.0
        scheduler = self._scheduler(request.sampler_name, request.scheduler, shape=request.schedule_shape)
        scaled_to_unit_variance = hasattr(scheduler, "_sigma_to_alpha_sigma_t")
        if not scaled_to_unit_variance and not request.uses_sgm_noise_multiplier:
            return 1.0
        scheduler.set_timesteps(request.steps)
        first = float(scheduler.sigmas[0])
        if scaled_to_unit_variance:
            return 1.0 if request.uses_sgm_noise_multiplier else first / math.sqrt(1.0 + first ** 2)
        return math.sqrt(1.0 + first ** 2) / float(scheduler.init_noise_sigma)

    def _timestep_dtype(self, sampler_name: str, schedule: str, steps: int) -> torch.dtype:
        scheduler = self._scheduler(sampler_name, schedule)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.dtype

    def _chunk_counts(self, phases: list[PromptPhase], request: GenerationRequest) -> set[tuple[int, int]]:
        """How many 75-token chunks the prompt (its longest part, when composed) and the negative prompt in use
        take, in each prompt phase, read as the request reads prompts."""
        tokenizer, reading = self.pipe.tokenizer, _prompt_reading(request)
        texts = {(phase.prompt, phase.negative) for phase in phases}
        return {(max(chunk_count(tokenizer, part, *reading) for part in part_texts(prompt)),
                 chunk_count(tokenizer, negative, *reading)) for prompt, negative in texts}

    def pads_prompts(self, request: GenerationRequest) -> bool:
        """Whether the shorter of prompt and negative prompt is padded with empty chunks to the other's
        length (classifier-free guidance runs both in one batch). It changes the picture a little; the
        infotext says so as A1111's "Pad conds", which A1111 then applies when the text is pasted there."""
        return request.cfg_scale > 1 and any(prompt != negative
                                             for prompt, negative in self._chunk_counts(_all_phases(request),
                                                                                         request))

    def lora_hashes(self, request: GenerationRequest) -> str | None:
        """The infotext's "Lora hashes" ("name: hash, ..."), None when the prompt names no LoRA."""
        hashes = []
        for use in lora_uses(request.prompt):
            try:
                digest = self.loras.short_hash(self.loras.find(use.name))
            except LoraError:  # deleted since the run: no hash, as A1111 leaves out a LoRA it has none for
                digest = None
            if digest:  # A1111 takes ":" and "," out of the name: they separate the entries
                hashes.append(f"{use.name.translate(str.maketrans('', '', ':,'))}: {digest}")
        return ", ".join(hashes) or None

    def without_loras(self) -> None:
        """The model's own weights again: the LoRAs the last run merged in taken out (embedding training)."""
        self._lora_weights.use(self.pipe, [])

    def _use_loras(self, request: GenerationRequest) -> None:
        uses = lora_uses(request.prompt)
        self._lora_weights.use(self.pipe, [(self.loras.find(use.name), use) for use in uses])

    def _generate(self, request: GenerationRequest, seeds: list[int], on_step: StepCallback | None,
                  subseeds: list[int] | None = None, init_image: Image.Image | list[Image.Image] | None = None,
                  inpainting: Inpainting | None = None, control: Image.Image | None = None,
                  color_reference: Image.Image | None = None) -> list[EngineImage]:
        model = self.require_model()
        self._use_loras(request)  # also when it names none: the last run's LoRAs come out
        width, height = model.size_for(request)
        # Noise comes from CPU generators, one per image, so a seed gives the same picture on any
        # device and image i of a batch equals a single run with its seed.
        run = _Run(list(seeds), on_step, request.total_steps, request.eta_noise_seed_delta,
                   subseeds if request.subseed_strength > 0 else None, request.subseed_strength,
                   request.seed_resize, request.randn_source or "CPU")
        run.control = self._control_unit(request, control)  # out of inference mode: its weights may be read now
        run.hypernetworks, run.hires_hypernetworks = self._hypernetworks(request)
        factor = self.pipe.vae_scale_factor
        # what each result's colours are matched to: the start picture, or the reference the job gives (Loopback's)
        colours = (init_image if color_reference is None else color_reference) if request.color_correction else None
        with torch.inference_mode(), run.tiled:
            run.tiled.enter_context(seamless(self.pipe, request.tiling))
            try:
                noise = self._start_noise(run, (height // factor, width // factor))
                extra = self._extra_channels((width, height), init_image, inpainting, request)
                if init_image is None:
                    start = {"width": width, "height": height, "latents": noise * self._start_noise_factor(request)}
                    latents = self._denoise(self.pipe, request, run, _phases(request), request.steps, request.steps,
                                            start, extra)
                else:
                    latents = self._img2img_pass(request, run, noise, init_image, inpainting, extra)
                if request.enable_hr:
                    if "highres_fix" in request.copies_before:
                        run.earlier["highres_fix"] = to_pil_images(self.decode(
                            latents, tiled=decodes_in_tiles(width, height, request.tiling)))
                    latents = self._hires_pass(request, run, latents, width, height)
            except DenoisingStopped as stopped:
                if run.latents is not None and torch.isfinite(run.latents).all():
                    try:
                        stopped.images = self._to_images(run.latents, request, run, inpainting, colours)
                    except Exception:  # the stop matters, not the picture it would have left
                        log.exception("the image cut short could not be decoded")
                raise
            return self._to_images(latents, request, run, inpainting, colours)

    def _hypernetworks(self, request: GenerationRequest) -> tuple[list, list]:
        """The (network, multiplier) pairs of the first pass's prompt and of the hires pass's, read from their files
        (one read for both) and on the model's device."""
        first = hypernetwork_uses(request.prompt)
        hires = hypernetwork_uses(request.hires_prompts[0]) if request.enable_hr else []
        networks = self.hypernetworks.networks([*first, *hires], self.pipe._execution_device)
        return networks[:len(first)], networks[len(first):]

    def _control_unit(self, request: GenerationRequest, control: Image.Image | None) -> ControlUnit | None:
        """The request's ControlNet with its map (None without one), on the model's device in its UNet's dtype."""
        if control is None:
            return None
        unet = self.pipe.unet
        network = self.controlnets.network(self.controlnets.check(request.controlnet_model, unet.config), unet.config,
                                           self.pipe._execution_device, unet.dtype)
        return ControlUnit(network, control, request.controlnet_weight, request.controlnet_guidance_start,
                           request.controlnet_guidance_end, request.controlnet_resize_mode)

    def _img2img_pass(self, request: GenerationRequest, run: "_Run", noise: torch.Tensor,
                      init_image: Image.Image | list[Image.Image],
                      inpainting: Inpainting | None, extra: torch.Tensor | EditPicture | None) -> torch.Tensor:
        """img2img's pass: the last denoising_steps of the steps, from the picture's latents noised to where they
        start; with inpainting, the picture's latents put back outside the mask after every step and at the end."""
        picture = self._start_latents(init_image, (noise.shape[-1], noise.shape[-2]), noise.shape[0])
        if request.initial_noise_multiplier != 1:  # A1111's Noise multiplier for img2img
            noise = noise * request.initial_noise_multiplier
        if inpainting is not None:
            fill = self._fill_noise(run, noise) if MASKED_CONTENT[inpainting.fill] == "latent noise" else None
            run.masked = self._masked_start(picture, noise, inpainting, fill, SoftInpainting.of(request))
            picture = run.masked.start
        start = {"image": picture, "strength": pipeline_strength(request.denoising_steps, request.img2img_schedule)}
        latents = self._denoise(self._img2img_pipeline(noise, request.img2img_extra_noise), request, run,
                                _phases(request), request.denoising_steps, request.img2img_schedule, start, extra)
        return latents if run.masked is None else run.masked.finish(latents)

    def _extra_channels(self, size: tuple[int, int], picture: Image.Image | list[Image.Image] | None = None,
                        inpainting: Inpainting | None = None, request: GenerationRequest | None = None
                        ) -> torch.Tensor | EditPicture | None:
        """A model's extra input for a pass at `size` (pixels). An inpainting model's: the inpainted part of the
        start picture and its mask (soft inpainting's unrounded, as A1111's), or (txt2img, img2img, the hires pass)
        all of it to draw. An instruct-pix2pix model's: the start picture (its latents unscaled, as it was trained)
        with the request's guidance, or none (zeros). None for other models."""
        unet, factor = self.pipe.unet, self.pipe.vae_scale_factor
        if takes_edit_picture(unet):
            latent_size = (size[0] // factor, size[1] // factor)
            if picture is None:
                return torch.zeros(1, self.pipe.vae.config.latent_channels, latent_size[1], latent_size[0])
            latents = self._start_latents(picture, latent_size, 1) / self.pipe.vae.config.scaling_factor
            return EditPicture(latents, request.cfg_scale, request.image_cfg_scale)
        if not takes_masked_picture(unet):
            return None
        weight = _mask_weight(request)
        if inpainting is None:
            return masked_picture_input(self.encode, size, picture if weight < 1 else None, weight=weight)
        return masked_picture_input(self.encode, size, picture, inpainting.mask,
                                    rounded=not (request and request.soft_inpainting), weight=weight)

    def _hires_extra_channels(self, size: tuple[int, int], latents: torch.Tensor,
                              pictures: list[Image.Image] | None, request: GenerationRequest
                              ) -> torch.Tensor | EditPicture | None:
        """The hires pass's extra input, by the model that runs it. An inpainting model's picture is the enlarged
        first pass (`pictures`, else, as A1111 does for this alone, the enlarged latents decoded) where the mask
        strength lets it show; otherwise grey, as in txt2img."""
        if not takes_masked_picture(self.pipe.unet) or _mask_weight(request) >= 1:
            return self._extra_channels(size)
        if pictures is None:
            pictures = to_pil_images(self.decode(latents, tiled=decodes_in_tiles(*size, request.tiling)))
        return masked_picture_input(self.encode, size, pictures, weight=_mask_weight(request))

    def _start_latents(self, picture: Image.Image | list[Image.Image], size: tuple[int, int],
                       count: int) -> torch.Tensor:
        """img2img's start: the picture's latents, `count` rows (a list of `count` pictures: one row each);
        stretched to `size` (latent width x height) when the picture comes at its own size (resize mode "Just
        resize (latent upscale)")."""
        if isinstance(picture, list):
            return torch.cat([self.encode(one) for one in picture])
        latents = self.encode(picture)
        if latents.shape[-2:] != (size[1], size[0]):
            latents = upscale_latents(latents, "Latent", size)
        return latents.expand(count, -1, -1, -1)

    @staticmethod
    def _fill_noise(run: "_Run", noise: torch.Tensor) -> torch.Tensor:
        """Masked content "latent noise": each seed's own noise, as A1111 fills (create_random_tensors of the seeds
        alone): not moved by a variation seed, not drawn at the seed resize's size, not scaled by the Noise
        multiplier, whatever the start noise is."""
        return start_noise([make_generator(run.rng, seed) for seed in run.seeds], tuple(noise.shape[1:]), noise.dtype,
                           source=run.rng)

    def _masked_start(self, picture: torch.Tensor, noise: torch.Tensor, inpainting: Inpainting,
                      fill: torch.Tensor | None = None, soft: SoftInpainting | None = None) -> _MaskedStart:
        """Inpainting's start: the picture's latents, and where the masked content is latent noise or nothing,
        the seed's noise (`fill`, where not `noise`) or zeros in the part drawn again (as A1111). Soft inpainting
        keeps the mask's shades (A1111 leaves its latent mask unrounded then)."""
        keep = inpainting.latent_keep(picture.shape[-2:], rounded=soft is None).to(picture.device, picture.dtype)
        noise = noise.to(picture.device, picture.dtype)
        content = MASKED_CONTENT[inpainting.fill]
        if content == "latent noise":
            picture = picture * keep + (noise if fill is None else fill.to(noise)) * (1 - keep)
        elif content == "latent nothing":
            picture = picture * keep
        return _MaskedStart(picture, noise, keep, soft)

    def _denoise(self, pipe, request: GenerationRequest, run: "_Run", phases: list[PromptPhase], steps: int,
                 schedule: int, start: dict, extra: torch.Tensor | EditPicture | None = None,
                 sampler: tuple[str, str] | None = None, merging: float | None = None,
                 hires_pass: bool = False) -> torch.Tensor:
        """One denoising pass of a pipeline (txt2img's, or img2img's from `start`'s latents): the last `steps` of a
        schedule of `schedule` steps, its prompt phases read at the steps they cover; the latents it ends with.
        `extra`: an inpainting or instruct-pix2pix model's extra input for this pass; `sampler`, `merging`: its sampler and
        schedule type, its token merging ratio, when not the request's own (the hires fix's); `hires_pass`: this is
        the hires fix's pass (the refiner's pass setting tells which it takes over in)."""
        sampler = sampler or (request.sampler_name, request.scheduler)
        merging = request.token_merging_ratio if merging is None else merging
        pipe.scheduler = self._pass_scheduler(request, sampler, steps, hires_pass)
        if "strength" in start and runs_its_own_calls(pipe.scheduler, schedule):  # (the pipeline sets it again)
            start = start | {"strength": 1.0}  # img2img on A1111's timesteps: all are the pass's calls, no tail
        if run.rng == "NV":
            drawing_from_philox(pipe.scheduler)
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            # DPM++ SDE draws its Brownian noise from its own seeds (else from torch's global RNG).
            pipe.scheduler.noise_sampler_seed = list(run.seeds)  # the seeds, not ENSD's (as A1111)
        if get_sampler(sampler[0]).name in MULTISTEP_SDE_SAMPLERS:
            with_brownian_noise(pipe.scheduler, list(run.seeds))  # likewise
        cfgpp = _uncond_recorder(pipe.scheduler, len(run.generators))
        done_before = run.done
        phase = 0  # the prompt phase the next model call reads
        refiner_call = self._refiner_call(request, steps, schedule, sampler, hires_pass)
        weights = _part_weights(phases)
        control = run.control and ControlPass(run.control, pipe, steps, pipe.vae_scale_factor)
        skips = self._uncond_skips(request, steps, schedule, sampler, len(run.generators), hires_pass)
        hooks = contextlib.ExitStack()  # a refiner's UNet gets the hooks the model's has

        def encode():
            return self._encode_phases(phases, len(run.generators), request, run.between_encodes, run.encoded)

        def to_refiner(pipeline):
            nonlocal embeddings
            self._take_over(request, run, "refiner_checkpoint")
            pipeline.unet = self.pipe.unet  # the scheduler, and so the sampler's state, goes on
            embeddings = encode()
            if control and is_sdxl_refiner(self.pipe):  # the worker refuses it first where the files tell
                raise ValueError(CONTROLNET_WITH_SDXL_REFINER)
            if is_sdxl_refiner(self.pipe):  # its own size numbers; eager, as the hook is new to a compiled UNet
                hooks.enter_context(uncompiled())
                hooks.enter_context(scored(pipeline))
            hooks.enter_context(composed_guidance(pipeline.unet, weights))
            hooks.enter_context(controlled(pipeline.unet, control))
            hooks.enter_context(model_input(pipeline.unet, extra))
            hooks.enter_context(bent_attention([pipeline.unet], run.hypernetworks))
            hooks.enter_context(skipping_uncond(pipeline.unet, skips))
            hooks.enter_context(merged_tokens(pipeline.unet, merging))
            hooks.enter_context(stoppable_inside_calls(pipeline.unet, run.between_encodes))
            hooks.enter_context(cfgpp(pipeline.unet))

        def scored(pipeline):
            return aesthetic_scores(pipeline, request.sdxl_refiner_high_aesthetic_score,
                                    request.sdxl_refiner_low_aesthetic_score)

        embeddings = encode()

        def step_end(pipeline, call, timestep, tensors):
            nonlocal phase
            step = sampler_steps_done(call + 1, pipeline.num_timesteps, steps, pipeline.scheduler)
            latents = run.after_step(pipeline, call, tensors["latents"])
            run.step(done_before + step, latents, denoised_estimate(pipeline.scheduler))
            changed = {} if latents is tensors["latents"] else {"latents": latents}
            switching = refiner_call == call + 1
            if switching:
                to_refiner(pipeline)
            following = phase_at(phases, step)
            if following == phase and not switching:
                return changed
            phase = following
            return changed | embeddings[phase].step_inputs(pipeline.do_classifier_free_guidance)

        if weights is not None and pipe.unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("this model is LCM-distilled and runs without classifier-free guidance, which AND and a "
                             "prompt's own weight need; remove them, or pick another model")
        # A composed pass runs a row per part: another batch shape, and hooks a compiled graph would bake in; a
        # controlled one gives the UNet inputs of its own; one that skips the negative rows, a batch half as large;
        # hypernetworks and token merging hook its attention.
        eager = (uncompiled() if weights is not None or control or skips or run.hypernetworks or merging
                 or is_sdxl_refiner(pipe) or _reads_uncond_rows(sampler[0]) else contextlib.nullcontext())
        # A pass that starts on an SDXL refiner (the hires pass after it took over) gets its size numbers first.
        scoring = scored(pipe) if is_sdxl_refiner(pipe) else contextlib.nullcontext()
        # As A1111, a ControlNet's own attention reads through the hypernetworks too.
        bent = bent_attention([pipe.unet, *([run.control.network] if run.control else [])], run.hypernetworks)
        with (eager, scoring, composed_guidance(pipe.unet, weights), controlled(pipe.unet, control),
              model_input(pipe.unet, extra), brownian_draws_from(run.rng),
              skipping_uncond(pipe.unet, skips), bent, merged_tokens(pipe.unet, merging),
              stoppable_inside_calls(pipe.unet, run.between_encodes), cfgpp(pipe.unet), hooks):
            if refiner_call == 0:  # the pass starts past the switch (img2img, the hires fix)
                to_refiner(pipe)
            # SDXL's size conditioning is left to the pipeline: original and target size are the pass's (the
            # hires pass's its own), the crop 0,0, as A1111 conditions SDXL. An SDXL refiner's: aesthetic_scores.
            sizes = refiner_size_inputs() if is_sdxl_refiner(self.pipe) and pipe.unet is self.pipe.unet else {}
            latents = pipe(
                **sizes,
                **embeddings[0].call_inputs(),
                num_inference_steps=schedule,
                guidance_scale=request.cfg_scale,
                generator=run.generators,
                output_type="latent",
                callback_on_step_end=step_end,
                **start,
            ).images
        run.done = done_before + steps
        if not torch.isfinite(latents).all():  # decoding them would give a black picture
            raise NonFiniteOutput(_nan_advice(pipe.unet.dtype, request))
        return latents

    def _hires_pass(self, request: GenerationRequest, run: "_Run", latents: torch.Tensor, width: int,
                    height: int) -> torch.Tensor:
        """A1111's hires fix: the first pass's latents enlarged (in latent space, or as pictures), then denoised
        again from denoising_strength for the hires steps, with the prompt phases counted over those steps. A hires
        checkpoint runs that pass in place of whichever model ended the first (the model, or its refiner); a refiner
        takes over from it at its switch, as from the model (A1111's order)."""
        size = hires_size(width, height, request.hr_scale, request.hr_resize_x, request.hr_resize_y)
        factor = self.pipe.vae_scale_factor
        upscaled = (size.upscaled[0] // factor, size.upscaled[1] // factor)
        pictures = None
        if request.hr_upscaler in LATENT_UPSCALERS:
            latents = upscale_latents(latents, request.hr_upscaler, upscaled)
        else:  # the safety checker looks at the finished picture only, as in A1111
            pictures = to_pil_images(self.decode(latents, tiled=decodes_in_tiles(width, height, request.tiling)))
        if request.hr_checkpoint_name:  # A1111's Hires checkpoint runs the second pass (a refiner may take over later)
            self._take_over(request, run, "hr_checkpoint_name")
        if pictures is not None:  # decoded by the first pass's VAE, encoded by the second's, as A1111 does
            pictures = [self.upscale_picture(picture, size.upscaled, request.hr_upscaler) for picture in pictures]
            latents = torch.cat([self.encode(picture) for picture in pictures])
        final = (size.final[0] // factor, size.final[1] // factor)
        latents = crop_center(latents, final)
        if pictures is not None:  # as the latents: the middle of each
            pictures = [crop_center_picture(picture, size.final, factor) for picture in pictures]
        # A1111 runs exactly the hires steps, as the last of a longer schedule that starts denoising_strength deep.
        schedule = schedule_steps(request.hires_steps, request.denoising_strength)
        start = {"image": latents.contiguous(), "strength": pipeline_strength(request.hires_steps, schedule)}
        # As A1111, the second pass's noise is drawn afresh from each image's seed (and variation seed), and an
        # ancestral sampler's noise goes on from there, not from where the first pass left the streams.
        run.fresh_generators()
        pipe = self._img2img_pipeline(self._start_noise(run, (final[1], final[0])), request.img2img_extra_noise)
        run.hypernetworks = run.hires_hypernetworks
        return self._denoise(pipe, request, run, _hires_phases(request), request.hires_steps, schedule, start,
                             self._hires_extra_channels(size.final, latents, pictures, request), request.hires_sampler,
                             request.hires_token_merging_ratio, hires_pass=True)

    def _start_noise(self, run: "_Run", size: tuple[int, int]) -> torch.Tensor:
        """Each image's noise at `size` (latent height, width), drawn from the run's generator as diffusers draws
        it, drawn at the seed resize's size and put in the middle where the request has one, and moved towards its
        variation seed's where it has a variation strength (webui/engine/noise.py)."""
        channels, factor = self.pipe.vae.config.latent_channels, self.pipe.vae_scale_factor
        shape, from_shape = (channels, *size), None
        if run.seed_resize:
            from_shape = (channels, run.seed_resize[1] // factor, run.seed_resize[0] // factor)
        noise = start_noise(run.generators, shape, self.pipe.unet.dtype, run.subseeds, run.variation_strength,
                            from_shape if from_shape != shape else None, run.rng)
        run.after_start_noise()
        return noise

    def _encode_phases(self, phases: list[PromptPhase], count: int, request: GenerationRequest,
                       between_encodes: Callable[[], None] | None = None,
                       encoded: dict | None = None) -> list[_Conds]:
        """(prompt, negative) embeddings for each phase, `count` rows each, read with the request's Clip skip and
        emphasis mode. Each pair of texts is encoded once
        (in `encoded`, which a second pass shares), in one row shown `count` times (every image of a batch reads
        the same text; alternation repeats). `between_encodes` runs before each encode after the first, and may
        raise to stop."""
        encoded = {} if encoded is None else encoded
        for phase in phases:
            texts = (phase.prompt, phase.negative)
            if texts not in encoded:
                if encoded and between_encodes is not None:
                    between_encodes()
                encoded[texts] = self._encode_pair(phase.prompt, phase.negative, request.clip_skip,
                                                   _prompt_reading(request), bool(request.sdxl_clip_l_skip)
                                                   ).rows(count)
        return [encoded[(phase.prompt, phase.negative)] for phase in phases]

    def _encode_pair(self, prompt: str, negative: str, clip_skip: int, reading: tuple[str, int] = (ORIGINAL,
                     COMMA_BACKTRACK), sdxl_clip_skip: bool = False) -> _Conds:
        """One row of (prompt, negative) embeddings. A composed prompt's parts lie one after another along the
        tokens, and the negative prompt is repeated as often, so the two keep one shape (diffusers checks it);
        composed_guidance splits them again around the UNet; an SDXL model's pooled vectors likewise lie side by side.
        SDXL reads Clip skip only with `sdxl_clip_skip` (A1111's Clip skip SDXL setting), in CLIP-L alone.
        `reading`: the emphasis mode and the comma backtrack (_prompt_reading)."""
        sdxl, texts = is_sdxl(self.pipe), part_texts(prompt)
        clip_l_skip = clip_skip if sdxl_clip_skip else None
        emphasis, backtrack = reading
        if not is_composed(prompt):  # its text without a trailing ':1', which A1111 reads as the weight 1
            if sdxl:
                return _Conds(*encode_sdxl_pair(self.pipe, texts, [negative], emphasis, clip_l_skip, backtrack))
            return _Conds(*encode_prompt_pair(self.pipe, texts, [negative], clip_skip, emphasis, backtrack))
        if sdxl:
            conds, uncond, pooled, negative_pooled = encode_sdxl_parts(self.pipe, texts, negative, emphasis, clip_l_skip,
                                                                       backtrack)
        else:
            (conds, uncond), pooled = encode_parts(self.pipe, texts, negative, clip_skip, emphasis, backtrack), None
        count = conds.shape[0]
        joined = _Conds(conds.reshape(1, -1, conds.shape[-1]), uncond.repeat(1, count, 1))
        if pooled is None:
            return joined
        return joined._replace(pooled=pooled.reshape(1, -1), negative_pooled=negative_pooled.repeat(1, count))

    def _img2img_pipeline(self, noise: torch.Tensor, extra_noise: float = 0.0):
        """diffusers' img2img pipeline over the loaded model's components (shared, not copied), noising its start
        with `noise` (variation seeds move it; the hires pass draws its own), and `extra_noise` times it more
        (A1111's Extra noise). Built per run, which costs
        milliseconds, and not with from_pipe: that casts every part to one dtype, which would undo an fp32 VAE
        (--no-half-vae)."""
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

        if is_sdxl(self.pipe):  # no watermark: the latents are decoded here, not by the pipeline
            pipe = StableDiffusionXLImg2ImgPipeline(**self.pipe.components, add_watermarker=False)
        else:
            pipe = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)  # as the loaded pipeline: progress goes to the page
        pipe.prepare_latents = functools.partial(_noised_latents, pipe, noise, extra_noise)
        return pipe

    def encode(self, image: Image.Image) -> torch.Tensor:
        """An RGB picture -> its latents (one row), the mean of the VAE's encoding: a picture always gives the
        same start, whatever the seed. An fp16 VAE that overflows encodes again in fp32, as decode does."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(image).to(self.pipe._execution_device)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        if not torch.isfinite(latents).all() and vae.dtype != torch.float32:
            log.warning("VAE produced NaN in %s while encoding; running it in fp32 from now on", vae.dtype)
            vae.to(torch.float32)
            latents = vae.encode(pixels.to(torch.float32)).latent_dist.mean
        if not torch.isfinite(latents).all():
            raise NonFiniteOutput("the VAE produced NaN encoding the init image even in fp32: this model's VAE is "
                                  "broken; try another model")
        return (latents * vae.config.scaling_factor).to(self.pipe.unet.dtype)

    def _to_images(self, latents: torch.Tensor, request: GenerationRequest, run: "_Run",
                   inpainting: Inpainting | None = None, colours: Image.Image | list[Image.Image] | None = None
                   ) -> list[EngineImage]:
        """Decoded, the faces drawn again (Restore faces, as A1111 does it before the rest), given the colours of
        `colours` (img2img's colour correction: a picture, or one per image), laid into the inpainted picture (with
        soft inpainting, through masks of where the latents changed), and past the safety checker (which sees what
        is saved). The steps of the request's copies_before leave a copy of each picture as it was before them (laid
        into the inpainted picture too), beside the run's earlier ones; a picture the safety checker flags keeps
        none."""
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        pictures = to_pil_images(self.decode(latents, tiled=decodes_in_tiles(width, height, request.tiling)))
        earlier, copies, masked = dict(run.earlier), request.copies_before, run.masked
        if request.restore_faces:
            if "face_restoration" in copies:
                earlier["face_restoration"] = pictures
            pictures = [self.restore_faces(picture, request.face_restoration_model, request.code_former_weight)
                        for picture in pictures]
        if colours is not None:
            if "color_correction" in copies:
                earlier["color_correction"] = pictures
            references = colours if isinstance(colours, list) else [colours] * len(pictures)
            pictures = [match_colors(picture, reference) for picture, reference in zip(pictures, references)]
        if inpainting is not None:
            overlays = [None] * len(pictures)
            if masked is not None and masked.soft is not None:
                overlays = masked.soft.pixel_masks(masked.start, latents, masked.drawn, (width, height))
            pictures = [inpainting.compose(picture, overlay) for picture, overlay in zip(pictures, overlays)]
            earlier = {step: [inpainting.compose(copy, overlay) for copy, overlay in zip(kept, overlays)]
                       for step, kept in earlier.items()}
        images, flags = self.check_safety(pictures)
        return [EngineImage(image, seed, flag, {} if flag else {step: kept[i] for step, kept in earlier.items()})
                for i, (image, seed, flag) in enumerate(zip(images, run.seeds, flags))]

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Latents -> pixels in [-1, 1]. A half-precision VAE can overflow to NaN (the black-image
        bug); when it does, decode again in fp32 and keep the VAE in fp32 from then on."""
        vae = self.pipe.vae
        scaled = latents / vae.config.scaling_factor
        if not tiled:
            return self._decode(scaled)
        # Tiles keep memory flat; their sizes vary at the edges, so they run uncompiled. Off again after: an encode
        # (img2img, the hires fix's picture upscaler) would otherwise run in tiles too.
        vae.enable_tiling()
        try:
            with uncompiled():
                return self._decode(scaled)
        finally:
            vae.disable_tiling()

    def _decode(self, scaled: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = vae.decode(scaled.to(vae.dtype)).sample
        if torch.isfinite(pixels).all():
            return pixels
        if vae.dtype != torch.float32:
            log.warning("VAE produced NaN in %s; decoding in fp32 from now on", vae.dtype)
            vae.to(torch.float32)
            pixels = vae.decode(scaled.to(torch.float32)).sample
            if torch.isfinite(pixels).all():
                return pixels
        raise NonFiniteOutput("the VAE produced NaN even in fp32: this model's VAE is broken; try another model")

    def check_safety(self, pictures: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Run the model's safety checker when it has one: flagged images come back black."""
        pipe = self.pipe
        if getattr(pipe, "safety_checker", None) is None:
            return pictures, [False] * len(pictures)
        as_array = np.stack([np.asarray(picture, dtype=np.float32) / 255 for picture in pictures])
        checked, flags = pipe.run_safety_checker(as_array, pipe._execution_device, pipe.text_encoder.dtype)
        flags = [bool(f) for f in (flags or [False] * len(pictures))]
        return pipe.image_processor.numpy_to_pil(checked), flags

    def preview(self, latents: torch.Tensor, method: str = "Approx cheap") -> Image.Image:
        """A live preview of the batch's first picture, by A1111's Live preview method (webui/engine/preview.py)."""
        pipe = self.pipe
        tiny = None
        if method == "TAESD" and latents.shape[1] == 4:
            tiny = self.tiny_decoders.decoder(is_sdxl(pipe), latents.device, pipe.vae.dtype)
        return latents_to_preview(latents, pipe.vae, method, tiny)

    def count_tokens(self, text: str, steps: int = 20, negative: bool = False, emphasis: str = ORIGINAL,
                     backtrack: int = COMMA_BACKTRACK) -> int:
        """Tokens the prompt uses, without start/end markers (the UI's 12/75 counter). With prompt editing or
        alternation, those of the longest text it reads in `steps` steps, and of its longest AND part (a negative
        prompt is not split), as A1111 counts."""
        tokenizer = self.tokenizer  # read once: the worker thread may swap models meanwhile
        if tokenizer is None:
            return 0
        # Past the prompt's length limit the request is refused anyway; never tokenize megabytes for a counter.
        variants = prompt_variants(strip_loras(text[:MAX_PROMPT_CHARS + 1]), steps)
        texts = variants if negative else [part for variant in variants for part in part_texts(variant)]
        return max(token_count(tokenizer, text, emphasis, backtrack) for text in texts)
