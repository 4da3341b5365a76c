"""The job queue and the one long-lived worker thread that owns the engine (pipeline + device).

The UI and the API submit jobs (`submit`), stop them (`cancel`, `skip`), read `Job` objects and the
queue, and queue model loads (`load_model`, `queue_model_load`) that run between jobs, in turn. Cancel
and skip are per job, checked at every sampler step: one user's Interrupt never touches another's job.
A job that raises is marked failed with its message and the worker goes on with the next one.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import datetime as dt
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from webui import __version__
from webui.controlnet import NO_PICTURE, controlnet_infotext
from webui.engine.controlnet import ControlNetError, request_map
from webui.engine.generate import (CONTROLNET_WITH_SDXL_REFINER, DenoisingStopped, Engine, EngineImage, LoadedModel,
                                   composition_problem, old_timelines_change_the_run)
from webui.engine.hires import LATENT_UPSCALERS, NO_UPSCALER
from webui.engine.img2img import (Enlarge, as_rgb, check_picture_size, enlarges, fit_image, image_sha1,
                                  size_from_image, upright_size)
from webui.engine.inpaint import Inpainting, prepare_inpainting, read_mask
from webui.engine.interrogate import INTERROGATE_MODEL
from webui.engine.loader import ModelLoadError
from webui.engine.models import ModelEntry, ModelNotFound
from webui.engine.refiner import SDXL, SDXL_REFINER, kind_of_entry, kind_problem
from webui.engine.instruct_pix2pix import edit_problem
from webui.engine.prompts import ORIGINAL
from webui.engine.sdxl import sdxl_problem
from webui.engine.samplers import ENDS_SCHEDULES, KARRAS_RHO, OLD_KARRAS_ENDS, POLYEXPONENTIAL_RHO
from webui.engine.single_file import sdxl_refiner_refusal
from webui.engine.soft_inpainting import ENABLED_KEY, SOFT_INPAINTING_FIELDS, SOFT_INPAINTING_KEYS
from webui.engine.upscalers import UpscalerError
from webui.engine.vae import VaeFile
from webui.engine.step_options import INFOTEXT_KEYS as STEP_INFOTEXT_KEYS, StepOptions, draws_noise
from webui.engine.hypernetworks import HypernetworkError, hypernetwork_uses
from webui.engine.lora import LoraError, lora_uses, unread_tags
from webui.schemas import (DEFAULT_BACKGROUND, INPAINT_AREAS, LATENT_RESIZE, MASK_MODES, MASKED_CONTENT, RESIZE_MODES,
                           GeneratedImage, GenerationRequest, InvalidRequest, JobState, Progress,
                           SETTINGS_FIELDS, parse_request, random_seed, seed_after)
from webui.storage.filenames import NameParts
from webui.storage.history import History, owner_key
from webui.storage.infotext import PROGRAM, UNIPC_INFOTEXT_KEYS, build_infotext
from webui.storage.outputs import NamedCopy, OutputStore, grid_rows, make_grid
from webui.sd_upscale import TileLayout, enlarge, tile_layout
from webui.storage.options import INFOTEXT_SWITCHES, OptionsStore, SavedOptions
from webui.storage.styles import StyleStore
from webui.prompt_comments import PROMPT_FIELDS, without_comments
from webui.training import TrainingRun

log = logging.getLogger(__name__)
_JOB_ROW_MISSING = "the job is missing from the history"
_JOB_START_MISSING = "the job's start is missing from the history"
_IMAGE_ROWS_WAIT = "history rows wait"
# Finished jobs stay readable (UI, API polling) for a while; each holds its images in memory.
KEEP_FINISHED_JOBS = 64
KEEP_FINISHED_PIXELS = 256 * 512 * 512  # about 200 MB of RGB images
KEEP_FINISHED_SECONDS = 120.0  # time for a polling client to read them, up to KEEP_RECENT_PIXELS
KEEP_RECENT_PIXELS = 4 * KEEP_FINISHED_PIXELS  # a fast GPU makes ~1,200 images in those 120 s: about 800 MB at most
PREVIEW_WATCH_SECONDS = 3.0


async def await_result(future: Future) -> Any:
    """A worker future's result, awaited on an event loop (not waited for on a thread, which a long queue
    would keep from everyone else). Shielded: a request that goes away (a cancelled pick) must not cancel
    a model load that others asked for too."""
    awaited = asyncio.wrap_future(future)
    # Its outcome is read even when nobody awaits it any more: else asyncio logs a failed load as unretrieved.
    awaited.add_done_callback(lambda done: done.cancelled() or done.exception())
    return await asyncio.shield(awaited)


class QueueFull(RuntimeError):
    """The queue is at its maximum size; try again when a job has finished."""


class WorkerStopped(RuntimeError):
    """The worker has stopped (the server is shutting down): it takes no more work."""


class JobCancelled(DenoisingStopped):
    pass


class BatchSkipped(DenoisingStopped):
    pass


@dataclass(eq=False)  # a job is itself: the queue finds and removes it by identity
class Job:
    id: str
    request: GenerationRequest
    origin: str
    # Who submitted it: the API caller (user or address; A1111's /interrupt stops only theirs), or the
    # browser tab's secret token for the UI (a reloaded tab finds its running job by it).
    owner: str | None = None
    created_at: float = field(default_factory=time.time)
    # The prompt and negative prompt as given, before the styles were joined in (A1111's p.prompt; the request's are
    # its all_prompts). None: the request's.
    prompts_before_styles: tuple[str, str] | None = None
    state: JobState = JobState.QUEUED
    progress: Progress = field(default_factory=Progress)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)  # variation seeds, one per image (unused at strength 0)
    images: list[GeneratedImage] = field(default_factory=list)
    grid: Image.Image | None = None
    grid_path: str | None = None
    model: LoadedModel | None = None
    vae: VaeFile | None = None  # the VAE file it ran with (None: the model's own)
    vae_hash: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what went wrong without failing the job (a save)
    in_history: bool = False  # its row is written (tried again at the start and before each image when not)
    refused: bool = False  # failed on what the request asked (its model cannot do it): the client's to fix
    field_names: dict[str, str] = field(default_factory=dict)  # the submitter's names for request fields
    start_in_history: bool = False  # its start time is written (needs the row)
    # Saved images whose history rows wait (for the job's row, or a database that refuses them), each with its row.
    unrecorded: list[tuple[GeneratedImage, dict[str, Any]]] = field(default_factory=list)
    # img2img: the start, at the run's size (SD upscale's: the whole picture, to enlarge and cut into tiles)
    init_image: Image.Image | None = field(default=None, repr=False)
    inpainting: Inpainting | None = field(default=None, repr=False)  # img2img with a mask: where to draw
    # The picture and mask as given, to fit again on the worker with the Upscaler for img2img (a network run there)
    unfitted: tuple[Image.Image, Image.Image | None] | None = field(default=None, repr=False)
    control_image: Image.Image | None = field(default=None, repr=False)  # ControlNet's picture, RGB
    control_map: Image.Image | None = field(default=None, repr=False)  # ... preprocessed when the job starts
    # Colour correction's reference where it is not the start picture (Loopback's later loops: the run's first picture)
    color_reference: Image.Image | None = field(default=None, repr=False)
    copy_to: NamedCopy | None = None  # img2img Batch's Output directory: each saved image also goes there
    started_at: float | None = None
    finished_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    skip_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    # The submitter's context (made where the job is made, on the request's thread): generation runs in it,
    # so what reads the request there sees this job's (ZeroGPU's spaces.GPU charges the visitor's quota).
    context: contextvars.Context = field(default_factory=contextvars.copy_context, repr=False)
    # The worker decodes a preview only while someone reads them (a watched UI tab, /progress):
    # a job nobody watches (an API call, a benchmark) pays nothing, and the VAE stays on one thread.
    # The frame and the step it shows are one tuple, so a reader never pairs a new step with an old frame.
    _preview_frame: tuple[Image.Image | None, int] = field(default=(None, 0), repr=False)
    _preview_read_at: float = field(default=0.0, repr=False)

    def watch_preview(self) -> Image.Image | None:
        """The live preview; reading it asks the worker to keep decoding them (see preview_watched)."""
        return self.preview_frame()[0]

    def preview_frame(self) -> tuple[Image.Image | None, int]:
        """The live preview and the denoising step it shows (to drop stale ones); reading asks for more."""
        self._preview_read_at = time.monotonic()
        return self._preview_frame

    def preview_watched(self) -> bool:
        return time.monotonic() - self._preview_read_at < PREVIEW_WATCH_SECONDS

    def set_preview(self, image: Image.Image | None, step: int) -> None:
        self._preview_frame = (image, step)

    def clear_preview(self) -> None:
        self._preview_frame = (None, self._preview_frame[1])

    def wait(self, timeout: float | None = None) -> bool:
        return self.done_event.wait(timeout)

    def grid_image(self) -> GeneratedImage | None:
        """Its saved grid (from memory: the file may be deleted since) as an image of the run, with the seed and
        infotext of the grid's first picture (A1111's); None without one. A picture a Skip or Interrupt left
        unfinished is no part of the grid, so neither are its seed and infotext."""
        first = next((image for image in self.images if not image.unfinished), None)
        if not self.grid_path or first is None:
            return None
        return GeneratedImage(self.grid, first.seed, 0, first.infotext, path=self.grid_path)

    @property
    def kind(self) -> str:
        """What makes its images, as the output folders and the page's tabs name it."""
        return "img2img" if self.request.is_img2img else "txt2img"

    @property
    def seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class StepPace:
    """Seconds per denoising step, timed from each batch's first step reported, so the wait before it (a model
    load, a compile) does not inflate the ETA. None until a batch has reported two steps, or, for batches that
    report one (SD-Turbo, LCM; A1111's DDIM at 2 steps, one model call), until the second batch has started."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.seconds_per_step: float | None = None
        self._batch_started: float | None = None
        self._first_step = self._last_step = 0  # of the batch's reports
        self._clock = clock

    def step(self, step: int, steps: int) -> None:
        now = self._clock()
        if self._batch_started is not None and step > self._last_step:  # a later step of the same batch
            self.seconds_per_step = (now - self._batch_started) / (step - self._first_step)
        else:  # a batch's first report: step 1, or later where a model call makes more than one step
            if self._batch_started is not None and (self.seconds_per_step is None
                                                    or self._last_step == self._first_step):
                # A batch that reports once never times two steps: time first report to first report, decode
                # included, anew at every batch (the first one's includes compiling the VAE decoder).
                self.seconds_per_step = (now - self._batch_started) / steps
            self._batch_started, self._first_step = now, step
        self._last_step = step

    def eta(self, steps_left: int) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * steps_left


def _pixels_held(job: Job) -> int:
    held = (job.grid, job.init_image, job.inpainting and job.inpainting.original, job.control_image, job.control_map,
            *(job.unfitted or ()))  # a job cancelled before it started keeps the pictures to fit
    images = [im.image for im in job.images] + [picture for picture in held if picture is not None]
    return sum(image.width * image.height for image in images)


@dataclass
class _Call:
    """A task run on the worker thread between jobs (loading a model, for one)."""

    fn: Callable[[Engine], Any]
    future: Future
    activity: str | None = None  # what the UI and /progress say while it runs
    model_name: str | None = None  # the model a load call loads
    # run on the worker thread where fn fails, before anything queued behind it starts
    on_failure: list[Callable[[], None]] = field(default_factory=list)


class Worker:
    def __init__(self, engine: Engine, outputs: OutputStore, history: History, *,
                 max_queue: int = 64, styles: StyleStore | None = None,
                 options: OptionsStore | None = None):
        self.engine = engine
        self.outputs = outputs
        self.history = history
        self.styles = styles
        self.options = options or OptionsStore(None)  # the Settings tab's (prompt comments, live previews)
        # The model last loaded on purpose (at start, by the UI's model list, by POST /options), not by a job that
        # names another (a page's own pick, a plot's Checkpoint name axis): API requests that name none run on it.
        self.chosen_model: LoadedModel | None = None
        self.max_queue = max_queue
        self._queue: collections.deque[Job | _Call] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._current: Job | None = None
        self._running_call: _Call | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # What the worker does between jobs (loading or compiling a model), for people waiting; else None.
        self.activity: str | None = None
        self.training: TrainingRun | None = None  # the training running now (/progress, Interrupt)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Worker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and everything queued (their waiters are released), then end the thread."""
        with self._wake:
            self._stopping = True
            if self._current is not None:
                self._current.cancel_event.set()
            if self.training is not None:  # it saves what it trains as it stands and ends
                self.training.stop()
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, Job):
                    item.cancel_event.set()
                    self._finish(item, JobState.CANCELLED, "the server is shutting down")
                else:
                    item.future.set_exception(WorkerStopped("the server is shutting down"))
            self._wake.notify_all()
        thread = self._thread  # read once: a second stop() (on another thread) may clear it meanwhile
        if thread is not None:
            thread.join(timeout)
            self._thread = None

    # --- the public surface ---------------------------------------------------------------
    def submit(self, request: GenerationRequest | dict, origin: str = "ui", owner: str | None = None,
               warnings: list[str] | None = None, field_names: dict[str, str] | None = None,
               init_image: Image.Image | None = None, mask: Image.Image | None = None,
               copy_to: NamedCopy | None = None, control_image: Image.Image | None = None,
               color_reference: Image.Image | None = None) -> Job:
        """Queue a request; returns its Job at once. Raises InvalidRequest, QueueFull or WorkerStopped.
        `warnings`: what the caller already changed in the request (the API's schedule type run as Automatic).
        `field_names`: the caller's names for request fields, which its messages about the job use.
        `init_image`: the picture an img2img job starts from (any size or mode; fitted to the run's size here).
        `mask`: with it, an inpainting job: white (or, with transparency, painted) where the picture is drawn again.
        `copy_to`: each image saved is also saved there (img2img Batch's Output directory; see _save_copy).
        `control_image`: ControlNet's picture, which its preprocessor turns into the control map (ControlNet on only).
        `color_reference`: the picture colour correction matches the results to, where not the start picture (as
        A1111's Loopback, whose every loop is matched to the run's first picture so the colours do not drift)."""
        picture, asked = init_image, parse_request(request)
        request, init_image, inpainting = _with_init_image(self._prepared(asked), init_image, mask)
        request, control_image = _with_control_image(request, control_image, picture)
        self._check_runnable(request)
        warnings = list(warnings or [])
        unread = unread_tags(request.prompt + " " + (request.hr_prompt or ""))
        if unread:
            warnings.append(f"left out of the prompt: {', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''} "
                            "(this server reads <lora:...> and <hypernet:...> tags only)")
        enlarged = _enlarges(request, picture, inpainting) and not request.sd_upscale
        job = Job(id=uuid.uuid4().hex[:12], request=request, origin=origin, owner=owner, warnings=warnings,
                  prompts_before_styles=(asked.prompt, asked.negative_prompt), field_names=dict(field_names or {}),
                  init_image=init_image, inpainting=inpainting, copy_to=copy_to,
                  unfitted=(picture, mask) if enlarged else None, control_image=control_image,
                  color_reference=None if color_reference is None else as_rgb(
                      color_reference, request.img2img_background_color or DEFAULT_BACKGROUND))
        with self._wake:
            self._refuse_new_job()  # early: no history row for a job that cannot be queued
        # Outside the lock: a locked database waits seconds, and the queue must answer meanwhile.
        try:
            self._add_to_history(job)
            job.in_history = True
        except Exception as err:  # tried again when the job starts; a warning only if that fails too
            log.warning("job %s: its history row waits: %s: %s", job.id, type(err).__name__, err)
        try:
            with self._wake:
                self._refuse_new_job()  # again: others may have filled the queue, or stop() come, meanwhile
                self._jobs[job.id] = job
                self._queue.append(job)
                self._forget_old_jobs()
                self._wake.notify_all()
        except (QueueFull, WorkerStopped) as refused:
            reason = str(refused)
            self._record(job, "the refused job's row stays 'queued' in the history", lambda: self.history.set_job_state(
                job.id, JobState.CANCELLED.value, error=reason, finished_at=time.time()))
            raise
        return job

    def check(self, request: GenerationRequest | dict) -> GenerationRequest:
        """What submit would refuse (InvalidRequest, LoraError), found without queuing anything: for runs of several
        jobs, checked whole before the first starts. The request with its styles joined in."""
        request = self._prepared(request)
        self._check_runnable(request)
        return request

    def _prepared(self, request: GenerationRequest | dict) -> GenerationRequest:
        """The request checked, with its styles joined in, then its prompts' comments left out (A1111's order)."""
        request = self._with_styles(parse_request(request))
        comments = request.prompt_comments
        if comments if comments is not None else self.options.current().enable_prompt_comments:
            stripped = without_comments(request.model_dump(include=set(PROMPT_FIELDS)))
            if stripped:
                request = parse_request(request.model_dump() | stripped)
        unset = [name for name in SETTINGS_FIELDS if getattr(request, name) is None]
        if unset:  # the Settings tab's, fixed now: the infotext says what was read
            settings = self.options.current()
            request = parse_request(request.model_dump() | {name: getattr(settings, name) for name in unset})
        return request

    def _check_runnable(self, request: GenerationRequest) -> None:
        self._check_sdxl(request)  # first: an SDXL model refuses some features whatever else the request says
        self._check_against_loaded_model(request)
        self.engine.vaes.check(request.sd_vae)
        self._check_upscalers(request)
        if request.restore_faces:
            self.engine.faces.check(request.face_restoration_model)
        self._check_loras(request)
        self._check_hypernetworks(request)
        self._check_other_checkpoints(request)
        self._check_controlnet(request)
        problem = composition_problem(request)
        if problem:
            raise InvalidRequest(problem)

    def _check_sdxl(self, request: GenerationRequest) -> None:
        """What an SDXL model cannot run yet (webui/engine/sdxl.py) is refused now, where the job's model is known to
        be one: the loaded model, or one whose files say so (a hub model's kind is known once it loads: _prepare)."""
        loaded = self.engine.model
        if loaded is not None and loaded.names(request.model):
            sdxl = loaded.sdxl
        else:
            try:
                kind = request.model is not None and kind_of_entry(self.engine.registry.find(request.model))
            except ModelNotFound:
                kind = None  # the model's own check says so when the job starts
            if kind == SDXL_REFINER:
                raise InvalidRequest(f"model: {sdxl_refiner_refusal(request.model)}")
            sdxl = kind in (SDXL, f"{SDXL} inpainting")
        problem = sdxl and sdxl_problem(request)
        if problem:
            raise InvalidRequest(problem)

    def _check_against_loaded_model(self, request: GenerationRequest) -> None:
        """Refuse now what the loaded model cannot do, rather than fail when the job's turn comes."""
        model = self.engine.model
        if model is not None and model.names(request.model):
            _check_clip_skip(request, model)
            _check_edit_model(request, model)
            if request.reads_sigma_range:
                shape = request.schedule_shape
                problem = shape.range_problem(self.engine.sigma_table(shape))
                if problem:
                    raise InvalidRequest(problem)
            request.check_hires(*model.size_for(request))

    def _with_styles(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its styles' texts joined into its prompts (checked again: they may now be too long).
        The names stay in the request, so the history shows which styles made the prompt."""
        if not request.styles:
            return request
        if self.styles is None:
            raise InvalidRequest("styles: this server has no styles file")
        prompt, negative = self.styles.apply(request.prompt, request.negative_prompt, request.styles)
        styled = {"prompt": prompt, "negative_prompt": negative}
        if request.hr_prompt or request.hr_negative_prompt:  # as A1111, the hires fix's own prompts get them too
            hr_prompt, hr_negative = self.styles.apply(*request.hires_prompts, request.styles)
            styled |= {"hr_prompt": hr_prompt, "hr_negative_prompt": hr_negative}
        try:
            return parse_request(request.model_dump() | styled)
        except InvalidRequest as err:
            raise InvalidRequest(f"{err} (with the styles {', '.join(request.styles)} joined in)") from None

    def _check_upscalers(self, request: GenerationRequest) -> None:
        """The picture upscaler the hires fix or SD upscale names is a filter or a model upscaler that builds."""
        for used, name, label in ((request.enable_hr and request.hr_upscaler not in LATENT_UPSCALERS,
                                   request.hr_upscaler, "hr_upscaler"),
                                  (request.sd_upscale, request.sd_upscale_upscaler, "sd_upscale_upscaler"),
                                  (request.is_img2img and not request.sd_upscale
                                   and request.upscaler_for_img2img not in (None, NO_UPSCALER),
                                   request.upscaler_for_img2img, "upscaler_for_img2img")):
            if used:
                try:
                    self.engine.upscalers.check(name)
                except UpscalerError as err:
                    latent = f"; or a latent upscaler: {', '.join(LATENT_UPSCALERS)}" if label == "hr_upscaler" else ""
                    raise UpscalerError(f"{label}: {err}{latent}") from None

    def _check_loras(self, request: GenerationRequest) -> None:
        """A misspelt <lora:...> is refused now, with the names there are, not after the queue. One set of LoRAs
        serves both passes of a hires fix, so a hires prompt must name the prompt's LoRAs, no more and no fewer."""
        uses = lora_uses(request.prompt)
        self.engine.loras.check(uses)
        if request.hr_prompt is None:  # the prompt's: the same LoRAs
            return
        try:
            hires_uses = lora_uses(request.hr_prompt)
        except LoraError as err:
            raise LoraError(f"hr_prompt: {err}") from None
        # A1111 runs the second pass with the hires prompt's LoRAs alone (none, where it names none); here one
        # set serves both passes, so they must be the same for the picture to be the one A1111 would draw.
        if set(hires_uses) != set(uses):
            raise LoraError("hr_prompt: its <lora:...> tags must be the prompt's, with the same weights (one set of "
                            "LoRAs serves both passes here; A1111 would run the second pass with the hires prompt's "
                            "alone); copy the prompt's tags into the hires prompt")

    def _check_hypernetworks(self, request: GenerationRequest) -> None:
        """A misspelt <hypernet:...> is refused now, with the names there are; the hires prompt's too (its pass runs
        the hypernetworks it names, as in A1111)."""
        self.engine.hypernetworks.check(hypernetwork_uses(request.prompt))
        if request.hr_prompt is not None:
            try:
                self.engine.hypernetworks.check(hypernetwork_uses(request.hr_prompt))
            except HypernetworkError as err:
                raise HypernetworkError(f"hr_prompt: {err}") from None

    def _check_other_checkpoints(self, request: GenerationRequest) -> None:
        """The refiner and the hires fix's checkpoint are listed models of the main model's kind (as far as their
        files tell before loading): both go on from the main model's latents."""
        named = {name: getattr(request, name) for name in ("refiner_checkpoint", "hr_checkpoint_name")
                 if getattr(request, name)}
        if not named:
            return
        registry, loaded = self.engine.registry, self.engine.model
        try:
            main = registry.find(request.model) if request.model else loaded.entry if loaded else None
        except ModelNotFound:
            main = None  # the model's own check says so; the kinds wait for the job
        for request_field, name in named.items():
            try:
                other = registry.find_listed(name, loaded.entry if loaded else None)
            except ModelNotFound as err:
                raise InvalidRequest(f"{request_field}: {err}") from None
            other_kind = kind_of_entry(other)
            problem = kind_problem(main and kind_of_entry(main), other_kind, other.name, request_field)
            if problem:
                raise InvalidRequest(problem)
            if other_kind == SDXL_REFINER and request.uses_controlnet:
                raise InvalidRequest(CONTROLNET_WITH_SDXL_REFINER)

    def _check_controlnet(self, request: GenerationRequest) -> None:
        """The ControlNet model is listed, and made for the loaded model's kind where the job runs on it."""
        if not request.uses_controlnet:
            return
        pipe, model = self.engine.pipe, self.engine.model  # read once: the worker thread may switch them
        if pipe is not None and model is not None and model.names(request.model):
            self.engine.controlnets.check(request.controlnet_model, pipe.unet.config)
        else:
            self.engine.controlnets.find(request.controlnet_model)

    def _controlnet_infotext(self, request: GenerationRequest) -> dict[str, Any]:
        """The extension's "ControlNet 0" key, naming the model by its title ("name [hash]")."""
        if not request.uses_controlnet:
            return {}
        try:
            title = self.engine.controlnets.find(request.controlnet_model).title
        except ControlNetError:  # deleted since the run: the name the job gave
            title = None
        return controlnet_infotext(request, title)

    def _infotext_switched_off(self, job: Job) -> dict[str, None]:
        """The infotext keys the Add ... to infotext switches leave out (None leaves a key out): the Settings tab's,
        or the job's own."""
        options = self.saving_options(job)
        return {key: None for switch, key in INFOTEXT_SWITCHES.items() if not getattr(options, switch)}

    def _refiner_infotext(self, request: GenerationRequest) -> dict[str, Any]:
        """A1111's keys: the refiner's title ("name [short hash]") and where it took over."""
        if not request.refiner_checkpoint:
            return {}
        return {"Refiner": self._checkpoint_title(request.refiner_checkpoint),
                "Refiner switch at": request.refiner_switch_at,
                # A1111 writes the pass setting where it is not its default, second pass
                "Hires refiner": (request.hires_fix_refiner_pass if request.enable_hr
                                  and request.hires_fix_refiner_pass != "second pass" else None),
                # (A1111 writes it on every picture while the option is on; here where a refiner was asked for)
                "Refiner switch by sampling steps": True if request.refiner_switch_by_sample_steps else None}

    def _checkpoint_title(self, name: str | None) -> str | None:
        """A checkpoint a job names besides its model (refiner, hires checkpoint) as A1111's infotext names it, by its
        CheckpointInfo.short_title: "name [short hash]"; the name the job gave where the model is gone since."""
        if not name:
            return None
        try:
            entry = self.engine.registry.find(name)
        except ModelNotFound:
            return name
        digest = self.engine.registry.short_hash(entry)
        return f"{entry.name} [{digest}]" if digest else entry.name

    def _refuse_new_job(self) -> None:
        self._refuse_when_stopping()
        if self.queue_length() >= self.max_queue:
            waiting = f"{self.max_queue} job{'s' * (self.max_queue != 1)} waiting"
            raise QueueFull(f"the queue is full ({waiting}); try again shortly")

    def _add_to_history(self, job: Job) -> None:
        self.history.add_job(job.id, job.origin, job.request.model_dump(), job.created_at, job.owner)

    def get(self, job_id: str) -> Job | None:
        with self._wake:
            return self._jobs.get(job_id)

    def current(self) -> Job | None:
        return self._current

    def position(self, job_id: str) -> int | None:
        """Jobs ahead of this one (the running job counts); None once it has started."""
        with self._wake:
            queued = [item.id for item in self._queue if isinstance(item, Job)]
            if job_id not in queued:
                return None
            return queued.index(job_id) + (1 if self._current is not None else 0)

    def waiting_jobs(self) -> list[Job]:
        """The queued jobs, next to run first."""
        with self._wake:
            return [item for item in self._queue if isinstance(item, Job)]

    def unfinished_job_of(self, owner: str, kind: str | None = None) -> Job | None:
        """The newest queued or running job this owner submitted (of this kind: "txt2img", "img2img"), if any."""
        with self._wake:
            mine = [job for job in self._jobs.values() if job.owner == owner and not job.state.finished
                    and kind in (None, job.kind)]
        return max(mine, key=lambda job: job.created_at, default=None)

    def queue_length(self) -> int:
        with self._wake:
            return sum(isinstance(item, Job) for item in self._queue)

    def cancel(self, job_id: str) -> bool:
        """Stop one job: dropped if queued, stopped at the next step if running."""
        with self._wake:
            job = self._jobs.get(job_id)
            if job is None or job.state.finished:
                return False
            job.cancel_event.set()
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, JobState.CANCELLED)
        return True

    def skip(self, job_id: str) -> bool:
        """End the image (batch) being denoised and go on with the job's next batch."""
        job = self.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return False
        job.skip_event.set()
        return True

    def call(self, fn: Callable[[Engine], Any], activity: str | None = None) -> Future:
        """Run fn(engine) on the worker thread, after the jobs already queued."""
        future: Future = Future()
        with self._wake:
            self._refuse_when_stopping()
            self._queue.append(_Call(fn, future, activity))
            self._wake.notify_all()
        return future

    def interrogate(self, picture: Image.Image, model: str = "clip") -> Future:
        """A1111's Interrogate: the future of a prompt describing the picture, made on the worker thread after the
        jobs queued before it (the models share the device with the jobs). InvalidRequest, here for a model other
        than CLIP, from the future for models that cannot be had."""
        if model.strip().lower() != INTERROGATE_MODEL:
            raise InvalidRequest(f"model: {model[:50]!r} is not an interrogator on this server; send 'clip' (A1111's "
                                 "DeepBooru tagger is not offered)")
        picture = as_rgb(picture)
        return self.call(lambda engine: engine.interrogate(picture), activity="Interrogate CLIP")

    def train(self, run: TrainingRun) -> Future:
        """Train an embedding or a hypernetwork (run.plan.kind) on the worker thread (it owns the model), after the
        work queued before it; what is queued after waits until it ends, or until run.stop() (its own Interrupt) ends
        it. The future of its TrainingOutcome (None: stopped before it started)."""
        def train(engine: Engine):
            self.training = run
            settings = self.options.current()  # prompts read as for pictures, with the settings when it starts
            run.plan = replace(run.plan, emphasis=settings.emphasis, comma_backtrack=settings.comma_padding_backtrack)
            try:
                return run.run(engine, announce=lambda text: setattr(self, "activity", text))
            finally:
                self.training = None

        return self.call(train, activity=f"{run.activity} (other jobs wait until it ends)")

    def _refuse_when_stopping(self) -> None:
        if self._stopping:
            raise WorkerStopped("the server is shutting down; no new work is taken")

    def load_model(self, name: str, timeout: float | None = None, remember: bool = True) -> LoadedModel:
        """Load a model and return once it is ready; a compiled model's warm-up follows in the
        background, before any job (queued jobs wait behind it and see what it does in `activity`).
        `remember`: it is the next start's too (False: a fallback no one picked)."""
        return self.queue_model_load(name, remember).result(timeout)

    def queue_model_load(self, name: str, remember: bool = True,
                         on_failure: Callable[[], None] | None = None) -> Future:
        """load_model without the wait: a future that gives the LoadedModel, or raises what the load raised.
        A model asked for again while its load is the last thing in line shares that load (the model
        dropdown sends each pick twice; two API clients may pick one model): a failing load runs once.
        Behind anything else (a job naming another model), it is loaded again. `on_failure` runs on the worker
        thread where the load fails, before what is queued behind it starts."""
        try:  # resolved here, not under the lock: a title ("name [hash]") or file name means the same model
            wanted = self.engine.registry.find(name)
        except Exception:  # a model loaded from outside the models folder, or a load that will say what is wrong
            wanted = None
        with self._wake:
            if self._model_stays(name, wanted):  # clients that set the model before every image need not wait
                done: Future = Future()
                done.set_result(self.engine.model)
                return done
            last = self._queue[-1] if self._queue else self._running_call
            if not (isinstance(last, _Call) and last.model_name == name):
                self.call(lambda engine: self._load_then_queue_warm_up(engine, name, remember), f"Loading model {name}")
                last = self._queue[-1]
                last.model_name = name
            if on_failure is not None:
                last.on_failure.append(on_failure)
        return last.future

    def _model_stays(self, name: str, wanted: ModelEntry | None) -> bool:
        """`name` (found as `wanted`) is the loaded model, and nothing running or queued loads another: no
        model load, no job naming another model, and no job that puts a model back after it (an override,
        even of this model: it may restore another). Call with _wake held."""
        model = self.engine.model
        if model is None or not (model.names(name) or model.entry == wanted):
            return False
        for item in (*self._queue, self._current, self._running_call):
            if isinstance(item, _Call) and item.model_name:
                return False
            if isinstance(item, Job) and (item.request.restore_model or not model.names(item.request.model)):
                return False
        return True

    def loading_model(self) -> bool:
        """A model load is queued or running."""
        with self._wake:
            calls = [*self._queue, self._running_call]
        return any(isinstance(call, _Call) and call.model_name for call in calls)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def release_device(self) -> Future:
        """Free the model's memory for other programs once the jobs queued before are done (the API's
        unload-checkpoint); the next job, or restore_device, brings the model back."""
        return self.call(lambda engine: engine.release_device(), "Unloading the model")

    def refresh_embeddings(self) -> Future:
        """Read the embeddings folder again, between jobs: the tokenizer must not change under a running one."""
        return self.call(lambda engine: engine.refresh_embeddings(), "Reading embeddings")

    def restore_device(self) -> Future:
        """Bring a released model back now rather than with the next job (the API's reload-checkpoint)."""
        return self.call(lambda engine: self._queue_warm_up(engine, engine.restore_device()), "Loading the model back")

    def _load_then_queue_warm_up(self, engine: Engine, name: str, remember: bool = True) -> LoadedModel:
        """Load the model picked (in the UI, by the API, at start): the server's model from then on, and with
        `remember` the next start's."""
        model = self._queue_warm_up(engine, engine.load(name))
        self.chosen_model = model  # the server's model, as A1111's global one; a job's own model does not change it
        if remember:
            self._remember_model(engine, model)
        return model

    def _remember_model(self, engine: Engine, model: LoadedModel) -> None:
        """The model loaded (at start, or picked in the UI or by the API) is the next start's, as A1111 keeps
        sd_model_checkpoint in its settings file; a file that cannot be written costs only that."""
        name = engine.registry.lasting_name(model.entry)
        if name is None:  # from outside the models folder: the start that gave it is not repeated by itself
            return
        try:
            self.options.remember({"sd_model_checkpoint": name})
        except OSError as err:
            log.warning("the model loaded is not remembered for the next start: %s", err)

    def _queue_warm_up(self, engine: Engine, model: LoadedModel) -> LoadedModel:
        if engine.needs_warm_up:
            with self._wake:  # first in line: a job queued during the load must not pay the compile
                self._queue.appendleft(_Call(self._warm_up, Future(), f"Compiling {model.entry.name}"))
        return model

    def _warm_up(self, engine: Engine) -> None:
        name, width, height = engine.model.entry.name, engine.model.native_width, engine.model.native_height

        def on_step(step: int, total: int, _latents) -> None:
            self.activity = f"Compiling {name} for {width}x{height}: warm-up step {step}/{total}" + (
                ", then the VAE decoder" if step == total else "")

        try:
            engine.warm_up(on_step)
        except Exception:  # nobody waits on this call: say it here; the first image compiles instead
            log.exception("the warm-up of %s failed", name)

    # --- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    if not self._wake.wait(KEEP_FINISHED_SECONDS):
                        self._forget_old_jobs()  # idle: finished jobs past their time go now, not at the next job
                if self._stopping:
                    return
                item = self._queue.popleft()
                if isinstance(item, Job):
                    self._current = item
                else:  # set under the lock, with the pop: a model pick must never see neither
                    self._running_call = item
            try:
                if isinstance(item, _Call):
                    self._run_call(item)
                else:
                    self._run_job(item)
            except Exception:  # the worker must outlive any one job, whatever broke
                log.exception("the worker caught an unexpected error; going on with the next job")
            finally:
                with self._wake:
                    self._current = self._running_call = None
                    self._forget_old_jobs()

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        self.activity = call.activity
        try:
            call.future.set_result(call.fn(self.engine))
        except BaseException as err:
            for callback in call.on_failure:
                callback()
            call.future.set_exception(err)
        finally:
            self.activity = None

    def _run_job(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started_at = time.time()
        self._ensure_in_history(job)
        try:
            self._generate(job)
        except JobCancelled:
            self._finish(job, JobState.CANCELLED)
        except InvalidRequest as err:
            job.refused = True
            self._finish(job, JobState.FAILED, str(err))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self._finish(job, JobState.FAILED, "out of GPU memory: lower the size or batch size, "
                                                "or start with --medvram / --lowvram")
        except (ModelNotFound, ModelLoadError) as err:  # the message says it all: no traceback in the log
            log.warning("job %s failed: %s", job.id, err)
            self._finish(job, JobState.FAILED, f"{type(err).__name__}: {err}")
        except Exception as err:
            log.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, f"{type(err).__name__}: {err}")
        else:
            self._finish(job, JobState.DONE)

    def _generate(self, job: Job) -> None:
        previous = self.engine.model
        try:
            self._generate_images(job)
        finally:
            if job.request.restore_model and previous is not None and self.engine.model != previous:
                self._restore_model(previous)

    def _restore_model(self, previous: LoadedModel) -> None:
        try:
            # the model loaded before the job, which need not be the server's (a plot cell's own model may have
            # been): neither the server's model nor the remembered one changes
            self._queue_warm_up(self.engine, self.engine.load(previous.entry.source))  # compiled: warm it up too
        except Exception:  # the job itself went fine; the next one loads what it needs
            log.exception("could not load %s again after a job with another model", previous.entry.name)

    def _fit_with_upscaler(self, job: Job) -> None:
        """The start fitted again, A1111's Upscaler for img2img enlarging the picture (or the part drawn) where the
        fit makes it larger; the same size and place as the fit at submit."""
        name = job.request.upscaler_for_img2img
        picture, mask = job.unfitted
        job.progress.note = f"Enlarging the start picture with {name}"
        try:
            _, job.init_image, job.inpainting = _with_init_image(
                job.request, picture, mask, lambda image, size: self.engine.upscale_picture(image, size, name))
        finally:
            job.progress.note = None
        job.unfitted = None
        if job.cancel_event.is_set():
            raise JobCancelled

    def _generate_images(self, job: Job) -> None:
        if job.cancel_event.is_set():  # cancelled as the worker took it: no model switch for nothing
            raise JobCancelled
        self._prepare(job)
        if job.request.save_images and job.request.save_init_img and job.init_image is not None:
            self._save_init_image(job)
        if job.request.sd_upscale:
            self._upscale_in_tiles(job)
            return
        pace = StepPace()
        try:
            for batch in range(job.request.n_iter):
                if job.cancel_event.is_set():
                    raise JobCancelled
                self._run_batch(job, batch, pace)
        finally:  # an Interrupt too: as A1111's, the grid of the pictures made before it
            finished = [image for image in job.images if not image.unfinished]  # a Skip leaves one unfinished
            if len(finished) > 1 and job.request.save_images:  # only a saved grid is shown or returned
                self._save_grid(job, finished)

    def _prepare(self, job: Job) -> None:
        """The job's model, its seeds (one per image) and its progress before the first step."""
        request = job.request
        job.model = self.engine.load(request.model) if request.model else self.engine.require_model()
        if request.keep_model:  # as A1111's option, set for good as the job starts
            self.chosen_model = job.model
            self._remember_model(self.engine, job.model)
        _check_clip_skip(request, job.model)  # another model than at submit: checked now it is known
        _check_edit_model(request, job.model)
        problem = job.model.sdxl and sdxl_problem(request)
        if problem:
            raise InvalidRequest(problem)
        request.check_hires(*job.model.size_for(request))
        self.engine.restore_device()  # after an unload-checkpoint
        if job.unfitted is not None:
            self._fit_with_upscaler(job)
        job.vae = self.engine.use_vae(request.sd_vae)
        job.vae_hash = self.engine.vaes.short_hash(job.vae) if job.vae else None
        if job.control_image is not None:
            job.control_map = request_map(job.control_image, request, job.model.size_for(request))
        # As A1111: with a variation strength every image has the seed, and the variation seed counts up (a
        # batch of variations of one picture); without, the seed counts up. Variation seeds are drawn either way.
        if request.subseed_strength > 0:
            job.seeds = _seeds_from(request.seed, 1) * request.image_count
        else:
            job.seeds = _seeds_from(request.seed, request.image_count)
        job.subseeds = _seeds_from(request.subseed, request.image_count)
        job.progress = Progress(total_steps=request.total_steps, image_count=request.image_count)

    def _run_batch(self, job: Job, batch: int, pace: StepPace) -> None:
        """Denoise one batch and keep its images; Skip ends it early with no images."""
        request = job.request
        job.skip_event.clear()
        first = batch * request.batch_size
        seeds = job.seeds[first:first + request.batch_size]
        subseeds = job.subseeds[first:first + request.batch_size] if request.subseed_strength > 0 else None
        compiling = self.engine.pending_compiles(request, len(seeds))
        # the new batch at its step 0 (one Progress replaced whole: a reader never sees its number with the last
        # batch's steps, as /progress's job_no and sampling_step did)
        job.progress = replace(job.progress, image_index=first, step=0, note=self._compile_note(request, compiling))
        started = time.time()
        # only what the job has, so a plain job calls as before
        extras = {name: value for name, value in (("control", job.control_map),
                                                  ("color_reference", job.color_reference)) if value is not None}
        try:
            results = job.context.run(self.engine.generate, request, seeds,
                                      self._step_callback(job, batch, compiling, pace), subseeds, job.init_image,
                                      job.inpainting, **extras)
        except DenoisingStopped as stopped:  # shown as they stood, not saved
            for i, result in enumerate(stopped.images):
                self._keep_image(job, result, first + i, seconds=0.0, unfinished=True)
            if isinstance(stopped, JobCancelled):
                raise
            return
        finally:
            job.progress.note = None
        seconds = (time.time() - started) / len(results)
        for i, result in enumerate(results):
            self._keep_image(job, result, first + i, seconds)

    def _upscale_in_tiles(self, job: Job) -> None:
        """SD upscale: for each batch count, the picture enlarged, cut into tiles, the tiles drawn again batch_size
        at a time (tile t with seed + t, whatever the batch size) and joined into the job's picture. A Skip ends
        that picture with nothing to show; the next batch count goes on."""
        request, pace = job.request, StepPace()
        layout = _tiles_for(request, job.init_image.size)
        tiles = layout.cut(enlarge(job.init_image, request.sd_upscale_scale, request.sd_upscale_upscaler,
                                   self.engine.upscale_picture))
        groups = [range(first, min(first + request.batch_size, len(tiles)))
                  for first in range(0, len(tiles), request.batch_size)]
        for upscale in range(request.n_iter):
            job.skip_event.clear()
            started, drawn = time.time(), []
            for number, group in enumerate(groups):
                if job.cancel_event.is_set():
                    raise JobCancelled
                run = (upscale * len(groups) + number, request.n_iter * len(groups))
                try:
                    drawn += self._draw_tiles(job, [tiles[t] for t in group], upscale, group.start, run, pace)
                except BatchSkipped:
                    break
            else:
                nsfw = any(result.nsfw for result in drawn)
                # A flagged tile is black, but its neighbours' fades would show it through: all of it goes black.
                joined = Image.new("RGB", layout.size) if nsfw else layout.join([result.image for result in drawn])
                self._keep_image(job, EngineImage(joined, job.seeds[upscale], nsfw), upscale, time.time() - started)

    def _draw_tiles(self, job: Job, tiles: list[Image.Image], upscale: int, first: int, run: tuple[int, int],
                    pace: StepPace) -> list[EngineImage]:
        """One batch of SD upscale's tiles (the first of them tile `first`) drawn again; run: (this, of all)."""
        request, count = job.request, len(tiles)
        # The last batch may be short: on a compiled model that is a shape of its own to compile, so it is filled
        # up with its last tile again (drawn for nothing) where the full batch size is compiled already.
        if (count < request.batch_size and self.engine.pending_compiles(request, count)
                and not self.engine.pending_compiles(request, request.batch_size)):
            tiles = tiles + [tiles[-1]] * (request.batch_size - count)
        numbers = [first + min(i, count - 1) for i in range(len(tiles))]  # each tile's: seed + its number
        seeds = [seed_after(job.seeds[upscale], number) for number in numbers]
        subseeds = ([seed_after(job.subseeds[upscale], number) for number in numbers]
                    if request.subseed_strength > 0 else None)
        compiling = self.engine.pending_compiles(request, len(seeds))
        job.progress.note = self._compile_note(request, compiling)
        try:
            return job.context.run(self.engine.generate, request, seeds,
                                   self._step_callback(job, run[0], compiling, pace, run[1], upscale), subseeds,
                                   tiles, None)[:count]
        finally:
            job.progress.note = None

    def _save_grid(self, job: Job, images: list[GeneratedImage]) -> None:
        options = self.saving_options(job)
        rows = grid_rows(len(images), options.n_rows, job.request.batch_size, options.grid_prevent_empty_spots)
        grid = make_grid([im.image for im in images], rows)
        try:
            first = images[0]
            path = self.outputs.save_grid(grid, first.infotext, job.kind,
                                          _name_parts(job, first, grid), options)
            job.grid, job.grid_path = grid, str(path)  # the grid first: readers test grid_path
        except Exception as err:
            self._warn(job, "the grid was not saved", err)

    def saving_options(self, job: Job) -> SavedOptions:
        """The settings the job's outputs are written with (files, infotext, grid): the Settings tab's now, with the
        job's own (its request's saving_options, A1111's override_settings)."""
        return self.options.current().model_copy(update=job.request.saving_options)

    def _compile_note(self, request: GenerationRequest, parts: list[str]) -> str | None:
        """What a batch waits for before its first step (or after its last), in words; None when nothing."""
        if not parts:
            return None
        width, height = self.engine.require_model().size_for(request)
        return (f"Compiling the {' and the '.join(parts)} for {width}x{height} (once for each new size, batch "
                "size, prompt length or kind of sampler; later runs reuse it)")

    def _step_callback(self, job: Job, batch: int, compiling: list[str], pace: StepPace, batches: int | None = None,
                       image_index: int | None = None):
        """The engine's step callback for run `batch` of `batches` (the batch counts; SD upscale's tile runs, which
        make picture `image_index`)."""
        batches = batches or job.request.n_iter
        image_index = batch * job.request.batch_size if image_index is None else image_index
        # The VAE decoder compiles after the last step, while the bar would otherwise say 100 %.
        decoder_note = self._compile_note(job.request, ["VAE decoder"] if "VAE decoder" in compiling else [])

        def on_step(step: int, total_steps: int, latents: torch.Tensor | None) -> None:
            if job.cancel_event.is_set():
                raise JobCancelled
            if job.skip_event.is_set():
                raise BatchSkipped
            if step == 0:  # before the first step, while the prompt's texts are encoded: nothing to show yet
                return
            fraction = (batch + step / total_steps) / batches
            pace.step(step, total_steps)
            steps_left = (total_steps - step) + (batches - batch - 1) * total_steps
            job.progress = Progress(
                step=step, total_steps=total_steps, image_index=image_index,
                image_count=job.request.image_count, fraction=fraction, eta_seconds=pace.eta(steps_left),
                note=decoder_note if step == total_steps else None,
            )
            period = self.options.preview_period()  # the Settings tab's, changed even during a run
            if period and step % period == 0 and step < total_steps and job.preview_watched():
                job.set_preview(self.engine.preview(latents, self.options.current().show_progress_type),
                                batch * total_steps + step)

        return on_step

    def _keep_image(self, job: Job, result, index: int, seconds: float, unfinished: bool = False) -> None:
        request, model = job.request, job.model
        width, height = model.size_for(request)
        infotext = build_infotext(request.prompt, request.negative_prompt, {
            "Steps": request.steps,
            "Sampler": request.sampler_name,
            "Schedule type": request.scheduler,
            "CFG scale": request.cfg_scale,
            "Seed": result.seed,
            "Size": f"{width}x{height}",
            "Denoising strength": request.denoising_strength if request.is_img2img or request.enable_hr else None,
            **_hires_infotext(request),
            "Hires checkpoint": self._checkpoint_title(request.hr_checkpoint_name),
            **_inpainting_infotext(request),
            **_soft_inpainting_infotext(request),
            "SD upscale overlap": request.sd_upscale_overlap if request.sd_upscale else None,
            "SD upscale upscaler": request.sd_upscale_upscaler if request.sd_upscale else None,
            # As A1111, of a model made for inpainting: how far its start picture was greyed out
            "Conditional mask weight": request.inpainting_mask_weight if model.inpainting else None,
            "Image CFG scale": request.image_cfg_scale if model.edit and request.is_img2img else None,
            "Model hash": model.short_hash,
            "Model": model.entry.name,
            "VAE hash": job.vae_hash,
            "VAE": job.vae.name if job.vae else None,
            **self._refiner_infotext(request),
            **self._controlnet_infotext(request),
            "Variation seed": job.subseeds[index] if request.subseed_strength > 0 else None,
            "Variation seed strength": request.subseed_strength if request.subseed_strength > 0 else None,
            "Seed resize from": "{}x{}".format(*request.seed_resize) if request.seed_resize else None,
            # As A1111: which image of its batch this is (a batch image differs from a single run by rounding).
            "Batch size": request.batch_size if request.batch_size > 1 and not request.sd_upscale else None,
            "Batch pos": index % request.batch_size if request.batch_size > 1 and not request.sd_upscale else None,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            # not written by A1111, whose pictures made with it cannot be made again from their infotext
            "Clip skip SDXL": True if request.sdxl_clip_l_skip and model.sdxl else None,
            "Img2img exact steps": True if request.img2img_fix_steps and request.is_img2img else None,  # likewise
            "Old prompt editing timelines": True if old_timelines_change_the_run(request) else None,
            "Token merging ratio": request.token_merging_ratio or None,
            "Token merging ratio hr": (request.hires_token_merging_ratio or None) if request.enable_hr else None,
            "Tiling": True if request.tiling else None,
            "Face restoration": request.face_restoration_model if request.restore_faces else None,
            "Color correction": True if request.color_correction and request.is_img2img else None,
            "Noise multiplier": request.initial_noise_multiplier
            if request.initial_noise_multiplier != 1 and request.is_img2img else None,
            "SGM noise multiplier": True if request.uses_sgm_noise_multiplier else None,
            "Extra noise": (request.img2img_extra_noise or None) if request.is_img2img or request.enable_hr else None,
            "Pad conds": True if self.engine.pads_prompts(request) else None,
            "Emphasis": _emphasis_infotext(request),
            # always: A1111 reads a picture without the key as made by its GPU source (NV here)
            "RNG": request.randn_source,
            **_uncond_skip_infotext(request),
            **_step_options_infotext(request),
            "Beta schedule alpha": request.beta_dist_alpha if request.uses_beta_schedule else None,
            "Beta schedule beta": request.beta_dist_beta if request.uses_beta_schedule else None,
            **_schedule_range_infotext(request),
            "Discard penultimate sigma": True if request.discard_changes_a_pass else None,
            "Noise Schedule": request.sd_noise_schedule if request.sd_noise_schedule != "Default" else None,
            "Downcast alphas_cumprod": True if request.use_downcasted_alpha_bar else None,
            **_unipc_infotext(request),
            "Lora hashes": self.engine.lora_hashes(request),
            "TI hashes": self.engine.ti_hashes(request),
            "NSFW": "blacked out by the safety checker" if result.nsfw else None,
            **request.script_params,
            "Version": f"{PROGRAM} {__version__}",
        } | self._infotext_switched_off(job))
        image = GeneratedImage(image=result.image, seed=result.seed, index=index, infotext=infotext, nsfw=result.nsfw,
                               unfinished=unfinished)
        job.images.append(image)  # first: whatever happens to the file, the user gets the picture
        if request.save_images and unfinished and request.save_incomplete_images:  # as it stood, and no copies
            self._save(job, image, width, height, seconds)
        if request.save_images and not unfinished:
            self._save_earlier(job, image, result.earlier)
            self._save(job, image, width, height, seconds)
            self._save_masks(job, image)
            if job.copy_to is not None:
                self._save_copy(job, image)

    def _save(self, job: Job, image: GeneratedImage, width: int, height: int, seconds: float) -> None:
        """Write the image file, then its history row. A failure (a full disk, a locked database) is a warning on
        the job: the picture stays in the job, and a written file stays on disk."""
        request, model = job.request, job.model
        try:
            path = self.outputs.save_image(image.image, image.infotext, image.seed, job.kind,
                                           _name_parts(job, image), options=self.saving_options(job))
        except Exception as err:
            self._warn(job, f"image {image.index + 1} was not saved", err)
            return
        image.path = str(path)
        job.unrecorded.append((image, dict(
            job_id=job.id, path=str(path.relative_to(self.outputs.outdir)), prompt=request.prompt,
            negative_prompt=request.negative_prompt, seed=image.seed, steps=request.steps,
            sampler=request.sampler_name, scheduler=request.scheduler, cfg_scale=request.cfg_scale,
            width=width, height=height, clip_skip=request.clip_skip, model_name=model.entry.name,
            model_hash=model.short_hash, image_index=image.index, nsfw=image.nsfw, seconds=seconds,
            infotext=image.infotext,
        )))
        self._record_images(job)

    def _save_earlier(self, job: Job, image: GeneratedImage, earlier: dict[str, Image.Image]) -> None:
        """A1111's "Save a copy of image before ...": each copy the engine kept, named as the image with
        -before-<step> after it, numbered before it."""
        for step, picture in earlier.items():
            self._save_beside(job, image, picture, "-before-" + step.replace("_", "-"),
                              "copy before " + step.replace("_", " "))

    def _save_masks(self, job: Job, image: GeneratedImage) -> None:
        """A1111's "For inpainting, save a copy of the greyscale mask" and "... a masked composite": the mask the
        picture was laid in through, and the picture there (transparent elsewhere), named -mask and -mask-composite,
        numbered after it."""
        request, inpainting = job.request, job.inpainting
        if inpainting is None:
            return
        if request.save_mask:
            self._save_beside(job, image, inpainting.overlay.convert("RGB"), "-mask", "mask")
        if request.save_mask_composite:
            shown = Image.composite(image.image.convert("RGBA"), Image.new("RGBA", image.image.size),
                                    inpainting.overlay.resize(image.image.size))
            self._save_beside(job, image, shown, "-mask-composite", "masked composite")

    def _save_beside(self, job: Job, image: GeneratedImage, picture: Image.Image, suffix: str, what: str) -> None:
        """A picture saved beside the image: its name with `suffix`, its infotext, the next number; not in the
        history (a copy, not a result). One that cannot be written is a warning; the image is saved all the same."""
        try:
            self.outputs.save_image(picture, image.infotext, image.seed, job.kind,
                                    _name_parts(job, image, picture), suffix=suffix,
                                    options=self.saving_options(job))
        except Exception as err:
            self._warn(job, f"image {image.index + 1}'s {what} was not saved", err)

    def _save_init_image(self, job: Job) -> None:
        """A1111's "Save init images when using img2img": the picture the job starts from, as the run uses it
        (fitted to its size; an inpainting job's whole picture, where A1111 keeps the upload as sent), once, as
        init-images/<the md5 of its pixels>.png in the outputs folder; one saved before stays."""
        picture = job.inpainting.original if job.inpainting is not None else job.init_image
        try:
            self.outputs.save_init_image(picture)
        except Exception as err:
            self._warn(job, "the init image was not saved", err)

    def _save_copy(self, job: Job, image: GeneratedImage) -> None:
        """The image also saved into img2img Batch's Output directory, named after the picture it started from, as
        A1111 names it there: <name>, or <name>-<n> (n from 1) when the run makes several. Its outputs/ file stays
        the one the history and the gallery point at: the page serves and deletes files there only."""
        copy = job.copy_to
        if job.request.image_count > 1:
            copy = NamedCopy(copy.folder, f"{copy.stem}-{image.index + 1}")
        try:
            path = self.outputs.save_named(image.image, image.infotext, copy, self.saving_options(job))
        except Exception as err:
            self._warn(job, f"image {image.index + 1} was not saved in the output directory", err)
            return
        log.info("job %s: image %d also saved as %s", job.id, image.index + 1, path)

    def _record_images(self, job: Job, ending: tuple[JobState, str | None] | None = None) -> None:
        """Write the history rows of the job's saved images. An image row must point at the job's row, so
        while that is missing (a locked database) they wait for it, as they do while the database refuses them.
        `ending`: the job's end, the last try: the rows left are kept for the next start (keep_for_later), or
        named as missing where even that fails."""
        if self._ensure_in_history(job):
            while job.unrecorded:
                image, row = job.unrecorded[0]
                try:
                    image.history_id = self.history.add_image(**row)
                except Exception as err:
                    self._warn(job, _IMAGE_ROWS_WAIT, err)
                    break
                job.unrecorded.pop(0)
        if ending is not None and job.unrecorded:
            self._keep_for_later(job, *ending)

    def _keep_for_later(self, job: Job, state: JobState, error: str | None) -> None:
        names = [Path(image.path).name for image, _ in job.unrecorded]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        try:
            self.history.keep_for_later(
                {"job_id": job.id, "origin": job.origin, "request": job.request.model_dump(),
                 "created_at": job.created_at, "owner_key": owner_key(job.owner), "state": state.value,
                 "error": error, "started_at": job.started_at, "finished_at": time.time()},
                [row for _, row in job.unrecorded])
        except Exception as err:
            log.error("job %s: its history rows could not be kept for later either: %s: %s", job.id,
                      type(err).__name__, err)
            job.warnings.append(f"saved but missing from the history: {listed}")
            return
        job.unrecorded.clear()
        job.warnings = [w for w in job.warnings if not w.startswith((_JOB_ROW_MISSING, _IMAGE_ROWS_WAIT))]
        job.warnings.append(f"saved; the history database did not take their rows now, so {listed} join the history "
                            "at the next start")

    def _ensure_in_history(self, job: Job) -> bool:
        """Write the job's row, and its start, where that failed so far (a locked database at submit), as no
        image row can be written without it; whether the row is there now. Once both are written, the warnings
        that said they were missing go: they are no longer true."""
        if not job.in_history:
            job.in_history = self._record(job, _JOB_ROW_MISSING, lambda: self._add_to_history(job))
        if job.in_history and job.started_at is not None and not job.start_in_history:
            job.start_in_history = self._record(job, _JOB_START_MISSING, lambda: self.history.set_job_state(
                job.id, JobState.RUNNING.value, started_at=job.started_at))
            if job.start_in_history:
                job.warnings = [w for w in job.warnings if not w.startswith((_JOB_ROW_MISSING, _JOB_START_MISSING))]
        return job.in_history

    def _record(self, job: Job, what: str, write: Callable[[], None]) -> bool:
        """A history write; whether it worked. A failure (a full disk, a locked database) is a warning on the
        job: the pictures matter more than their record."""
        try:
            write()
        except Exception as err:
            self._warn(job, what, err)
            return False
        return True

    @staticmethod
    def _warn(job: Job, what: str, err: Exception) -> None:
        log.error("job %s: %s: %s: %s", job.id, what, type(err).__name__, err)
        warning = f"{what}: {type(err).__name__}: {err}"
        if warning not in job.warnings:  # the same failure at every image (a database locked all along) is said once
            job.warnings.append(warning)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        if job.unrecorded:
            self._record_images(job, ending=(state, error))
        # The state last: whoever sees a finished job (another thread, unlocked) finds its time and error set.
        job.finished_at = time.time()
        job.unfitted = None  # a job that ended before its start was fitted again holds the pictures no longer
        job.error = error
        job.state = state
        job.clear_preview()
        job.done_event.set()  # first: waiting clients must never hang on a failed history write
        try:  # the start again: its own write may have failed (a locked database), and it costs nothing
            self.history.set_job_state(job.id, state.value, error=error, started_at=job.started_at,
                                       finished_at=job.finished_at)
        except Exception:
            log.exception("could not record the end of job %s in the history", job.id)

    def _forget_old_jobs(self) -> None:
        """Drop the jobs that finished first, past KEEP_FINISHED_JOBS or while their images hold more than
        KEEP_FINISHED_PIXELS. The last one to finish, and any that finished less than KEEP_FINISHED_SECONDS
        ago, stay for the clients about to read them, unless they hold more than KEEP_RECENT_PIXELS. A client
        already holding a Job keeps it whole. Call with _wake held."""
        finished = sorted((j for j in self._jobs.values() if j.state.finished), key=lambda j: j.finished_at)
        excess = len(finished) - KEEP_FINISHED_JOBS
        pixels = sum(_pixels_held(job) for job in finished)
        recent = time.time() - KEEP_FINISHED_SECONDS
        for job in finished[:-1]:
            within_budget = excess <= 0 and pixels <= KEEP_FINISHED_PIXELS
            if pixels <= KEEP_RECENT_PIXELS and (within_budget or job.finished_at > recent):
                break
            del self._jobs[job.id]
            excess, pixels = excess - 1, pixels - _pixels_held(job)


def _with_init_image(request: GenerationRequest, image: Image.Image | None, mask: Image.Image | None = None,
                     enlarge: Enlarge | None = None) -> tuple[GenerationRequest, Image.Image | None, Inpainting | None]:
    """An img2img request (marked by its init image's hash, and its mask's for inpainting; sized by the picture
    where it gives no size), the picture it starts from at that size, and with a mask the Inpainting; a txt2img
    request as it is. `enlarge`: the Upscaler for img2img (run on the worker: the job's start is fitted again)."""
    if image is None:
        if request.sd_upscale:
            raise InvalidRequest("sd_upscale: SD upscale enlarges a picture: give the picture to start from (it is "
                                 "an img2img script)")
        if request.is_img2img or request.is_inpainting or mask is not None:
            raise InvalidRequest("init_image: give the picture to start from, not only its hash" if request.is_img2img
                                 else "init_image: inpainting needs the picture to draw into, besides the mask")
        return request, None, None
    if request.is_inpainting and mask is None:
        raise InvalidRequest("mask: give the mask picture, not only its hash")
    image = _read_picture(image, "init_image", lambda picture: as_rgb(picture, request.img2img_background_color
                                                                      or DEFAULT_BACKGROUND))
    fields = {"init_image": image_sha1(image)}
    if request.sd_upscale:  # the picture kept whole; the size is a tile's
        if mask is not None:
            raise InvalidRequest("SD upscale draws the whole picture again: use it without a mask (on the img2img "
                                 "sub-tab, not an Inpaint one; on Batch, without masks)")
        width, height = size_from_image(image, request.width, request.height)
        request = parse_request(request.model_dump() | fields | {"width": width, "height": height})
        _tiles_for(request, image.size)
        return request, image, None
    if mask is None:
        width, height = size_from_image(image, request.width, request.height)
        request = parse_request(request.model_dump() | fields | {"width": width, "height": height})
        return request, fit_image(image, request.width, request.height, request.resize_mode, enlarge=enlarge), None
    if request.resize_mode == LATENT_RESIZE and not request.inpaint_full_res:  # laid into the picture at run size
        raise InvalidRequest(f"resize_mode: {RESIZE_MODES[LATENT_RESIZE]} does not go with a mask on the whole "
                             f"picture; pick one of {', '.join(RESIZE_MODES[:LATENT_RESIZE])}, or Only masked")
    mask = _read_picture(mask, "mask", lambda picture: read_mask(picture, image.size))
    try:
        width, height, start, inpainting = prepare_inpainting(image, mask, request, enlarge)
    except ValueError as err:
        raise InvalidRequest(f"mask: {err}") from None
    request = parse_request(request.model_dump() | fields | {"mask": image_sha1(mask), "width": width, "height": height})
    return request, start, inpainting


def _enlarges(request: GenerationRequest, picture: Image.Image | None, inpainting: Inpainting | None) -> bool:
    """Whether the Upscaler for img2img has a picture to enlarge: one is named, and the fit makes the start picture
    (Only masked: the part drawn) larger than it is."""
    if picture is None or request.upscaler_for_img2img in (None, NO_UPSCALER) or request.resize_mode == LATENT_RESIZE:
        return False
    if inpainting is not None and request.inpaint_full_res:
        left, top, right, bottom = inpainting.box
        return enlarges((right - left, bottom - top), request.width, request.height, 2)
    return enlarges(upright_size(picture), request.width, request.height, request.resize_mode)


def _with_control_image(request: GenerationRequest, picture: Image.Image | None,
                        init_image: Image.Image | None = None) -> tuple[GenerationRequest, Image.Image | None]:
    """A ControlNet request marked by its control picture's hash, and the picture in RGB; with ControlNet off, the
    request as it is and no picture (one left in a closed ControlNet section is not used). img2img without a
    control picture is steered by its own picture (`init_image`) fitted by img2img's resize mode, as the extension."""
    if not request.uses_controlnet:
        return request, None
    if picture is None and init_image is not None:
        mode = 0 if request.resize_mode == LATENT_RESIZE else request.resize_mode  # the extension's Just Resize
        picture = fit_image(_read_picture(init_image, "init_image", as_rgb), request.width, request.height, mode)
    if picture is None:
        raise InvalidRequest(NO_PICTURE)
    picture = _read_picture(picture, "controlnet_image", as_rgb)
    return parse_request(request.model_dump() | {"controlnet_image": image_sha1(picture)}), picture


def _name_parts(job: Job, image: GeneratedImage, picture: Image.Image | None = None) -> NameParts:
    """What the file name and folder patterns' tags say of one of the job's pictures (`picture`: the one saved,
    where not the image's own: a grid, a copy from before the hires fix). [width] and [height] are the saved
    picture's, as A1111's (the hires fix's result is named by its own size)."""
    request, model = job.request, job.model
    picture = image.image if picture is None else picture
    width, height = picture.size
    started = job.started_at or job.created_at
    return NameParts(
        seed=image.seed, prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
        cfg_scale=request.cfg_scale, width=width, height=height, sampler=request.sampler_name,
        scheduler=request.scheduler, model_name=model.entry.name, model_hash=model.short_hash or "",
        clip_skip=request.clip_skip,
        denoising_strength=request.denoising_strength if request.is_img2img or request.enable_hr else None,
        batch_number=0 if request.sd_upscale else image.index % request.batch_size, batch_size=request.batch_size,
        prompt_no_styles=job.prompts_before_styles[0] if job.prompts_before_styles else None,
        negative_no_styles=job.prompts_before_styles[1] if job.prompts_before_styles else None,
        styles=tuple(request.styles), seeds=tuple(job.seeds), image_number=image.index,
        image_count=1 if request.sd_upscale else request.image_count,
        job_started=dt.datetime.fromtimestamp(started), vae_file=job.vae.name if job.vae else None, picture=picture)


def _tiles_for(request: GenerationRequest, picture_size: tuple[int, int]) -> TileLayout:
    """SD upscale's tiles for a picture of `picture_size`, of the request's size; InvalidRequest saying what to
    change."""
    try:
        return tile_layout(picture_size, (request.width, request.height), request.sd_upscale_overlap,
                           request.sd_upscale_scale, request.sd_upscale_upscaler)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def _read_picture(picture: Image.Image, field: str, read: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """An uploaded picture read into memory by `read`, or InvalidRequest naming the field and what to send."""
    if not isinstance(picture, Image.Image):
        raise InvalidRequest(f"{field}: expected a picture, got {type(picture).__name__}")
    try:
        check_picture_size(*picture.size)
    except ValueError as err:
        raise InvalidRequest(f"{field}: {err}") from None
    try:
        return read(picture)
    except (OSError, ValueError) as err:  # a truncated or damaged file fails only when its pixels are read
        raise InvalidRequest(f"{field}: the picture cannot be read ({err}); send a PNG, JPEG or WebP file") from None


def _inpainting_infotext(request: GenerationRequest) -> dict[str, Any]:
    """Inpainting's infotext keys, as A1111 writes them: each only where it is not the default."""
    if not request.is_inpainting:
        return {}
    only_masked = request.inpaint_full_res
    return {"Mask blur": request.mask_blur or None,
            "Mask mode": MASK_MODES[1] if request.inpainting_mask_invert else None,
            "Masked content": None if request.inpainting_fill == 1 else MASKED_CONTENT[request.inpainting_fill],
            "Inpaint area": INPAINT_AREAS[1] if only_masked else None,
            "Masked area padding": request.inpaint_full_res_padding if only_masked else None}


def _soft_inpainting_infotext(request: GenerationRequest) -> dict[str, Any]:
    """Soft inpainting's keys, as A1111 writes them: all of them, where it inpainted with it on."""
    if not (request.soft_inpainting and request.is_inpainting):
        return {}
    return {ENABLED_KEY: True} | {key: getattr(request, name)
                                  for key, name in zip(SOFT_INPAINTING_KEYS, SOFT_INPAINTING_FIELDS)}


def _uncond_skip_infotext(request: GenerationRequest) -> dict[str, Any]:
    """A1111's keys for the sampler options that leave the negative prompt out of some calls, when they are set."""
    return {"Skip Early CFG": request.skip_early_cond or None, "NGMS": request.s_min_uncond or None,
            "NGMS all steps": True if request.s_min_uncond and request.s_min_uncond_all else None}


def _step_options_infotext(request: GenerationRequest) -> dict[str, Any]:
    """A1111's keys for the step options the passes' samplers follow (where not at their defaults), and its ENSD where
    a sampler draws noise as it steps."""
    options = StepOptions.of(request)
    samplers = [(request.sampler_name, request.denoising_steps)] + (
        [(request.hires_sampler[0], request.hires_steps)] if request.enable_hr else [])
    followed = {name: value for sampler, _ in samplers for name, value in options.followed(sampler).items()}
    drawing = any(draws_noise(sampler, options, steps) for sampler, steps in samplers)
    return {**{STEP_INFOTEXT_KEYS[name]: value for name, value in followed.items()},
            "ENSD": request.eta_noise_seed_delta if request.eta_noise_seed_delta and drawing else None}


def _schedule_range_infotext(request: GenerationRequest) -> dict[str, Any]:
    """A1111's Schedule min sigma, max sigma and rho keys, where set and a pass ran a schedule type that reads them
    (rho: Karras not at its own 7, Polyexponential not at its 1). The old Karras range writes its ends as these keys (A1111 writes
    nothing for it), so that the text makes the same picture again, here or in A1111, whatever its settings."""
    schedules = request.pass_schedules
    if not schedules & set(ENDS_SCHEDULES):
        return {}
    rho_changes = ("Karras" in schedules and request.rho != KARRAS_RHO
                   or "Polyexponential" in schedules and request.rho != POLYEXPONENTIAL_RHO)
    rho = request.rho if rho_changes else 0
    smallest, largest = OLD_KARRAS_ENDS if request.use_old_karras_scheduler_sigmas else (0.0, 0.0)
    return {"Schedule min sigma": request.sigma_min or smallest or None,
            "Schedule max sigma": request.sigma_max or largest or None, "Schedule rho": rho or None}


def _hires_infotext(request: GenerationRequest) -> dict[str, Any]:
    """The hires fix's infotext keys, as A1111 writes them: the scale, or the size asked for instead."""
    if not request.enable_hr:
        return {}
    resized = request.hr_resize_x or request.hr_resize_y
    return {"Hires upscale": None if resized else request.hr_scale,
            "Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}" if resized else None,
            "Hires steps": request.hr_second_pass_steps or None, "Hires upscaler": request.hr_upscaler,
            # As A1111: only where they differ from the first pass's.
            "Hires sampler": request.hires_sampler[0] if request.hires_sampler[0] != request.sampler_name else None,
            "Hires schedule type": (request.hires_sampler[1] if request.hires_sampler[1] != request.scheduler
                                    else None),
            "Hires prompt": request.hr_prompt, "Hires negative prompt": request.hr_negative_prompt}


def _unipc_infotext(request: GenerationRequest) -> dict[str, Any]:
    """A1111's keys for its UniPC settings, where a pass runs UniPC and they are not the defaults."""
    if not request.uses_unipc:
        return {}
    defaults = GenerationRequest.model_fields
    return {key: getattr(request, name) if getattr(request, name) != defaults[name].default else None
            for name, key in UNIPC_INFOTEXT_KEYS.items()}


def _emphasis_infotext(request: GenerationRequest) -> str | None:
    """A1111's key: the emphasis mode, where it is not the default and a prompt has brackets it changes."""
    texts = (request.prompt, request.negative_prompt, request.hr_prompt or "", request.hr_negative_prompt or "")
    if request.emphasis in (None, ORIGINAL) or not any("(" in text or "[" in text for text in texts):
        return None
    return request.emphasis


def _check_edit_model(request: GenerationRequest, model: LoadedModel) -> None:
    problem = model.edit and edit_problem(request)
    if problem:
        raise InvalidRequest(problem)


def _check_clip_skip(request: GenerationRequest, model: LoadedModel) -> None:
    if request.clip_skip > model.text_encoder_layers:
        raise InvalidRequest(f"clip_skip: {model.entry.name}'s text encoder has {model.text_encoder_layers} "
                             f"layers; use 1 to {model.text_encoder_layers}")


def _seeds_from(first: int, count: int) -> list[int]:
    """`count` seeds counting up from `first` (-1: a random one). They wrap past the largest seed, so every
    recorded seed can be typed back in."""
    start = random_seed() if first == -1 else first
    return [seed_after(start, i) for i in range(count)]
