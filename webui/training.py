"""What A1111's Train tab does alike for embeddings and hypernetworks, between the page or the API and the engine
(webui/engine/training.py runs it): a new file's name checked, the Train fields checked into a TrainingPlan (the
dataset's pictures and their filewords, the prompt template, the log folder under the outputs folder), and a
TrainingRun: one run's state. The worker runs it (Worker.train) and it reports there; the page and
/sdapi/v1/progress read it, and its own Interrupt stops it. Nothing here is global: each run is its own object.

What is particular to each: webui/textual_inversion.py and webui/hypernetwork_training.py.
"""
from __future__ import annotations

import datetime as dt
import html
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from webui import __version__
from webui.config import Settings
from webui.engine.hypernetwork_training import train_hypernetwork
from webui.engine.models import files_under
from webui.engine.textual_inversion import train_embedding
from webui.engine.training import (
    CLIP_GRAD_MODES, LATENT_SAMPLING, TRAINED_SUFFIX, RateSchedule, TrainingOutcome, TrainingPicture, TrainingPlan,
    TrainingStatus,
)
from webui.schemas import MAX_SIZE, MIN_SIZE, GenerationRequest, InvalidRequest
from webui.storage.infotext import PROGRAM, build_infotext
from webui.storage.outputs import image_bytes, resolve_inside
from webui.zerogpu import zerogpu_requested

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "style_filewords.txt"  # A1111's default pick
DEFAULT_LOG_DIRECTORY = "textual_inversion"  # A1111's, for both; here inside the outputs folder
TEMPLATE_SUFFIX = ".txt"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_NAME_CHARS = 100
MAX_BATCH_SIZE = 64
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # A1111 drops a file name's leading numbers ("00012-") from filewords
NO_SERVER_FOLDERS = ("data_root: this server reads no folders named from the page (it is served to other machines "
                     "without a login, or started with --hide-ui-dir-config), so it trains on none; start it with "
                     "--gradio-auth, or without --hide-ui-dir-config, to train embeddings and hypernetworks")
NO_SERVER_FOLDERS_API = ("data_root: this server's API has no login and is served to other machines, so it trains on "
                         "no server folder named through it; start it with --api-auth user:password")
TRAINERS = {"embedding": train_embedding, "hypernetwork": train_hypernetwork}  # the engine's run, by plan.kind


# --- a new file ------------------------------------------------------------------------------------
def new_file_path(name: str, folder: Path, suffixes: tuple[str, ...], what: str, overwrite: bool) -> Path:
    """Where a new embedding or hypernetwork (`what`) named `name` goes: <folder>/<name>.pt; InvalidRequest saying
    what to change."""
    name = name.strip()
    if not name:
        raise InvalidRequest(f"name: give the {what} a name: prompts call it by that name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequest(f"name: at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise InvalidRequest(f"name: {name!r} becomes a file name in the {what}s folder: no /, \\ or .., and no "
                             ". at the start")
    odd = "".join(sorted({c for c in name if not (c.isalnum() or c in "._- ")}))
    if odd:
        raise InvalidRequest(f"name: {name!r} holds {odd!r}; use letters, digits, spaces and . _ - (it becomes a file "
                             "name)")
    path = folder / f"{name}{TRAINED_SUFFIX}"
    # The loaders take one file per name: another file of it would shadow ours (prompts read embeddings without case).
    others = [p for p in files_under(folder, suffixes) if p.stem.lower() == name.lower() and p != path]
    if others:
        raise InvalidRequest(f"name: the {what}s folder has {name} already, as {others[0].relative_to(folder)}; "
                             "pick another name")
    if path.exists() and not overwrite:
        raise InvalidRequest(f"name: {path.name} exists in the {what}s folder; pick another name, or overwrite it "
                             f"(Overwrite Old {what.capitalize()}; overwrite_old: true)")
    return path


# --- Train -----------------------------------------------------------------------------------------
class TrainFields(BaseModel):
    """A1111's train_embedding and train_hypernetwork arguments (its API's fields) that both take, with its page's
    defaults."""
    model_config = ConfigDict(extra="ignore")
    KIND: ClassVar[str]  # "embedding" or "hypernetwork"
    NAME_FIELD: ClassVar[str]  # the field naming what is trained
    SAVE_FIELD: ClassVar[str]  # the field for a copy every N steps

    learn_rate: str | float = Field("0.005", description="a rate, or a schedule: 0.005:100, 1e-3:1000, 1e-5 (each "
                                                         "rate until its step)")
    batch_size: int = 1
    gradient_step: int = Field(1, description="gradient accumulation steps: batches per training step")
    data_root: str = Field("", description="the folder of pictures on the server; [filewords] comes from a .txt "
                                           "beside each picture, else its file name")
    log_directory: str = Field(DEFAULT_LOG_DIRECTORY, description="inside the outputs folder; the run writes in "
                                                                  "<log_directory>/<date>/<name>")
    training_width: int = 512
    training_height: int = 512
    steps: int = Field(100000, description="train until it has this many steps")
    clip_grad_mode: str = Field("disabled", description="gradient clipping: disabled, value or norm")
    clip_grad_value: str | float = Field("0.1", description="the clipping limit (a schedule, as learn_rate)")
    shuffle_tags: bool = Field(False, description="shuffle the filewords' tags (split at commas) in each prompt")
    tag_drop_out: float = Field(0.0, description="leave each tag out with this chance (0 to 1)")
    latent_sampling_method: str = Field("once", description="once, deterministic or random")
    create_image_every: int = Field(500, description="a preview picture every N steps (0: none)")
    template_filename: str = Field(DEFAULT_TEMPLATE, description="a prompt template (.txt) of the templates folder")
    # A1111's, not offered here: refused when they ask for something.
    varsize: bool = Field(False, description="not offered: pictures are resized to the training size")
    use_weight: bool = Field(False, description="not offered: the loss is not weighted by the pictures' alpha")
    preview_from_txt2img: bool = Field(False, description="not offered: previews draw the training prompt")


def plan_run(train: TrainFields, settings: Settings, known: list[str], today: dt.date | None = None,
             origin: str = "ui") -> TrainingPlan:
    """The run `train` asks for, checked before it is queued; InvalidRequest naming the field and what to change.
    `known`: the names that may be trained; `origin`: "ui" or "api", who asks. What is trained is found again, and
    the pictures read, when the run starts (on the worker)."""
    if zerogpu_requested():
        raise InvalidRequest("training needs a GPU of its own for minutes or hours; ZeroGPU lends one for a picture "
                             "at a time: train on a GPU Space or machine")
    if not reads_server_folders(settings, origin):
        raise InvalidRequest(NO_SERVER_FOLDERS_API if origin == "api" else NO_SERVER_FOLDERS)
    _refuse_unoffered(train)
    name = _known_name(train, known)
    schedule = RateSchedule.parse(str(train.learn_rate), "learn_rate")
    _check_numbers(train)
    clip_value = None
    if train.clip_grad_mode != "disabled":
        clip_value = RateSchedule.parse(str(train.clip_grad_value), "clip_grad_value")
    pictures = dataset_pictures(train.data_root)
    if train.batch_size > len(pictures):
        raise InvalidRequest(f"batch_size: {train.batch_size} is more than the {len(pictures)} picture"
                             f"{'s' if len(pictures) != 1 else ''} in data_root; lower it")
    return TrainingPlan(
        name=name, pictures=pictures, template=read_template(settings.textual_inversion_templates_dir,
                                                             train.template_filename),
        width=train.training_width, height=train.training_height, steps=train.steps, learn_rate=schedule,
        log_folder=log_folder(settings.outdir, train.log_directory, name, today or dt.date.today()),
        batch_size=train.batch_size, gradient_steps=train.gradient_step, save_every=getattr(train, train.SAVE_FIELD),
        preview_every=train.create_image_every, shuffle_tags=train.shuffle_tags, tag_drop_out=train.tag_drop_out,
        latent_sampling=train.latent_sampling_method, clip_grad=train.clip_grad_mode, clip_grad_value=clip_value,
        kind=train.KIND)


def reads_server_folders(settings: Settings, origin: str) -> bool:
    """Whether data_root may name a server folder. The page's rule for the page; an API caller may, as in A1111,
    where the API has a login or serves this machine alone (--hide-ui-dir-config hides the page's folder fields,
    and the API has its own login: a page open to anyone says nothing of who may call it)."""
    if origin == "api":
        return bool(settings.api_credentials) or not settings.public
    return settings.reads_server_folders


def _refuse_unoffered(train: TrainFields) -> None:
    for asked, what in ((train.varsize, "varsize: training at each picture's own size is not offered; send false "
                                        "(pictures are resized to training_width x training_height)"),
                        (train.use_weight, "use_weight: a loss weighted by the pictures' alpha is not offered; "
                                           "send false"),
                        (train.preview_from_txt2img, "preview_from_txt2img: previews draw the last training prompt "
                                                     "here; send false")):
        if asked:
            raise InvalidRequest(what)


def _known_name(train: TrainFields, known: list[str]) -> str:
    field_name, what = train.NAME_FIELD, train.KIND
    name = (getattr(train, field_name) or "").strip()
    if not name:
        raise InvalidRequest(f"{field_name}: pick the {what} to train (Create {what} makes one)")
    if name not in known:
        listed = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "none yet"
        raise InvalidRequest(f"{field_name}: no {what} {name[:100]!r} in the {what}s folder (.pt files: "
                             f"{listed}); create it first (Create {what})")
    return name


def _check_numbers(train: TrainFields) -> None:
    def between(field_name: str, value, low, high, what: str = "") -> None:
        if not low <= value <= high:
            raise InvalidRequest(f"{field_name}: {low} to {high}{what}, got {value}")

    between("batch_size", train.batch_size, 1, MAX_BATCH_SIZE)
    between("gradient_step", train.gradient_step, 1, 1000)
    between("steps", train.steps, 1, 10_000_000)
    for field_name in ("training_width", "training_height"):
        value = getattr(train, field_name)
        between(field_name, value, MIN_SIZE, MAX_SIZE, ", a multiple of 8")
        if value % 8:
            raise InvalidRequest(f"{field_name}: must be a multiple of 8, got {value}; use {value // 8 * 8}")
    between("create_image_every", train.create_image_every, 0, 10_000_000, " (0: no previews)")
    between(train.SAVE_FIELD, getattr(train, train.SAVE_FIELD), 0, 10_000_000, " (0: no copies)")
    between("tag_drop_out", train.tag_drop_out, 0.0, 1.0)
    for field_name, value, choices in (("latent_sampling_method", train.latent_sampling_method, LATENT_SAMPLING),
                                       ("clip_grad_mode", train.clip_grad_mode, CLIP_GRAD_MODES)):
        if value not in choices:
            raise InvalidRequest(f"{field_name}: one of {', '.join(choices)}, got {value!r}")


def dataset_pictures(data_root: str) -> tuple[TrainingPicture, ...]:
    """The pictures of the dataset folder (not its subfolders, as A1111), each with its filewords."""
    shown = repr((data_root or "").strip()[:200])
    if not (data_root or "").strip():
        raise InvalidRequest("data_root: give the folder of pictures to train on (a folder on this server)")
    folder = Path(data_root.strip()).expanduser()
    try:
        if not folder.is_dir():
            raise InvalidRequest(f"data_root: {shown} is no folder on this server; give the full path of the folder "
                                 "of pictures")
        paths = sorted(path for path in folder.iterdir()
                       if not path.name.startswith(".") and path.suffix.lower() in PICTURE_SUFFIXES and path.is_file())
        pictures = tuple(TrainingPicture(path, filewords_of(path)) for path in paths)
    except OSError as err:
        raise InvalidRequest(f"data_root: {shown} cannot be read ({err.strerror or err})") from None
    if not pictures:
        raise InvalidRequest(f"data_root: {shown} holds no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return pictures


def filewords_of(picture: Path) -> str:
    """What [filewords] stands for with this picture, as A1111 reads it: the text of the .txt file of its name
    beside it, else its file name without the numbers in front ("00012-a red apple.png": "a red apple")."""
    words = picture.with_suffix(".txt")
    if words.is_file():
        return words.read_text(encoding="utf-8", errors="replace").strip()
    return _NUMBERS_AT_START.sub("", picture.stem)


def template_names(folder: Path) -> list[str]:
    """The prompt templates of the templates folder, by file name (A1111 lists its subfolders' too)."""
    return sorted({path.name for path in files_under(folder, (TEMPLATE_SUFFIX,))}, key=str.lower)


def read_template(folder: Path, filename: str) -> tuple[str, ...]:
    """The template's lines (blank ones left out); InvalidRequest where there is none, or none names [name]."""
    path = next((path for path in files_under(folder, (TEMPLATE_SUFFIX,)) if path.name == (filename or "").strip()),
                None)
    if path is None:
        names = ", ".join(template_names(folder)) or "none"
        raise InvalidRequest(f"template_filename: no prompt template {(filename or '')[:100]!r} (there are: {names})")
    try:
        lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeError) as err:
        raise InvalidRequest(f"template_filename: {path.name} cannot be read ({err})") from None
    if not any("[name]" in line for line in lines):
        raise InvalidRequest(f"template_filename: no line of {path.name} holds [name], which stands for what is "
                             "trained in the prompts: nothing would train it; pick another template")
    return lines


def log_folder(outdir: Path, log_directory: str, name: str, today: dt.date) -> Path:
    """A1111's <log directory>/<date>/<name>, with the log directory inside the outputs folder; InvalidRequest where
    that folder could not be made, checked here so that the run is refused before it is queued, not after it
    trained."""
    shown = repr((log_directory or "")[:200])
    if "\0" in (log_directory or ""):
        raise InvalidRequest(f"log_directory: {shown} holds a null character, which no folder name takes; give a "
                             f"folder such as {DEFAULT_LOG_DIRECTORY}")
    try:
        base = resolve_inside(outdir, (log_directory or "").strip() or DEFAULT_LOG_DIRECTORY)
    except ValueError:
        raise InvalidRequest(f"log_directory: {shown} is outside the outputs folder; give a folder inside it, such "
                             f"as {DEFAULT_LOG_DIRECTORY}") from None
    folder = base / today.strftime("%Y-%m-%d") / name
    _refuse_files_on_the_way(Path(os.path.abspath(outdir)), folder, shown)
    return folder


def _refuse_files_on_the_way(root: Path, folder: Path, shown: str) -> None:
    """InvalidRequest where a file (not a folder) stands where a folder between root and `folder` must go."""
    path = root
    for part in folder.relative_to(root).parts:
        path = path / part
        try:
            if path.exists() and not path.is_dir():
                raise InvalidRequest(f"log_directory: {shown} cannot hold the run's folder: "
                                     f"{path.relative_to(root)} is a file in the outputs folder; give another folder, "
                                     f"such as {DEFAULT_LOG_DIRECTORY}")
        except OSError as err:  # a name too long, a folder that cannot be read
            raise InvalidRequest(f"log_directory: {shown} cannot be used ({err.strerror or err}); give another "
                                 f"folder, such as {DEFAULT_LOG_DIRECTORY}") from None


# --- a training run -------------------------------------------------------------------------------
QUEUED, PREPARING, TRAINING = "queued", "preparing", "training"
DONE, INTERRUPTED, FAILED = "done", "interrupted", "failed"


# What torch.save's C++ writer says when a file cannot be written (a full disk, a read-only folder)
_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "file write failed")


def _failure_text(err: Exception) -> str:
    """What a failed training says on the page: a file that could not be written in words that say what to do."""
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"could not write or read a file{where}: {err.strerror}; free some disk space or make the folder writable"
    text = str(err) or type(err).__name__
    if any(failure in text for failure in _WRITE_FAILURES):
        return (f"could not write the training's files (is the disk full, or the folder read-only?): {text}")
    return text


@dataclass(eq=False)
class TrainingRun:
    """One training run: queued on the worker (Worker.train), which runs it; the page and /progress read
    how it goes; stop() (its own Interrupt) ends it after the step under way, and what it trains is saved as it then
    is, as A1111 does."""

    plan: TrainingPlan
    origin: str = "ui"  # "ui" or "api"
    owner: str | None = None  # who may stop it: the browser tab's owner token, or the API caller
    state: str = QUEUED
    stage_text: str = "Waiting for the jobs queued before it"
    status: TrainingStatus | None = None
    started_at: float | None = None
    finished_at: float | None = None
    outcome: TrainingOutcome | None = None
    error: str | None = None
    preview_image: Image.Image | None = field(default=None, repr=False)
    preview_path: Path | None = None
    preview_step: int = 0
    _model: tuple[str | None, str] = ("", "")  # the short hash and name of the model it trains on
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _announce: Callable[[str], None] = field(default=lambda text: None, repr=False)
    _first_step_at: float | None = None

    # --- the worker's side --------------------------------------------------------------------
    def run(self, engine, announce: Callable[[str], None] | None = None) -> TrainingOutcome | None:
        """Train (on the worker thread); `announce` tells everyone else what the worker is doing. None when
        Interrupt came before it started; raises what failed (TrainingError: the user's to fix)."""
        self.started_at = time.time()
        self._announce = announce or (lambda text: None)
        if self.stopped():
            self._end(INTERRUPTED)
            return None
        self.state = PREPARING
        try:
            model = engine.require_model()
            self._model = (model.short_hash, model.entry.name)
            self.outcome = TRAINERS[self.plan.kind](engine, self.plan, self)
        except Exception as err:
            self.error = _failure_text(err)
            if not isinstance(err, InvalidRequest):  # the user's to fix, said whole in the message
                log.exception("training %s failed", self.plan.name)
            self._end(FAILED)
            raise
        self._end(INTERRUPTED if self.outcome.stopped else DONE)
        return self.outcome

    def _end(self, state: str) -> None:
        self.finished_at = time.time()
        self.state = state

    @property
    def activity(self) -> str:
        return f"Training {self.plan.kind} {self.plan.name}"

    def stopped(self) -> bool:
        return self._stop.is_set()

    def stage(self, text: str) -> None:
        self.stage_text = text
        self._announce(f"{self.activity}: {text} (other jobs wait until it ends)")

    def step(self, status: TrainingStatus) -> None:
        self.state, self.status = TRAINING, status
        if self._first_step_at is None:
            self._first_step_at = time.monotonic()  # the first step pays for warming up: timed from its end
        self._announce(f"{self.activity}: step {status.step}/{status.last_step}, loss "
                       f"{status.loss:.4f} (other jobs wait until it ends)")

    def preview(self, step: int, request: GenerationRequest, seed: int, image: Image.Image) -> None:
        """Keep the preview for the page and /progress, and save it in the log folder as A1111 names it."""
        self.preview_image, self.preview_step = image, step
        model_hash, model_name = self._model
        infotext = build_infotext(request.prompt, "", {
            "Steps": request.steps, "Sampler": request.sampler_name, "Schedule type": request.scheduler,
            "CFG scale": request.cfg_scale, "Seed": seed, "Size": f"{image.width}x{image.height}",
            "Model hash": model_hash, "Model": model_name, "Version": f"{PROGRAM} {__version__}"})
        path = self.plan.previews_folder / f"{self.plan.name}-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".partial-{uuid.uuid4().hex}.png")
        try:
            temp.write_bytes(image_bytes(image, {"parameters": infotext}))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        self.preview_path = path

    # --- the readers' side ----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def finished(self) -> bool:
        return self.state in (DONE, INTERRUPTED, FAILED)

    @property
    def fraction(self) -> float:
        status = self.status
        if status is None or status.last_step <= status.first_step:
            return 0.0
        return (status.step - status.first_step) / (status.last_step - status.first_step)

    @property
    def eta_seconds(self) -> float | None:
        """From the pace since the first step (None until two steps are done)."""
        status, since = self.status, self._first_step_at
        if status is None or since is None or status.step - status.first_step < 2:
            return None
        pace = (time.monotonic() - since) / (status.step - status.first_step - 1)
        return pace * (status.last_step - status.step)

    def textinfo(self) -> str:
        """What A1111's textinfo says while it trains (loss, step, last prompt, last files), as HTML."""
        status = self.status
        if status is None:
            return f"<p>{html.escape(self.stage_text)}</p>"
        copy = str(status.last_copy) if status.last_copy else "<none>"
        preview = str(self.preview_path) if self.preview_path else "<none>"
        return (f"<p>Loss: {status.loss:.7f}<br/>Step: {status.step}<br/>Last prompt: {html.escape(status.prompt)}<br/>"
                f"Last saved {self.plan.kind}: {html.escape(copy)}<br/>Last saved image: {html.escape(preview)}"
                "<br/></p>")

    def result(self) -> str:
        """How it ended, in A1111's words where it has some."""
        outcome, name = self.outcome, self.plan.name
        if self.state == FAILED:
            return f"Training failed: {self.error}"
        if outcome is None or outcome.step == outcome.first_step and outcome.stopped:
            return f"Training interrupted before its first step; the {self.plan.kind} is as it was."
        if outcome.already_trained:
            return (f"{name} has been trained for {outcome.step} steps already, as many as Max steps allow: raise Max "
                    "steps to train it further.")
        return (f"Training {'interrupted' if outcome.stopped else 'finished'} at {outcome.step} steps. "
                f"{self.plan.kind.capitalize()} saved to {outcome.path}")

    def api_info(self) -> str:
        """The API's answer, in A1111's words: "train embedding complete: filename: ... error: ..." (for a
        hypernetwork too, as A1111 words it)."""
        if self.state == FAILED:
            return f"train embedding complete: filename:  error: {self.error}"
        if self.outcome is None:
            return "train embedding complete: filename:  error: interrupted before it started"
        return f"train embedding complete: filename: {self.outcome.path} error: None"
