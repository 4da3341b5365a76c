"""Runs of several jobs from one Generate: img2img's Batch and Loopback, the X/Y/Z plot, the prompt matrix and
prompts from a list. Each job runs in turn, followed as a run of its own; the last update shows all their images (the plot's grids
first).

Mixed into GenerationActions, whose worker, models, outputs, kind, _owner and _follow it uses.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import gradio as gr
from PIL import Image

from webui.loopback import loop_mask
from webui.prompt_lines import line_requests
from webui.schemas import GeneratedImage, InvalidRequest, JobState
from webui.ui.params import with_labels
from webui.ui.pictures import read_upload, scaled_size_fields
from webui.ui.progress import error_html, notice_html, seconds_html
from webui.ui.session import Session, gallery_items
from webui.worker import QueueFull, WorkerStopped
from webui.storage.infotext import with_params
from webui.storage.outputs import NamedCopy
from webui.xyz_plot import SCRIPT, Axis, Cell, Plot, draw_grid, plot_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """One job of a run of several (the X/Y/Z plot's cells, the img2img Batch's pictures)."""
    request: dict
    # a picture, an upload's path or a function giving one (the picture the run before made), read when its turn comes
    picture: Image.Image | str | Callable[[], Image.Image] | None = None
    mask: Image.Image | str | None = None
    scale: float | None = None  # img2img's Resize by: the run's size is the picture's times this
    copy_to: NamedCopy | None = None  # img2img Batch's Output directory: where its images are also saved


def _opened(picture: Image.Image | str | Callable[[], Image.Image] | None, where: str) -> Image.Image | None:
    if callable(picture):  # one the run before made (Loopback)
        return picture()
    return read_upload(picture, where) if isinstance(picture, str) else picture


def _last_picture(done: list[list[GeneratedImage]]) -> Image.Image:
    """The picture the last loop made, to start the next from; InvalidRequest where it made none to go on from."""
    if not done[-1] or done[-1][0].unfinished:
        raise InvalidRequest("Loopback: the last loop was skipped before it finished its picture; the loops end here")
    return done[-1][0].image


class SeveralRuns:
    """The methods GenerationActions runs several jobs with (see the module's note)."""

    def _line_submissions(self, request: dict, text: str | None, same_seed: bool, picture: Image.Image | None,
                          mask: Image.Image | None) -> list[Submission]:
        """Prompts from a list: a run for each line, every line checked as the worker would before the first."""
        lines = line_requests(request, text or "", same_seed)
        for number, line in enumerate(lines, 1):
            try:
                self.worker.check(line)
            except InvalidRequest as err:
                raise InvalidRequest(f"Prompts from a list, line {number}: {err}") from None
        return [Submission(line, picture, mask) for line in lines]

    def _found_models(self, axis: Axis) -> Axis:
        """A Checkpoint name axis with each value found among the models (as the picker names it)."""
        if axis.type.label != "Checkpoint name":
            return axis
        found = []
        for name in axis.values:
            listed = self.models.find_pasted(name, None)
            if listed is None:
                raise InvalidRequest(f"{axis.name} values: there is no model {name!r}; the Stable Diffusion "
                                     "checkpoint list names those there are")
            found.append(self.models.checked_choice(listed))
        return replace(axis, values=found)

    def _in_turn(self, session: Session, submissions: list[Submission], what: str,
                 done: list[list[GeneratedImage]] | None = None) -> Iterator[tuple]:
        """Run the submissions one job after another (others' jobs take their turns between), following each as a
        run of its own under a note "<what>: picture n of N". Returns each run's images (also appended to `done`
        as they come); None when one did not finish (Interrupt, a failure, a refusal): the last update says why,
        and the rest are not run."""
        done = [] if done is None else done
        session.interrupted = False
        for number, submission in enumerate(submissions, 1):
            note = notice_html(f"{what}: picture {number} of {len(submissions)}")
            if session.interrupted:  # between two jobs, where no job was there to cancel
                yield session, gr.skip(), notice_html(f"{what}: interrupted before picture {number} of "
                                                      f"{len(submissions)}."), gr.skip(), gr.skip(), gr.skip()
                return None
            try:
                picture, request = _opened(submission.picture, what), submission.request
                if submission.scale and picture is not None:
                    request = request | scaled_size_fields(picture, submission.scale)
                job = self.worker.submit(request, origin="ui", owner=self._owner(session), init_image=picture,
                                         mask=_opened(submission.mask, what), copy_to=submission.copy_to)
            except (InvalidRequest, QueueFull, WorkerStopped) as err:
                yield session, gr.skip(), note + error_html(with_labels(str(err))), gr.update(visible=False), \
                    gr.skip(), ""
                return None
            session.start(job)
            for update in self._follow(session, job):  # its progress (an HTML text, or a skip) under the note
                yield (*update[:2], note + update[2], *update[3:]) if isinstance(update[2], str) else update
            if job.state is not JobState.DONE:
                return None
            done.append(list(job.images))
        return done

    def _show_all(self, session: Session, shown: list[GeneratedImage], seconds: float, runs: int) -> tuple:
        """The last update of a run of several jobs: the images shown, the first of them large."""
        session.show(shown)
        session.selected = 0 if shown else None
        return (session, gallery_items(shown), "", gr.update(visible=False, value=None), session.current_infotext(),
                seconds_html(seconds, f" for {runs} runs"))

    def _several(self, session: Session, submissions: list[Submission], what: str) -> Iterator[tuple]:
        """img2img's Batch, or prompts from a list: the runs in turn, then all their images."""
        started = time.monotonic()
        done = yield from self._in_turn(session, submissions, what)
        if done is not None:
            yield self._show_all(session, [image for images in done for image in images], time.monotonic() - started,
                                 len(submissions))

    def _loopback(self, session: Session, chains: list[list[dict]], picture: Image.Image,
                  mask: Image.Image | None) -> Iterator[tuple]:
        """Loopback: each chain's loops in turn, each loop starting from the picture the loop before made; then all
        their pictures."""
        started, done = time.monotonic(), []
        # Later loops start from the run's size: the mask goes with them as the first loop fitted it.
        fitted = loop_mask(mask, picture, chains[0][0])
        submissions = [Submission(request, picture if loop == 0 else (lambda: _last_picture(done)),
                                  mask if loop == 0 else fitted)
                       for chain in chains for loop, request in enumerate(chain)]
        if (yield from self._in_turn(session, submissions, "Loopback", done)) is not None:
            yield self._show_all(session, [image for images in done for image in images], time.monotonic() - started,
                                 len(submissions))

    def _plot(self, session: Session, plot: Plot, picture: Image.Image | None,
              mask: Image.Image | None, legend: bool, sub_images: bool, what: str = "X/Y/Z plot") -> Iterator[tuple]:
        """The X/Y/Z plot (or the prompt matrix, `what`): its cells in turn, then the grids (and the cells' images
        with sub_images, in the grids' order). No grid is drawn from part of a plot."""
        started = time.monotonic()
        done = yield from self._in_turn(session, [Submission(cell.request, picture, mask) for cell in plot.cells],
                                        what)
        if done is None:
            return
        made = sorted(zip(plot.cells, done), key=lambda pair: (pair[0].z, pair[0].y, pair[0].x))
        shown = self._plot_grids(made, plot.axes, legend, plot_params(plot.axes) if what == SCRIPT else {}) + (
            [image for _, images in made for image in images] if sub_images else [])
        yield self._show_all(session, shown, time.monotonic() - started, len(plot.cells))

    def _plot_grids(self, done: list[tuple[Cell, list[GeneratedImage]]], axes: list[Axis], legend: bool,
                    params: dict[str, str]) -> list[GeneratedImage]:
        """One grid for each Z value, of each cell's first image, saved under <kind>-grids with the infotext of
        its first picture and `params` (the plot's keys, as A1111 saves it)."""
        x, y, z = axes
        grids = []
        for z_index in range(len(z.values)):
            firsts = [(cell, images[0]) for cell, images in done if cell.z == z_index and images]
            if not firsts:
                continue
            title = z.label(z_index) if z.type.label != "Nothing" else None
            grid = draw_grid({(cell.x, cell.y): image.image for cell, image in firsts}, x, y, title, legend)
            first = firsts[0][1]
            infotext = with_params(first.infotext, params)
            try:
                path = str(self.outputs.save_grid(grid, infotext, self.kind))
            except OSError as err:  # shown all the same; the log says why it is not on disk
                log.warning("the grid was not saved: %s", err)
                path = None
            grids.append(GeneratedImage(image=grid, seed=first.seed, index=0, infotext=infotext, path=path))
        return grids
