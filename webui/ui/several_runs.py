"""Runs of several jobs from one Generate (webui/runs.py plans and submits them): img2img's Batch and Loopback, the
X/Y/Z plot, the prompt matrix and prompts from a list. Each job is followed as a run of its own; the last update shows
all their images (the plot's grids first).

Mixed into GenerationActions, whose worker, outputs, kind, _owner and _follow it uses.
"""
from __future__ import annotations

import time
from typing import Iterator

import gradio as gr

from webui.runs import SeveralJobs, in_grid_order, plot_grids, saved_grids, with_z_grid
from webui.schemas import GeneratedImage, InvalidRequest
from webui.ui.params import with_labels
from webui.ui.progress import error_html, left_out_html, notice_html, seconds_html
from webui.ui.session import Session, gallery_items
from webui.worker import QueueFull, WorkerStopped
from webui.xyz_plot import SCRIPT, Plot, plot_params


class SeveralRuns:
    """The methods GenerationActions runs several jobs with (see the module's note)."""

    def _in_turn(self, session: Session, run: SeveralJobs) -> Iterator[tuple]:
        """Run the jobs one after another (others' jobs take their turns between), following each as a run of its
        own under a note "<what>: picture n of N". Returns whether all finished; when one did not (Interrupt, a
        failure, a refusal), the last update says why, and the rest are not run."""
        session.interrupted = False
        count = len(run.submissions)

        def note() -> str:
            return notice_html(f"{run.what}: picture {run.turns_taken} of {count}")

        try:
            for job in run.in_turn(self.worker, "ui", self._owner(session), stopped=lambda: session.interrupted):
                session.start(job)
                for update in self._follow(session, job):  # its progress (an HTML text, or a skip) under the note
                    yield (*update[:2], note() + update[2], *update[3:]) if isinstance(update[2], str) else update
        except (InvalidRequest, QueueFull, WorkerStopped) as err:
            yield session, gr.skip(), notice_html(f"{run.what}: picture {run.turns_taken + 1} of {count}") + \
                error_html(with_labels(str(err))), gr.update(visible=False), gr.skip(), ""
            return False
        if not run.finished and len(run.done) == len(run.jobs):  # Interrupt came between two jobs
            yield session, gr.skip(), notice_html(f"{run.what}: interrupted before picture {run.turns_taken + 1} of "
                                                  f"{count}."), gr.skip(), gr.skip(), gr.skip()
        return run.finished

    def _show_all(self, session: Session, shown: list[GeneratedImage], run: SeveralJobs, note: str = "") -> tuple:
        """The last update of a run of several jobs: the images shown, the first of them large; `note` under them."""
        session.show(shown)
        session.selected = 0 if shown else None
        return (session, gallery_items(shown), note, gr.update(visible=False, value=None), session.current_infotext(),
                seconds_html(time.time() - run.started_at, f" for {len(run.jobs)} runs"))

    def _several(self, session: Session, run: SeveralJobs, unreadable: list[str] = ()) -> Iterator[tuple]:
        """img2img's Batch and Loopback, or prompts from a list: the runs in turn, then all their images. `unreadable`:
        why each picture left out before the run could not be read (Batch), said at its end with those left out
        during it."""
        if not (yield from self._in_turn(session, run)):
            return
        left_out = [*unreadable, *run.skipped]
        if not run.jobs:  # every picture failed as its turn came: as when none can be read before the run
            message = left_out[0] if len(left_out) == 1 else (
                f"{run.what}: none of the {len(left_out)} pictures can be read ({left_out[0].removeprefix(run.what + ': ')})")
            yield session, gr.skip(), error_html(message), gr.update(visible=False), gr.skip(), ""
            return
        yield self._show_all(session, run.images(), run, left_out_html(run.what, left_out))

    def _plot(self, session: Session, plot: Plot, run: SeveralJobs, legend: bool, sub_images: bool,
              sub_grids: bool = False) -> Iterator[tuple]:
        """The X/Y/Z plot (or the prompt matrix): its cells in turn, then the grids (with a Z axis, the grid of them
        all, then each Z value's with sub_grids; the cells' images with sub_images, in the grids' order). No grid is
        drawn from part of a plot."""
        if not (yield from self._in_turn(session, run)):
            return
        made = in_grid_order(plot, run.done)
        grids = with_z_grid(plot_grids(made, plot.axes, legend, plot_params(plot.axes) if run.what == SCRIPT else {}),
                            sub_grids)
        shown = saved_grids(grids, self.outputs, self.kind) + (
            [image for _, images in made for image in images] if sub_images else [])
        yield self._show_all(session, shown, run)
