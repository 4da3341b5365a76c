"""Runs of several jobs from one Generate or one API request: img2img's Batch and Loopback, the X/Y/Z plot, the prompt
matrix and prompts from a list. The page (webui/ui/several_runs.py) and the REST API (webui/api/scripts.py) both run
them through this module.

Every job is checked before the first is queued; then each is submitted when the one before has finished, so other
users' jobs take their turns between. The caller follows each job (the page shows its progress, the API waits on it)
and at the end lays the images out as its script does (the plot's grids first).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, TypeVar

from PIL import Image

from webui.engine.img2img import scaled_size
from webui.engine.models import ModelNotFound
from webui.loopback import INTERROGATIONS, loop_mask, loop_requests, with_interrogation
from webui.prompt_lines import line_requests
from webui.schemas import GeneratedImage, InvalidRequest, JobState
from webui.storage.filenames import NameParts
from webui.storage.infotext import parse_infotext, with_params
from webui.storage.options import SavedOptions
from webui.storage.outputs import NamedCopy, OutputStore
from webui.worker import Job, QueueFull, Worker, WorkerStopped
from webui.xyz_plot import AXIS_TYPES, SCRIPT, Axis, Cell, Plot, draw_grid

log = logging.getLogger(__name__)
T = TypeVar("T")

# A picture given now, or read when its job's turn comes (an upload; the picture the job before made)
Picture = Image.Image | Callable[[], Image.Image] | None


@dataclass(frozen=True)
class Submission:
    """One job of a run of several (the X/Y/Z plot's cells, the img2img Batch's pictures)."""
    request: dict | Callable[[Image.Image | None], dict]  # a function of the job's picture: made when its turn comes
    picture: Picture = None
    mask: Picture = None
    scale: float | None = None  # img2img's Resize by: the run's size is the picture's times this
    copy_to: NamedCopy | None = None  # img2img Batch's Output directory: where its images are also saved
    colours: Image.Image | None = None  # colour correction's reference, where not the job's picture (Loopback's)


def scaled_size_fields(picture: Image.Image, scale: float) -> dict[str, int]:
    """img2img's Resize by: the run's width and height from the picture; InvalidRequest saying which scales fit."""
    try:
        width, height = scaled_size(picture, scale)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    return {"width": width, "height": height}


def _opened(picture: Picture) -> Image.Image | None:
    return picture() if callable(picture) else picture


class SeveralJobs:
    """One run of several jobs, `what` it is named by ("X/Y/Z plot"), its jobs submitted one after another."""

    def __init__(self, submissions: list[Submission], what: str, skips_unreadable: bool = False):
        """`skips_unreadable`: a picture that cannot be read when its turn comes is left out, the others run (img2img
        Batch, as A1111's); else it ends the run."""
        self.submissions = list(submissions)
        self.what = what
        self.skips_unreadable = skips_unreadable
        self.skipped: list[str] = []  # why each picture left out could not be read
        self.jobs: list[Job] = []  # those submitted so far, in turn
        self.job_turns: list[int] = []  # each job's turn, counted from 1 (pictures left out take turns too)
        self.owner: str | None = None
        self.stopped = False  # stop() came: no job more
        self.started_at: float | None = None
        # run_in_background's: set when it is over; what finish gave; what ended it early; when
        self.ended = threading.Event()
        self.outcome: Any = None
        self.error: Exception | None = None
        self.ended_at: float | None = None

    @property
    def job(self) -> Job | None:
        """The job submitted last: the one running or queued while the run goes on."""
        return self.jobs[-1] if self.jobs else None

    @property
    def done(self) -> list[list[GeneratedImage]]:
        """The images of each job that finished, in turn (a job that did not finish ends the run)."""
        return [list(job.images) for job in self.jobs if job.state is JobState.DONE]

    @property
    def finished(self) -> bool:
        return len(self.done) + len(self.skipped) == len(self.submissions)

    @property
    def turns_taken(self) -> int:
        """The submissions whose turn has come: submitted, or left out."""
        return len(self.jobs) + len(self.skipped)

    def in_turn(self, worker: Worker, origin: str, owner: str | None = None,
                field_names: dict[str, str] | None = None) -> Iterator[Job]:
        """Submit each job in turn and yield it, for the caller to follow until it has ended. After a job that did
        not finish (Interrupt, a failure, a refusal), or once stop() came, none more. Raises what
        submit raises (InvalidRequest, QueueFull, WorkerStopped)."""
        self.owner, self.started_at = owner, time.time()
        for submission in self.submissions:
            if self.stopped:
                return
            try:
                picture = _opened(submission.picture)
            except InvalidRequest as err:  # its pixels end early: found only now that it is read whole
                if not self.skips_unreadable:
                    raise
                self.skipped.append(str(err))
                continue
            request = submission.request
            if callable(request):  # Loopback's interrogated prompt: of the picture the loop starts from
                request = request(picture)
            if submission.scale and picture is not None:
                request = request | scaled_size_fields(picture, submission.scale)
            job = worker.submit(request, origin=origin, owner=owner, init_image=picture,
                                mask=_opened(submission.mask), copy_to=submission.copy_to, field_names=field_names,
                                color_reference=submission.colours)
            self.jobs.append(job)
            self.job_turns.append(self.turns_taken)
            if self.stopped:  # stop() came while it was submitted: it found the job before
                worker.cancel(job.id)
            yield job
            if job.state is not JobState.DONE:
                return

    def run_in_background(self, worker: Worker, origin: str, owner: str | None,
                          finish: Callable[["SeveralJobs"], Any] | None = None) -> None:
        """Run the jobs on a thread of their own, each submitted when the one before has ended, so that the run goes
        on when the page that started it is reloaded or closed (as A1111's scripts run on the server); once every
        job has finished, `finish(run)` (the plot's grids, drawn and saved) gives `outcome`. What a later submit
        raises (a full queue, a refusal) is kept in `error`; `ended` is set when nothing more will happen."""

        def drive() -> None:
            try:
                for job in self.in_turn(worker, origin, owner):
                    job.wait()
                if self.finished and finish is not None:
                    self.outcome = finish(self)
            except Exception as err:  # the page says it; a bug is logged too
                if not isinstance(err, (InvalidRequest, QueueFull, WorkerStopped)):
                    log.exception("%s: the run failed", self.what)
                self.error = err
            finally:
                self.ended_at = time.time()
                self.ended.set()

        threading.Thread(target=drive, name=f"run: {self.what}", daemon=True).start()

    def stop(self, worker: Worker) -> None:
        """End the run: its running or queued job is cancelled, and no other is submitted."""
        self.stopped = True
        if self.job is not None:
            worker.cancel(self.job.id)

    def fraction(self) -> float:
        """How far the whole run has come, 0 to 1."""
        job = self.job
        running = job.progress.fraction if job is not None and job.state is JobState.RUNNING else 0.0
        return min(1.0, (len(self.done) + len(self.skipped) + min(running, 1.0)) / max(1, len(self.submissions)))

    def images(self) -> list[GeneratedImage]:
        """Every image of the jobs that finished, in turn."""
        return [image for images in self.done for image in images]


def line_run(worker: Worker, request: dict, text: str | None, same_seed: bool, picture: Picture, mask: Picture,
             **options: Any) -> SeveralJobs:
    """Prompts from a list: a run for each line (options: prompt_lines.line_requests'), every line checked as the
    worker would before the first."""
    lines = line_requests(request, text or "", same_seed, **options)
    for number, line in enumerate(lines, 1):
        try:
            worker.check(line)
        except InvalidRequest as err:
            raise InvalidRequest(f"Prompts from a list, line {number}: {err}") from None
    return SeveralJobs([Submission(line, picture, mask) for line in lines], "Prompts from a list")


def last_picture(done: list[list[GeneratedImage]]) -> Image.Image:
    """The picture the last loop made, to start the next from: as A1111, a loop that Skip cut short goes on from the
    picture it had come to. InvalidRequest where it made none to go on from (skipped before its first step)."""
    if not done[-1]:
        raise InvalidRequest("Loopback: the last loop was skipped before it made a picture; the loops end here")
    return done[-1][0].image


def loopback_run(worker: Worker, request: dict, loops: int, final_strength: float, curve: str,
                 picture: Image.Image, mask: Image.Image | None, interrogation: str = "None") -> SeveralJobs:
    """Loopback: each chain's loops in turn (webui/loopback.py), each loop after a chain's first starting from the
    picture the loop before made; with interrogation "CLIP", each loop's prompt ends with what Interrogate CLIP says
    of the picture it starts from, as A1111's "Append interrogated prompt at each iteration"."""
    if interrogation not in INTERROGATIONS:
        raise InvalidRequest(f"Append interrogated prompt at each iteration: {interrogation!r}; choose one of "
                             f"{', '.join(INTERROGATIONS)} (A1111's DeepBooru is not offered)"[:300])
    chains = loop_requests(request, loops, final_strength, curve)
    for loop in (chain[0] for chain in chains):  # each chain's first run: the others are like it
        worker.check(loop)
    # Later loops start from the run's size: the mask goes with them as the first loop fitted it.
    fitted_mask = loop_mask(mask, picture, chains[0][0])
    run = SeveralJobs([], "Loopback")
    later = lambda: last_picture(run.done)  # noqa: E731 (read when the loop's turn comes)

    def interrogated(loop_request: dict) -> Callable[[Image.Image], dict]:
        def described(start: Image.Image) -> dict:
            words = worker.interrogate(start).result()
            return loop_request | {"prompt": with_interrogation(loop_request.get("prompt") or "", words)}
        return described

    # As A1111's, colour correction matches every loop to the run's picture, not to the loop's start: no drift.
    run.submissions = [Submission(interrogated(loop_request) if interrogation == "CLIP" else loop_request,
                                  picture if loop == 0 else later, mask if loop == 0 else fitted_mask,
                                  colours=picture)
                       for chain in chains for loop, loop_request in enumerate(chain)]
    return run


def plot_run(plot: Plot, picture: Picture, mask: Picture, what: str) -> SeveralJobs:
    """The X/Y/Z plot's cells (or the prompt matrix's, `what`), in the order they run."""
    return SeveralJobs([Submission(cell.request, picture, mask) for cell in plot.cells], what)


def found_models(axis: Axis, find: Callable[[str], str]) -> Axis:
    """A Checkpoint name axis with each value the model `find` names for it (it raises InvalidRequest, or
    ModelNotFound, for one there is not)."""
    if axis.type.label != "Checkpoint name":
        return axis
    try:
        return replace(axis, values=[find(name) for name in axis.values])
    except (InvalidRequest, ModelNotFound) as err:
        raise InvalidRequest(f"{axis.name} values: {err}") from None


def in_grid_order(plot: Plot, made: list[T]) -> list[tuple[Cell, T]]:
    """Each cell with what it made (its images, its job), Z slowest, then Y, then X (the cells ran in another order
    with a model axis)."""
    return sorted(zip(plot.cells, made), key=lambda pair: (pair[0].z, pair[0].y, pair[0].x))


def plot_grids(made: list[tuple[Cell, list[GeneratedImage]]], axes: list[Axis], legend: bool,
               params: dict[str, str]) -> list[GeneratedImage]:
    """One grid for each Z value, of each cell's first image, with the infotext of its first picture and `params`
    (the plot's keys, as A1111 writes them). Not saved (saved_grids)."""
    x, y, z = axes
    grids = []
    for z_index in range(len(z.values)):
        firsts = [(cell, images[0]) for cell, images in made if cell.z == z_index and images]
        if not firsts:
            continue
        title = z.label(z_index) if z.type.label != "Nothing" else None
        grid = draw_grid({(cell.x, cell.y): image.image for cell, image in firsts}, x, y, title, legend)
        first = firsts[0][1]
        grids.append(GeneratedImage(image=grid, seed=first.seed, index=0, infotext=with_params(first.infotext, params)))
    return grids


def with_z_grid(grids: list[GeneratedImage], sub_grids: bool) -> list[GeneratedImage]:
    """A plot's grids as A1111 gives them: with a Z axis, its Z values' grids side by side first, then each of them
    where Include Sub Grids asks (`sub_grids`)."""
    if len(grids) <= 1:
        return grids
    combined = GeneratedImage(side_by_side([grid.image for grid in grids]), grids[0].seed, 0, grids[0].infotext)
    return [combined, *(grids if sub_grids else [])]


# A1111's grid file names of the scripts that name theirs (others: grid-NNNN)
GRID_BASENAMES = {SCRIPT: "xyz_grid", "Prompt matrix": "prompt_matrix"}


def saved_grids(grids: list[GeneratedImage], outputs: OutputStore, kind: str,
                options: SavedOptions | None = None, what: str = "") -> list[GeneratedImage]:
    """The grids saved under <kind>-grids, each with its file's path (None where it could not be saved); `options`:
    how the files are written, where not the Settings tab's."""
    saved = []
    for grid in grids:
        prompt, negative, _ = parse_infotext(grid.infotext, backcompat=False)
        parts = NameParts(seed=grid.seed, prompt=prompt, negative_prompt=negative, width=grid.image.width,
                          height=grid.image.height, picture=grid.image)  # as A1111: its first picture's prompt
        try:
            path = str(outputs.save_grid(grid.image, grid.infotext, kind, parts, options=options,
                                         basename=GRID_BASENAMES.get(what, "grid")))
        except OSError as err:  # shown all the same; the log says why it is not on disk
            log.warning("the grid was not saved: %s", err)
            path = None
        saved.append(replace(grid, path=path))
    return saved


def side_by_side(pictures: list[Image.Image]) -> Image.Image:
    """Pictures in one row, each in a cell of the largest's size (A1111's grid of Loopback's pictures, and of the
    plot's grids for each Z value)."""
    nothing = AXIS_TYPES["Nothing"]
    return draw_grid({(i, 0): picture for i, picture in enumerate(pictures)},
                     Axis("X", nothing, [None] * len(pictures)), Axis("Y", nothing, [None]), legend=False)
