"""The REST routes: stable-diffusion-webui's /sdapi/v1/* and our per-job /api/v1/jobs/*.

Each route is a thin adapter over the worker, the registry and storage. Everything goes through
the worker's one queue, so an API job shows in the UI's queue positions, in /progress and, when
saved, in the history. Errors always come back as JSON {"error", "detail"} with a 4xx/5xx status,
whatever app the routes are attached to (our route class formats them, not app-wide handlers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import anyio
import torch
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from webui.api import controlnet, convert, scripts
from webui.api.training import TrainingRoutes
from webui.api.convert import ApiError
from webui.api.models import (
    ErrorResponse, ExtrasBatchImagesRequest, FaceRestorerItem, ExtrasBody, ExtrasBatchImagesResponse, ExtrasSingleImageRequest,
    ExtrasSingleImageResponse, GenerationBody, GenerationResponse, Img2ImgRequest, InterrogateRequest,
    HypernetworkItem, InterrogateResponse, JobCancelReply, JobCreated,
    JobStatus, LatentUpscaleModeItem, LoraItem, MemoryResponse, OptionsUpdateResponse, PNGInfoRequest,
    PNGInfoResponse, ProgressResponse, PromptStyleItem, SamplerItem, SchedulerItem, ScriptArg, ScriptInfo,
    RealesrganItem, ScriptsList, SDModelItem, Txt2ImgRequest, UpscalerItem, VaeItem,
)
from webui.engine.hires import LATENT_UPSCALERS, NO_UPSCALER
from webui.engine.loader import ModelFileError, ModelLoadError
from webui.engine.generate import LoadedModel
from webui.engine.models import ModelEntry, ModelNotFound
from webui.engine.vae import AUTOMATIC, VaeError
from webui.engine.samplers import SAMPLERS, SCHEDULE_TYPES, schedule_key

# As A1111's /sdapi/v1/schedulers gives them: the types that read the model's sigma table, the rho of two, one alias
SIGMAS_FROM_MODEL = ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta")
_DEFAULT_RHO = {"Karras": 7.0, "Polyexponential": 1.0}
_SCHEDULE_ALIASES = {"SGM Uniform": ["SGMUniform"]}
from webui.engine.upscalers import picture_upscalers
from webui.extras import EXTRAS_UPSCALERS, Upscalers
from webui.schemas import FACE_RESTORERS, GenerationRequest, InvalidRequest, JobState, describe_validation_errors
from webui.runs import SeveralJobs, saved_grids
from webui.storage.history import owner_key
from webui.storage.options import OPTION_KEYS, SettingsFrozen
from webui.worker import Job, QueueFull, WorkerStopped, await_result

log = logging.getLogger(__name__)
# A1111's options the API keeps for requests that give none, beside the Settings tab's, in the settings file
REMEMBERED_API_OPTIONS = ("CLIP_stop_at_last_layers", "sd_vae", *convert.API_OPTIONS)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (401, "wrong or missing credentials (with --api-auth)"),
        (404, "unknown model or job"),
        (422, "a field is invalid; the detail names it"),
        (503, "the queue is full; retry after Retry-After seconds"),
    )
}


def caller_of(request: Request) -> str:
    """Who is calling: the --api-auth user when auth is on, else the client's address."""
    user = getattr(request.state, "api_user", None)
    if user is not None:
        return f"user {user}"
    return f"address {request.client.host if request.client else 'unknown'}"


# What FastAPI says of a body its JSON reader fails on other than by syntax (bytes that are not UTF-8, nesting deeper
# than the reader goes, an integer longer than Python reads), and what we say instead
_UNPARSED_BODY = "There was an error parsing the body"
UNREADABLE_BODY = ("body: cannot be read as JSON (bytes that are not UTF-8 text, lists and objects nested too deep, "
                   "or a number of thousands of digits); send a UTF-8 JSON object such as {\"prompt\": \"a cat\"}")


def error_response(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


class ApiRoute(APIRoute):
    """Turns every failure of our routes into JSON {"error", "detail"}: bad input, auth, crashes."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request):
            try:
                return await handler(request)
            except ApiError as err:
                return error_response(err.status, err.kind, err.message, err.headers)
            except RequestValidationError as err:
                detail = describe_validation_errors(err.errors())
                if _body_not_sent_as_json(request, err.errors()):  # curl -d sends a form
                    detail += ("; send the body as JSON with the header Content-Type: application/json (curl: "
                               "-H 'Content-Type: application/json')")
                return error_response(422, "InvalidRequest", detail)
            except StarletteHTTPException as err:
                if err.status_code == 400 and err.detail == _UNPARSED_BODY:  # FastAPI's words: say what to fix
                    return error_response(400, "InvalidRequest", UNREADABLE_BODY)
                return error_response(err.status_code, "HTTPException", str(err.detail), err.headers)
            except Exception as err:  # the server stays up and says what broke
                log.exception("API error: %s %s", request.method, request.url.path)
                return error_response(500, type(err).__name__, str(err) or type(err).__name__)

        return guarded


def _body_not_sent_as_json(request: Request, errors: list[dict[str, Any]]) -> bool:
    """Whether the body is refused as a whole because it came as another type than JSON (FastAPI reads it only
    with a JSON Content-Type)."""
    content_type = request.headers.get("content-type", "")
    return "json" not in content_type.lower() and any(tuple(error.get("loc", ())) == ("body",) for error in errors)


@dataclasses.dataclass(frozen=True)
class _OptionChanges:
    """What a set of A1111 options changes for later API requests (the model aside), checked."""
    clip_skip: int | None
    sd_vae: str | None
    api_options: dict[str, Any]
    saved: dict[str, Any]  # the Settings tab's, for everyone


@dataclasses.dataclass(eq=False)
class _Switch:
    """An sd_model_checkpoint load queued (`load`, of the model at `source`), and the requests queued behind it that
    name its model (its followers). `before`: the option as the load was queued: the switch in line before this
    one, or a model's source (None: the server's model)."""
    source: str
    before: _Switch | str | None
    load: Future | None = None
    followers: list[Job] = dataclasses.field(default_factory=list)

    def option_after(self) -> str | None:
        """The option once this switch's load has ended (it has, in queue order, where this is read on the worker)."""
        if self.load is not None and self.load.done() and self.load.exception() is None:
            return self.source
        return self.option_before()

    def option_before(self) -> str | None:
        return self.before.option_after() if isinstance(self.before, _Switch) else self.before


class Api:
    """The route handlers, bound to one set of services."""

    def __init__(self, services):
        self.services = services
        self.worker = services.worker
        self.registry = services.registry
        self.engine = services.engine
        # The clip skip of API requests that give none (A1111's CLIP_stop_at_last_layers option). Kept in the
        # settings file, as A1111 keeps it, so a restart (or A1111's own config.json) starts from it.
        self.clip_skip = 1
        self.sd_vae = AUTOMATIC  # A1111's sd_vae option: the VAE of API requests that give none; kept too
        # A1111's sampler and token merging options (eta, ENSD, NGMS, ...) POST /options set, for API requests that
        # give none; likewise
        self.api_options: dict[str, Any] = {}
        self._take_remembered_options()
        self._extras_turn = anyio.CapacityLimiter(1)  # Extras requests, one at a time
        # The model of API requests that name none: the last sd_model_checkpoint set (None: the loaded one).
        # A browser tab's Generate runs its own pick, so it must not undo an API client's choice either.
        self.model: LoadedModel | None = None
        # The last job whose override_settings switched the model without restoring it afterwards: once done,
        # its model is the option's, as in A1111, where such an override stays set.
        self._kept_override: Job | None = None
        # An sd_model_checkpoint load queued and not over: requests queued meanwhile name its model and follow it.
        self._switching: _Switch | None = None
        self._switch_lock = threading.Lock()  # a request's read of _switching and its joining the followers are one
        self._runs: list[SeveralJobs] = []  # the scripts' runs of several jobs going on, for /progress and /interrupt
        self.training = TrainingRoutes(services, caller_of)  # /sdapi/v1/create/..., /train/...

    # --- generation ---------------------------------------------------------------------------
    async def txt2img(self, req: Txt2ImgRequest, request: Request) -> GenerationResponse:
        """Queue a txt2img job and answer when it has finished (A1111's blocking call)."""
        return await self._generate(req, request)

    async def img2img(self, req: Img2ImgRequest, request: Request) -> GenerationResponse:
        """Queue an img2img job from the one picture in init_images and answer when it has finished. Its
        `parameters` leave init_images out (null) unless include_init_images is true, as A1111's do."""
        return await self._generate(req, request)

    async def _generate(self, req: GenerationBody, request: Request) -> GenerationResponse:
        if _script_of(req) in scripts.SEVERAL_JOBS:
            return await self._run_script(req, request)
        job = await anyio.to_thread.run_sync(self._submit, req, caller_of(request))
        # Wait on a thread of its own, outside the shared pool, so that many waiting clients
        # never starve /progress or /interrupt. The queue limit bounds how many wait at once.
        await anyio.to_thread.run_sync(job.wait, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
        return await anyio.to_thread.run_sync(self._result, job, req.parameters())

    def submit_job(self, req: Txt2ImgRequest, request: Request) -> JobCreated:
        """Queue a txt2img job and answer at once with its id (cancel it with /cancel)."""
        return self._job_created(req, request)

    def submit_img2img_job(self, req: Img2ImgRequest, request: Request) -> JobCreated:
        """Queue an img2img job (the body of /sdapi/v1/img2img) and answer at once with its id."""
        return self._job_created(req, request)

    def _job_created(self, req: GenerationBody, request: Request) -> JobCreated:
        job = self._submit(req, caller_of(request))
        return JobCreated(id=job.id, state=job.state.value, position=self.worker.position(job.id))

    def _vae_exists(self, name: str) -> bool:
        try:
            self.engine.vaes.check(name)
        except VaeError:
            return False
        return True

    def _submit(self, req: GenerationBody, caller: str) -> Job:
        kept_options = self._kept_options(req)
        script = _script_of(req)
        with self._switch_lock:  # the model a switch in line gives it, and its place among the switch's followers
            data, notes, names = self._request_data(req)  # (before the pictures: it says what is missing)
            init_image, mask = convert.init_image_of(req), convert.mask_of(req)
            with self._queueing(names):
                if script in scripts.SEVERAL_JOBS:  # (on /api/v1/jobs: one job id cannot stand for several)
                    raise InvalidRequest(f"script_name: {script} runs several jobs; send it to "
                                         f"/sdapi/v1/{convert.kind_of(req)}, which answers once all have run")
                if script == scripts.OUTPAINTING:
                    init_image, mask, fields = scripts.outpainting(_script_args(req), init_image, mask)
                    data |= fields
                job = self.worker.submit(data, origin="api", owner=caller, warnings=notes, field_names=names,
                                         init_image=init_image, mask=mask,
                                         control_image=controlnet.control_image_of(req))
            switch = self._switching
            if switch is not None and data["model"] == switch.source and not data["keep_model"] \
                    and not data["restore_model"]:  # it named the option's model being loaded, not one of its own
                switch.followers.append(job)
            if data["keep_model"]:
                self._kept_override = job
                self._switching = None  # this job's model, queued after that load, is the one that stays
        self._keep_options(job, kept_options)
        return job

    def _keep_options(self, job: Job, kept: _OptionChanges | None) -> None:
        """A queued request's kept override_settings set for later requests; the job is queued, so one that cannot
        be saved is a warning on it, not the request's error."""
        if kept is None:
            return
        try:
            self._apply_options(kept)
        except ApiError as err:
            job.warnings.append(f"override_settings: {err.message}")

    def _kept_options(self, req: GenerationBody) -> _OptionChanges | None:
        """A1111 leaves a request's override_settings set when override_settings_restore_afterwards is false: the
        options (the model aside, kept by _kept_override) become those of later requests, as POST /options would
        set them; checked before the request is queued."""
        overrides = {key: value for key, value in (req.override_settings or {}).items()
                     if key != "sd_model_checkpoint"}
        if req.override_settings_restore_afterwards is not False or not overrides:
            return None
        try:
            return self._option_changes(overrides)
        except ApiError as err:
            raise ApiError(err.status, f"override_settings.{err.message}", err.kind) from None

    def _request_data(self, req: GenerationBody) -> tuple[dict[str, Any], list[str], dict[str, str]]:
        """A body's GenerationRequest fields (with the model, clip skip and VAE of requests that give none), notes on
        what runs other than asked, and the body's names for our fields; ApiError for what is refused."""
        model, chosen, notes = self._model_of_requests()
        default_model = model.entry.source if chosen else None
        kept, switching = self._kept_override, self._switching
        if switching is not None:
            # The option's model is loading, queued before this one (first in, first out): this one names it, as in
            # A1111, where the option is set at once (a tab's job queued between must not decide its model). Where
            # the load fails, the option goes back: Api._fall_back gives a follower the model it goes back to.
            model, default_model = None, switching.source
        elif kept is not None and not kept.state.finished:
            # It runs before this one (the queue is first in, first out), and its model stays: this one's too.
            # The clip skip is checked against that model once it is loaded.
            model, default_model = None, kept.request.model
        loaded = self.engine.model  # an override may name it though it is not listed (a --ckpt path)
        default_clip_skip, clip_skip_notes = convert.clip_skip_for(req, self.clip_skip, model)
        data, request_notes = convert.to_generation_request(req, self.registry, loaded.entry if loaded else None,
                                                            default_clip_skip=default_clip_skip,
                                                            default_model=default_model, default_vae=self.sd_vae,
                                                            vae_exists=self._vae_exists,
                                                            default_options=self.api_options)
        controlnet_fields, controlnet_notes = controlnet.controlnet_fields(req)  # alwayson_scripts.controlnet
        names = convert.client_field_names(req) | controlnet.field_names(req)
        return data | controlnet_fields, notes + clip_skip_notes + request_notes + controlnet_notes, names

    @contextlib.contextmanager
    def _queueing(self, names: dict[str, str]):
        """Refusals of the worker as the client's errors."""
        try:
            yield
        except InvalidRequest as err:  # e.g. a clip skip deeper than the loaded model, named as the client sent it
            raise ApiError(422, convert.rename_fields(str(err), names), "InvalidRequest") from None
        except QueueFull as err:
            raise ApiError(503, str(err), "QueueFull", headers={"Retry-After": str(self._retry_after())}) from None
        except WorkerStopped as err:
            raise ApiError(503, str(err), "ServerStopping") from None

    # --- scripts that run several jobs ----------------------------------------------------------
    async def _run_script(self, req: GenerationBody, request: Request) -> GenerationResponse:
        """A script's jobs, every one checked before the first is queued, run in turn; the answer once all have run
        (or Interrupt ended them), as A1111's."""
        script, names, keeps_model, kept_options = await anyio.to_thread.run_sync(self._plan_script, req)
        # As _generate's wait: on a thread of its own, so many waiting clients never starve /progress or /interrupt.
        await anyio.to_thread.run_sync(self._run_in_turn, script, caller_of(request), names, keeps_model, kept_options,
                                       abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
        return await anyio.to_thread.run_sync(self._script_result, script, req)

    def _plan_script(self, req: GenerationBody
                     ) -> tuple[scripts.ScriptRun, dict[str, str], bool, _OptionChanges | None]:
        kept_options = self._kept_options(req)
        data, notes, names = self._request_data(req)
        if data.get("controlnet_enabled"):  # its picture travels with one job, not with a script's several
            raise ApiError(422, f"alwayson_scripts.controlnet: not with script_name {_script_of(req)!r}; send the "
                                "ControlNet unit without a script", "InvalidRequest")
        init_image, mask = convert.init_image_of(req), convert.mask_of(req)
        try:
            script = scripts.several_jobs(convert.kind_of(req), _script_of(req), _script_args(req), data, init_image,
                                          mask, self.worker, self._find_model)
        except InvalidRequest as err:
            raise ApiError(422, convert.rename_fields(str(err), names), "InvalidRequest") from None
        script.notes[:0] = notes
        return script, names, data["keep_model"], kept_options

    def _find_model(self, name: str) -> str:
        """A Checkpoint name axis's value: the listed model of that name (ModelNotFound for none)."""
        loaded = self.engine.model
        return self.registry.find_listed(name, loaded.entry if loaded else None).name

    def _run_in_turn(self, script: scripts.ScriptRun, caller: str, names: dict[str, str], keeps_model: bool,
                     kept_options: _OptionChanges | None) -> None:
        run = script.run
        run.owner = caller  # from now on /interrupt finds it, even between two jobs
        self._runs.append(run)
        try:
            with self._queueing(names):
                for job in run.in_turn(self.worker, "api", caller, field_names=names):
                    if keeps_model:
                        self._kept_override = job
                    if job is run.jobs[0]:  # set once its first job is queued, as a single job's
                        self._keep_options(job, kept_options)
                    job.wait()
        except ApiError as err:
            if not run.jobs:  # nothing ran: the request's error
                raise
            # A later job could not be queued (a Loopback loop skipped, a full queue): the answer holds what the jobs
            # before it made, as after an Interrupt, and says why the rest did not run.
            script.notes.append(f"{run.what}: ended after picture {len(run.jobs)} of {len(run.submissions)}: "
                                f"{err.message}")
        finally:
            self._runs.remove(run)

    def _script_result(self, script: scripts.ScriptRun, req: GenerationBody) -> GenerationResponse:
        run = script.run
        if run.job is None:
            raise ApiError(409, f"{_script_of(req)}: interrupted before its first job", "Interrupted")
        if run.job.state is JobState.FAILED:
            self._result(run.job, {})  # raises its error, as a job of its own would
        result = script.result()
        grids, options = result.grids, self.worker.saving_options(run.job)  # its jobs' own, as they saved theirs
        if req.save_images:
            grids = saved_grids(grids, self.services.outputs, convert.kind_of(req), options, what=run.what)
        return convert.run_result(run.jobs, grids, result.made, req.parameters(), self.engine.model, options,
                                  result.send_made, script.notes)

    def _run_of(self, job: Job) -> SeveralJobs | None:
        return next((run for run in list(self._runs) if run.job is job), None)

    def _model_of_requests(self) -> tuple[LoadedModel | None, bool, list[str]]:
        """The model API requests that name none run on, whether they must name it (the sd_model_checkpoint option
        chose it, or the server's model is not the one loaded now), and notes. The option's model while its files
        are there or it is loaded, else the loaded one (read once: the worker may switch models meanwhile)."""
        kept = self._kept_override
        if kept is not None and kept.state.finished:
            self._kept_override = None
            if kept.state is JobState.DONE and kept.model is not None:
                self.model = kept.model
        option, loaded = self.model, self.engine.model
        if option is None:  # the server's model (as A1111's, a plot's Checkpoint name axis does not change it)
            chosen = self.worker.chosen_model
            if chosen is not None and chosen is not loaded and _files_there(chosen.entry):
                return chosen, True, []
            return loaded, False, []
        entry = option.entry
        if _files_there(entry) or (loaded is not None and loaded.entry == entry):
            return option, True, []  # (a model deleted from disk runs on while it is loaded)
        if self.model is option:  # not one set meanwhile
            self.model = None
        return loaded, False, [f"sd_model_checkpoint: {entry.name}, set through the options, is gone from "
                               f"{entry.source}; the loaded model ran instead"]

    def _retry_after(self) -> int:
        running = self.worker.current()
        eta = running.progress.eta_seconds if running is not None else None
        return max(1, min(60, round(eta or 5)))

    def _result(self, job: Job, parameters: dict[str, Any]) -> GenerationResponse:
        if job.state is JobState.FAILED and job.refused:  # what the job's model could not do, known once loaded
            raise ApiError(422, _error_of(job), "InvalidRequest")
        if job.state is JobState.FAILED:
            raise ApiError(500, job.error or "the job failed", "GenerationFailed")
        return convert.job_result(job, parameters, self.engine.model, self.worker.saving_options(job))

    # --- our per-job routes ------------------------------------------------------------------------
    def get_job(self, job_id: str, request: Request,
                current_image: bool = Query(False, description="include the live preview")) -> JobStatus:
        """The caller's own API job; any other job id is answered as unknown."""
        job = self.worker.get(job_id)
        if job is not None and not _is_callers(job, request):
            raise ApiError(404, f"job_id: no job {job_id!r} of yours", "JobNotFound")
        if job is None:
            # Forgotten by the worker: the history has its state and times (not its prompt or images), and a
            # hash of its owner. A job of another caller, or one written before owners were kept, is unknown.
            row = self.services.history.get_job(job_id)
            if row is None or row["origin"] != "api" or row["owner_key"] != owner_key(caller_of(request)):
                raise ApiError(404, f"job_id: no job {job_id!r} of yours (finished jobs are kept for a while)",
                               "JobNotFound")
            return JobStatus(id=row["id"], state=row["state"], origin=row["origin"], error=row["error"],
                             created_at=row["created_at"], started_at=row["started_at"],
                             finished_at=row["finished_at"])
        status = JobStatus(
            id=job.id, state=job.state.value, origin=job.origin, position=self.worker.position(job.id),
            progress=convert.job_progress(job), error=_error_of(job), warnings=list(job.warnings), created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at,
        )
        preview = job.watch_preview() if current_image else None
        if preview is not None:
            status.current_image = convert.encode_image(preview, options=self.services.options.current())
        if job.state.finished and (job.state is not JobState.FAILED or job.images):  # a failed job: what it made
            status.result = convert.job_result(job, job.request.model_dump(), self.engine.model,
                                               self.worker.saving_options(job))
        return status

    def cancel_job(self, job_id: str, request: Request) -> JobCancelReply:
        """Cancel the caller's own API job; another client's or a web-UI user's is answered as unknown."""
        job = self.worker.get(job_id)
        if job is None or not _is_callers(job, request):
            raise ApiError(404, f"job_id: no job {job_id!r} of yours", "JobNotFound")
        if not self.worker.cancel(job_id):
            raise ApiError(409, f"job {job_id} has already finished ({job.state.value})", "JobFinished")
        return JobCancelReply(id=job.id, cancelled=True, state=job.state.value)

    # --- the running job ----------------------------------------------------------------------
    def progress(self, request: Request, skip_current_image: bool = Query(False)) -> ProgressResponse:
        """The running job's progress, whoever's it is (as in A1111); its id and live preview only to the
        caller who owns it."""
        job = self.worker.current()
        if job is None or job.state is not JobState.RUNNING:
            training = self.training.progress(request, skip_current_image)
            if training is not None:
                return training
            # Between jobs the worker may be loading or compiling a model: say so to clients waiting.
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=_idle_state(self.worker.queue_length()),
                                    textinfo=self.worker.activity)
        p, job_request, own = job.progress, job.request, _is_callers(job, request)
        preview = None if skip_current_image or not own else job.watch_preview()
        current_image = (None if preview is None
                         else convert.encode_image(preview, options=self.services.options.current()))
        steps = p.total_steps or job_request.steps
        state = {
            "skipped": job.skip_event.is_set(),
            "interrupted": job.cancel_event.is_set(),
            "stopping_generation": False,
            "job": f"scripts_{job.kind}",
            "job_count": job_request.n_iter,
            "job_timestamp": _timestamp(job.started_at),
            # SD upscale counts its pictures (one per batch count), not images of a batch
            "job_no": p.image_index if job_request.sd_upscale else p.image_index // job_request.batch_size,
            "sampling_step": p.step,
            "sampling_steps": steps,
            # ours: the queue behind the running job
            "queued": self.worker.queue_length(),
        }
        progress, eta, textinfo = min(p.fraction, 1.0), p.eta_seconds, p.note or f"Step {p.step}/{steps}"
        if eta is None:  # before the pace of its steps is known: A1111's estimate, from the time so far
            eta = _eta_from_elapsed(job.seconds or 0.0, progress)
        run = self._run_of(job)
        if run is not None:  # a script's run of several jobs: how far all of it has come, its jobs counted as A1111's
            number, count = len(run.jobs), len(run.submissions)
            progress, elapsed = run.fraction(), time.time() - run.started_at
            eta = _eta_from_elapsed(elapsed, progress) or eta
            state |= {"job": f"{number} out of {count}", "job_count": count, "job_no": number - 1}
            textinfo = f"{run.what}: picture {number} of {count}; {textinfo}"
        return ProgressResponse(progress=progress, eta_relative=eta, state=state, current_image=current_image,
                                textinfo=textinfo, current_task=job.id if own else None)

    def interrupt(self, request: Request) -> dict:
        """Stop the caller's API job (A1111's Interrupt): the running one, which keeps the images it
        finished, else its next queued one. Nobody else's job: not another client's, not a web-UI user's.
        The caller is the --api-auth user, else the client's address (clients behind one proxy share it).
        POST /api/v1/jobs/{id}/cancel stops one job by its id. The caller's embedding training stops too."""
        if self.training.interrupt(caller_of(request), running_only=True):  # the caller's training
            return {}
        job = self._callers_running_job(request) or self._callers_queued_job(request)
        # A script's run of several jobs ends whole, even between two of its jobs.
        run = self._run_of(job) if job is not None else next(
            (run for run in list(self._runs) if run.owner == caller_of(request)), None)
        if run is not None:
            run.stop(self.worker)
        elif job is not None:
            self.worker.cancel(job.id)
        else:
            self.training.interrupt(caller_of(request))  # a training of theirs that waits in the queue
        return {}

    def skip(self, request: Request) -> None:
        """End the caller's running API job's current batch and go on with its next one."""
        job = self._callers_running_job(request)
        if job is not None:
            self.worker.skip(job.id)

    def _callers_running_job(self, request: Request) -> Job | None:
        job = self.worker.current()
        return job if job is not None and _is_callers(job, request) else None

    def _callers_queued_job(self, request: Request) -> Job | None:
        return next((job for job in self.worker.waiting_jobs() if _is_callers(job, request)), None)

    # --- models and options ------------------------------------------------------------------
    def sd_models(self) -> list[SDModelItem]:
        return [
            SDModelItem(title=self.registry.title(entry), model_name=entry.name, hash=self.registry.short_hash(entry, cached_only=True),
                        sha256=self.registry.sha256(entry, cached_only=True), filename=entry.source, config=None)
            for entry in self.registry.entries()
        ]

    def refresh_checkpoints(self) -> None:
        self.registry.refresh()

    def loras(self) -> list[LoraItem]:
        library = self.engine.loras
        items = []
        for entry in library.entries():
            metadata = library.metadata(entry)
            items.append(LoraItem(name=entry.name, alias=str(metadata.get("ss_output_name") or entry.name),
                                  path=str(entry.path), metadata=metadata))
        return items

    def hypernetworks(self) -> list[HypernetworkItem]:
        """The hypernetworks folder's files, read again at each look, as A1111 lists them."""
        return [HypernetworkItem(name=entry.name, path=str(entry.path)) for entry in self.engine.hypernetworks.refresh()]

    def prompt_styles(self) -> list[PromptStyleItem]:
        return [PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
                for s in self.services.styles.styles()]

    def refresh_loras(self) -> None:
        self.engine.loras.refresh()

    async def refresh_embeddings(self) -> None:
        await self._on_worker(self.worker.refresh_embeddings())

    def vae_files(self) -> list[VaeItem]:
        return [VaeItem(model_name=vae.name, filename=str(vae.path)) for vae in self.engine.vaes.files()]

    @staticmethod
    def refresh_vae() -> None:
        """Refresh VAEs: the VAE folder is read again at each look, so there is nothing to do."""

    async def unload_checkpoint(self) -> dict:
        """Free the model's GPU memory (or RAM, on a CPU) for other programs, as A1111 does, once the jobs
        queued before are done; the next image, or reload-checkpoint, brings the model back."""
        await self._on_worker(self.worker.release_device())
        return {}

    async def reload_checkpoint(self) -> dict:
        """Bring an unloaded model back now, so the next image does not wait for it."""
        await self._on_worker(self.worker.restore_device())
        return {}

    @staticmethod
    async def _on_worker(future, about: str = "") -> Any:
        """The result of work queued on the worker. Awaited, not waited for on a thread: clients that set
        the model before every generation would otherwise fill the shared thread pool while a long job
        runs, and starve /progress and /interrupt."""
        try:
            return await await_result(future)
        except ModelNotFound as err:
            raise ApiError(404, f"{about}{err}", "ModelNotFound") from None
        except ModelFileError as err:  # the client's pick to change, not the server's failure
            raise ApiError(422, f"{about}{err}", "ModelFileError") from None
        except ModelLoadError as err:
            raise ApiError(500, f"{about}{err}", "ModelLoadError") from None
        except WorkerStopped as err:
            raise ApiError(503, str(err), "ServerStopping") from None

    def cmd_flags(self) -> dict[str, Any]:
        return convert.cmd_flags(self.services.settings)

    def get_options(self) -> dict[str, Any]:
        model = self._model_of_requests()[0]
        entry = model.entry if model else None
        return {
            "sd_model_checkpoint": self.registry.title(entry) if entry else None,
            "sd_checkpoint_hash": self.registry.sha256(entry, cached_only=True) if entry else None,
            "CLIP_stop_at_last_layers": self.clip_skip,
            "sd_vae": self.sd_vae,
            **{name: self.api_options.get(name, GenerationRequest.model_fields[field].default)
               for name, field in convert.API_OPTIONS.items()},
            **self.services.options.current().model_dump(),  # the Settings tab's: samples_format, return_grid, ...
        }

    async def set_options(self, body: dict[str, Any] = Body(..., examples=[{"sd_model_checkpoint": "model-name"}])
                          ) -> OptionsUpdateResponse:
        """Change settings: `sd_model_checkpoint` loads that model (after the jobs queued before it);
        `CLIP_stop_at_last_layers` is the clip skip of later API requests that give none of their own;
        `sd_vae` (Automatic, None or a file of GET /sdapi/v1/sd-vae) is the VAE of later API requests that give
        none of their own; A1111's sampler options (eta_ddim, eta_ancestral, s_churn, s_tmin, s_tmax, s_noise,
        eta_noise_seed_delta, s_min_uncond, s_min_uncond_all, skip_early_cond, img2img_extra_noise,
        initial_noise_multiplier, beta_dist_alpha, beta_dist_beta, sigma_min, sigma_max, rho), an SDXL refiner's
        sdxl_refiner_high_aesthetic_score and sdxl_refiner_low_aesthetic_score, and token merging options (token_merging_ratio, token_merging_ratio_hr,
        token_merging_ratio_img2img) are those of later API requests that give none; `samples_format`, `grid_format`
        (png, jpg or webp) and `jpeg_quality` are the Settings tab's, for everyone."""
        changes = self._option_changes(body)  # all checked before the model switch: a bad value changes nothing
        if body.get("sd_model_checkpoint"):
            await self._switch_model(body["sd_model_checkpoint"])
        if changes.clip_skip is not None:
            try:
                convert.check_clip_skip_depth(changes.clip_skip, self._model_of_requests()[0])  # the one it applies to
            except ApiError as err:
                if not body.get("sd_model_checkpoint"):
                    raise
                # The switch stands: a client must not take the refusal for "nothing changed".
                raise ApiError(err.status, f"{err.message} (sd_model_checkpoint was applied: "
                                           f"{self.model.entry.name} is loaded now)", err.kind) from None
        self._apply_options(changes)
        applied = [key for key, value in body.items()
                   if key in ("CLIP_stop_at_last_layers", "sd_vae", *OPTION_KEYS, *changes.api_options)
                   or (key == "sd_model_checkpoint" and value)]
        ignored = [key for key in body if key not in applied]
        return OptionsUpdateResponse(applied=applied, ignored=ignored)

    def _option_changes(self, body: dict[str, Any]) -> _OptionChanges:
        """What the options in `body` change (the model aside), each value checked: ApiError for one refused."""
        vae = None
        if "sd_vae" in body:
            try:
                vae = convert.vae_choice(body["sd_vae"], "sd_vae")
                self.engine.vaes.check(vae)
                self.engine.check_vae_fits(vae)  # set for good: one that fails every later request is refused now
            except InvalidRequest as err:
                raise ApiError(422, str(err), "InvalidRequest") from None
        if body.get("upscaler_for_img2img") not in (None, "", NO_UPSCALER):  # a name the server has, or none saved
            try:
                self.engine.upscalers.check(str(body["upscaler_for_img2img"]))
            except InvalidRequest as err:
                raise ApiError(422, f"upscaler_for_img2img: {err}", "InvalidRequest") from None
        clip_skip = None
        if "CLIP_stop_at_last_layers" in body:
            clip_skip = convert.clip_skip_option(body["CLIP_stop_at_last_layers"])
        try:
            api_options = convert.api_option_values(body)
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None
        saved = {key: body[key] for key in OPTION_KEYS if key in body}
        try:
            self.services.options.check(saved)
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None
        except SettingsFrozen as err:
            raise ApiError(403, f"{', '.join(saved)}: {err}", "SettingsFrozen") from None
        except OSError as err:  # a settings file that cannot be read is not saved over
            raise ApiError(500, f"{', '.join(saved)} not saved, and nothing changed: {err}",
                           "SettingsNotSaved") from None
        return _OptionChanges(clip_skip, vae, api_options, saved)

    def _apply_options(self, changes: _OptionChanges, remember: bool = True) -> None:
        if changes.clip_skip is not None:
            self.clip_skip = changes.clip_skip
        if changes.sd_vae is not None:
            self.sd_vae = changes.sd_vae
        self.api_options |= changes.api_options
        if changes.saved:
            try:
                self.services.options.update(changes.saved)
            except OSError as err:  # checked before, so a disk that failed, or the file spoilt meanwhile
                raise ApiError(500, f"{', '.join(changes.saved)} not saved, and unchanged: {err}",
                               "SettingsNotSaved") from None
        if remember:
            self._remember_options(changes)

    def _take_remembered_options(self) -> None:
        """The API's options as the settings file keeps them; one this server cannot take is left out, with a
        warning (the file keeps it)."""
        remembered = self.services.options.remembered(REMEMBERED_API_OPTIONS)
        for key, value in remembered.items():
            try:
                changes = self._option_changes({key: value})
            except ApiError as err:
                log.warning("settings file %s: %s = %r is not taken (%s); the default applies until it is set again",
                            self.services.settings.options_path, key, value, err.message)
                continue
            self._apply_options(changes, remember=False)

    def _remember_options(self, changes: _OptionChanges) -> None:
        """The API's options just set, into the settings file for the next start, as A1111 keeps them."""
        values = {"CLIP_stop_at_last_layers": changes.clip_skip, "sd_vae": changes.sd_vae} | changes.api_options
        try:
            self.services.options.remember({key: value for key, value in values.items() if value is not None})
        except OSError as err:  # a read-only A1111 config.json: they still apply until the server stops
            log.warning("the API's options apply until the server stops but are not kept for the next start: %s",
                        err)

    async def _switch_model(self, value: Any) -> None:
        name = convert.model_name(value, "sd_model_checkpoint")
        loaded = self.engine.model.entry if self.engine.model else None
        entry = await anyio.to_thread.run_sync(convert.find_listed_model, self.registry, name, loaded)
        kept = self._kept_override  # queued before this load, so it runs first: the option set now wins
        with self._switch_lock:
            before = self._switching or (self.model.entry.source if self.model else None)
            switching = _Switch(entry.source, before)
            load = switching.load = self.worker.queue_model_load(
                name, on_failure=lambda: self._fall_back(switching))
            self._switching = switching
        try:
            loaded = await self._on_worker(load, "sd_model_checkpoint: ")
            if self._kept_override is kept:
                self._kept_override = None
            self.model = loaded  # before the switch is over: requests never see the old option meanwhile
        finally:
            with self._switch_lock:
                if self._switching is switching:
                    self._switching = None

    def _fall_back(self, switch: _Switch) -> None:
        """On the worker, where a switch's load failed, before anything queued behind it starts: the option goes back
        (as A1111's Options.set), so its followers run on the model it goes back to, and later requests on the
        option as it was."""
        with self._switch_lock:
            back = switch.option_before() or (self.worker.chosen_model.entry.source
                                              if self.worker.chosen_model else None)
            for job in switch.followers:
                job.request = job.request.model_copy(update={"model": back})
            if self._switching is switch:
                self._switching = None

    # --- lists ----------------------------------------------------------------------------------
    def samplers(self) -> list[SamplerItem]:
        # "scheduler": the schedule type Automatic stands for, under A1111's key and name
        return [SamplerItem(name=s.name, aliases=list(s.aliases),
                            options={**s.options, **({"scheduler": schedule_key(s.automatic)}
                                                     if s.automatic != "Automatic" else {})})
                for s in SAMPLERS]

    def schedulers(self) -> list[SchedulerItem]:
        """A1111's list: each schedule type."""
        return [SchedulerItem(name=schedule_key(label), label=label, aliases=_SCHEDULE_ALIASES.get(label),
                              default_rho=_DEFAULT_RHO.get(label, -1.0), need_inner_model=label in SIGMAS_FROM_MODEL)
                for label in SCHEDULE_TYPES]

    @staticmethod
    def scripts() -> ScriptsList:
        """The selectable and the always-on scripts of each tab, as A1111 lists them together."""
        return ScriptsList(**{kind: sorted(names + scripts.ALWAYS_ON[kind]) for kind, names in scripts.SCRIPTS.items()})

    def script_info(self) -> list[ScriptInfo]:
        """Each script's script_args, in A1111's order and with its labels, defaults and choices (SD upscale's model
        upscalers are taken by name); the always-on scripts' args are those of alwayson_scripts.<name>.args."""
        upscalers = picture_upscalers(self.engine.upscalers)
        return [ScriptInfo(name=name, is_img2img=kind == "img2img", is_alwayson=name in scripts.ALWAYS_ON[kind],
                           args=[ScriptArg(**arg) for arg in scripts.script_info(kind, name, upscalers)])
                for kind, names in scripts.SCRIPTS.items() for name in names + scripts.ALWAYS_ON[kind]]

    @staticmethod
    def none_installed() -> list:
        """Lists of features this server does not have (face restorers, extensions): empty, so
        clients that read them at start-up go on instead of failing on a 404."""
        return []

    def embeddings(self) -> dict[str, dict]:
        """The loaded model's textual inversions, as A1111 lists them (those for another model: skipped)."""
        found = self.engine.embeddings
        return {"loaded": {name: e.summary for name, e in found.loaded.items()},
                "skipped": {name: e.summary for name, e in found.skipped.items()}}

    # --- images and the machine ---------------------------------------------------------------
    async def extra_single_image(self, req: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        images, info = await self._upscaled(req, [("image", req.image)])
        return ExtrasSingleImageResponse(html_info=info, image=images[0])

    async def extra_batch_images(self, req: ExtrasBatchImagesRequest) -> ExtrasBatchImagesResponse:
        pictures = [(f"imageList[{i}]" + (f" ({item.name})" if item.name else ""), item.data)
                    for i, item in enumerate(req.imageList)]
        images, info = await self._upscaled(req, pictures)
        return ExtrasBatchImagesResponse(html_info=info, images=images)

    async def _upscaled(self, req: ExtrasBody, pictures: list[tuple[str, str]]) -> tuple[list[str], str]:
        # One request at a time: each may hold hundreds of MB of results. The others wait without taking a thread.
        return await anyio.to_thread.run_sync(convert.upscale_pictures, req, pictures, self.services.options.current(),
                                              Upscalers(self.services.worker), limiter=self._extras_turn)

    def upscalers(self) -> list[UpscalerItem]:
        # A1111 lists "None" first; its filters have no model, and no scale of their own. A model upscaler's scale
        # is known once its file is read, so it is left out (null) here.
        models = self.services.engine.upscalers.models()
        return [*(UpscalerItem(name=name) for name in EXTRAS_UPSCALERS),
                *(UpscalerItem(name=model.name, model_name=model.path.stem, model_path=str(model.path),
                               model_url=model.url) for model in models)]

    def face_restorers(self) -> list[FaceRestorerItem]:
        """A1111's face restorers, each with the folder its file is read from (and downloaded into)."""
        faces = self.services.engine.faces
        return [FaceRestorerItem(name=name, cmd_dir=str(faces.weight_file(name).path.parent))
                for name in FACE_RESTORERS]

    def realesrgan_models(self) -> list[RealesrganItem]:
        """The Real-ESRGAN folder's files and Real-ESRGAN's downloadable ones, as A1111 lists them (their scale is
        known once a file is read: null here)."""
        library = self.services.engine.upscalers
        return [RealesrganItem(name=model.name, path=model.url if model.url and not model.path.is_file()
                               else str(model.path))
                for model in library.models() if library.real_esrgan_folder in model.path.parents]

    @staticmethod
    def latent_upscale_modes() -> list[LatentUpscaleModeItem]:
        return [LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALERS]

    def png_info(self, req: PNGInfoRequest) -> PNGInfoResponse:
        return PNGInfoResponse(**convert.png_info(convert.decode_image(req.image, "image", pixels_needed=False)))

    async def interrogate(self, req: InterrogateRequest) -> InterrogateResponse:
        """A1111's Interrogate CLIP, after the jobs queued before it; the models are read from models/BLIP and
        models/CLIP, or downloaded once."""
        picture = convert.decode_image(req.image, "image")
        try:
            return InterrogateResponse(caption=await self._on_worker(self.services.worker.interrogate(picture, req.model)))
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None

    def memory(self) -> MemoryResponse:
        return MemoryResponse(ram=_ram(), cuda=_cuda())


def build_router(services, auth: Callable | None = None) -> APIRouter:
    api = Api(services)
    router = APIRouter(route_class=ApiRoute, dependencies=[Depends(auth)] if auth else [], responses=_ERRORS)
    sd = "/sdapi/v1"
    add = router.add_api_route
    add(f"{sd}/txt2img", api.txt2img, methods=["POST"], response_model=GenerationResponse, tags=["generate"])
    add(f"{sd}/img2img", api.img2img, methods=["POST"], response_model=GenerationResponse, tags=["generate"],
        summary="img2img from one init image, inpainting with a mask")
    add(f"{sd}/extra-single-image", api.extra_single_image, methods=["POST"],
        response_model=ExtrasSingleImageResponse, tags=["images"], summary="resize one picture (Extras)")
    add(f"{sd}/extra-batch-images", api.extra_batch_images, methods=["POST"],
        response_model=ExtrasBatchImagesResponse, tags=["images"], summary="resize several pictures (Extras)")
    add(f"{sd}/png-info", api.png_info, methods=["POST"], response_model=PNGInfoResponse, tags=["images"])
    add(f"{sd}/interrogate", api.interrogate, methods=["POST"], response_model=InterrogateResponse, tags=["images"])
    add(f"{sd}/progress", api.progress, methods=["GET"], response_model=ProgressResponse, tags=["queue"])
    add(f"{sd}/interrupt", api.interrupt, methods=["POST"], tags=["queue"])
    add(f"{sd}/skip", api.skip, methods=["POST"], tags=["queue"])
    add(f"{sd}/options", api.get_options, methods=["GET"], tags=["settings"])
    add(f"{sd}/options", api.set_options, methods=["POST"], response_model=OptionsUpdateResponse, tags=["settings"])
    add(f"{sd}/sd-models", api.sd_models, methods=["GET"], response_model=list[SDModelItem], tags=["models"])
    add(f"{sd}/refresh-checkpoints", api.refresh_checkpoints, methods=["POST"], tags=["models"])
    add(f"{sd}/loras", api.loras, methods=["GET"], response_model=list[LoraItem], tags=["models"])
    add(f"{sd}/refresh-loras", api.refresh_loras, methods=["POST"], tags=["models"])
    add(f"{sd}/refresh-embeddings", api.refresh_embeddings, methods=["POST"], tags=["models"])
    add(f"{sd}/sd-vae", api.vae_files, methods=["GET"], response_model=list[VaeItem], tags=["models"])
    add(f"{sd}/refresh-vae", api.refresh_vae, methods=["POST"], tags=["models"],
        summary="refresh-vae (the folder is read at each look: does nothing)")
    add(f"{sd}/unload-checkpoint", api.unload_checkpoint, methods=["POST"], tags=["models"])
    add(f"{sd}/reload-checkpoint", api.reload_checkpoint, methods=["POST"], tags=["models"])
    add(f"{sd}/samplers", api.samplers, methods=["GET"], response_model=list[SamplerItem], tags=["models"])
    add(f"{sd}/schedulers", api.schedulers, methods=["GET"], response_model=list[SchedulerItem], tags=["models"])
    add(f"{sd}/scripts", api.scripts, methods=["GET"], response_model=ScriptsList, tags=["models"])
    add(f"{sd}/prompt-styles", api.prompt_styles, methods=["GET"], response_model=list[PromptStyleItem],
        tags=["models"])
    add(f"{sd}/upscalers", api.upscalers, methods=["GET"], response_model=list[UpscalerItem], tags=["models"])
    add(f"{sd}/latent-upscale-modes", api.latent_upscale_modes, methods=["GET"],
        response_model=list[LatentUpscaleModeItem], tags=["models"])
    add(f"{sd}/script-info", api.script_info, methods=["GET"], response_model=list[ScriptInfo], tags=["models"])
    add(f"{sd}/realesrgan-models", api.realesrgan_models, methods=["GET"], response_model=list[RealesrganItem],
        tags=["models"])
    add(f"{sd}/hypernetworks", api.hypernetworks, methods=["GET"], response_model=list[HypernetworkItem],
        tags=["models"])
    add(f"{sd}/face-restorers", api.face_restorers, methods=["GET"], response_model=list[FaceRestorerItem],
        tags=["models"])
    add(f"{sd}/extensions", api.none_installed, methods=["GET"], response_model=list, tags=["models"],
        summary="extensions (none on this server: an empty list)")
    add(f"{sd}/embeddings", api.embeddings, methods=["GET"], tags=["models"])
    add(f"{sd}/memory", api.memory, methods=["GET"], response_model=MemoryResponse, tags=["settings"])
    add(f"{sd}/cmd-flags", api.cmd_flags, methods=["GET"], tags=["settings"])
    add("/api/v1/jobs", api.submit_job, methods=["POST"], response_model=JobCreated, status_code=202, tags=["jobs"],
        summary="queue a txt2img job")
    add("/api/v1/jobs/img2img", api.submit_img2img_job, methods=["POST"], response_model=JobCreated,
        status_code=202, tags=["jobs"], summary="queue an img2img job")
    add("/api/v1/jobs/{job_id}", api.get_job, methods=["GET"], response_model=JobStatus, tags=["jobs"])
    add("/api/v1/jobs/{job_id}/cancel", api.cancel_job, methods=["POST"], response_model=JobCancelReply,
        tags=["jobs"], responses={409: {"model": ErrorResponse, "description": "the job has already finished"}})
    controlnet.add_controlnet_routes(router, services)  # sd-webui-controlnet's /controlnet/* routes
    api.training.add_routes(add, sd)
    # Last, so they catch only what no route above takes: a wrong path or method under our prefixes still
    # gets a JSON error in our format, not the framework's plain one.
    for path in (f"{sd}/{{rest:path}}", "/api/v1/jobs{rest:path}"):
        add(path, _no_such_route(router), methods=_ALL_METHODS, include_in_schema=False)
    return router


_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def build_open_router() -> APIRouter:
    """Routes served without --api-auth: A1111's liveness check, which clients (SillyTavern's connection test) call
    before anything else. It says only that the server is up; A1111 serves it open too."""
    router = APIRouter(route_class=ApiRoute)
    router.add_api_route("/internal/ping", _ping, methods=["GET"], tags=["settings"],
                         summary="ping (an empty object: the server is up; needs no credentials)")
    return router


def _ping() -> dict:
    return {}


def _no_such_route(router: APIRouter) -> Callable:
    def no_such_route(request: Request, rest: str = "") -> None:
        # A route whose path matches but whose method does not reports a partial match.
        allowed = sorted({method for route in router.routes if isinstance(route, APIRoute)
                          and route.matches(request.scope)[0] is Match.PARTIAL for method in route.methods})
        if allowed:
            raise ApiError(405, f"{request.method} {request.url.path}: use {' or '.join(allowed)}", "MethodNotAllowed",
                           headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, f"{request.url.path}: no such API route; the list is at /docs", "NotFound")

    return no_such_route


def _files_there(entry: ModelEntry) -> bool:
    """The model can be loaded again: a hub model (from the cache), or files still on disk."""
    return entry.kind == "hub" or Path(entry.source).exists()


def _script_of(req: GenerationBody) -> str | None:
    """The script a body names, in A1111's lower case (None for none; one not here is refused with its fields)."""
    try:
        return scripts.script_name(req.script_name, convert.kind_of(req))
    except InvalidRequest:
        return None


def _script_args(req: GenerationBody) -> list[Any]:
    """The script's arguments read (they were checked with the body's other fields)."""
    return scripts.read_args(convert.kind_of(req), _script_of(req), req.script_args)[0]


def _error_of(job: Job) -> str | None:
    """A job's error as its client should read it: a refused request's fields under the names it sent."""
    return convert.rename_fields(job.error, job.field_names) if job.error and job.refused else job.error


def _is_callers(job: Job, request: Request) -> bool:
    """Whether this API caller submitted the job (web-UI jobs belong to their browser tab, never to a caller)."""
    return job.origin == "api" and job.owner == caller_of(request)


def _idle_state(queued: int) -> dict[str, Any]:
    """No job running; jobs may still be queued behind a model load or compile."""
    return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": queued}


def _eta_from_elapsed(elapsed: float, progress: float) -> float:
    """Seconds left, were the rest to go at the pace so far (A1111's eta_relative); 0 with nothing done yet."""
    return elapsed / progress - elapsed if progress > 0 else 0.0


def _timestamp(seconds: float | None) -> str:
    return dt.datetime.fromtimestamp(seconds).strftime("%Y%m%d%H%M%S") if seconds else "0"


def _ram() -> dict[str, Any]:
    try:
        import psutil  # optional: not a requirement of the project

        process = psutil.Process(os.getpid())
        rss, total = process.memory_info().rss, psutil.virtual_memory().total
        return {"free": total - rss, "used": rss, "total": total}
    except ImportError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"free": total - rss, "used": rss, "total": total}
    except (OSError, ValueError, AttributeError) as err:
        return {"error": str(err)}


def _cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name: str) -> dict[str, int]:
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        return {
            "system": {"free": free, "used": total - free, "total": total},
            "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    except RuntimeError as err:
        return {"error": str(err)}
