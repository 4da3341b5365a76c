"""Runs of several jobs from one Generate (webui/runs.py plans and submits them): img2img's Batch and Loopback, the
X/Y/Z plot, the prompt matrix and prompts from a list. Each job is followed as a run of its own; the last update shows
all their images (the plot's grids first).

Mixed into GenerationActions, whose worker, outputs, kind, runs, _owner and _follow it uses.
"""
from __future__ import annotations

import threading
import time
import uuid
import weakref
from typing import Callable, Iterator

import gradio as gr

from webui.runs import SeveralJobs, in_grid_order, plot_grids, saved_grids, with_z_grid
from webui.schemas import GeneratedImage
from webui.ui.params import with_labels
from webui.ui.progress import POLL_SECONDS, error_html, left_out_html, notice_html, seconds_html
from webui.ui.session import Session, gallery_items
from webui.xyz_plot import SCRIPT, Plot, plot_params


FORGET_ENDED_RUNS_AFTER = 600.0  # seconds: a run no page came back for is let go of (its images are saved)


class SeveralRuns:
    """The methods GenerationActions runs several jobs with (see the module's note). The run goes on on the server
    (runs.SeveralJobs.run_in_background): the page follows it, and a page reloaded in the same browser tab follows
    it again (resume), as A1111's scripts run to their end whatever the page does."""

    def _start_run(self, session: Session, run: SeveralJobs,
                   end: Callable[[SeveralJobs], tuple[list[GeneratedImage], str, str | None]]) -> Iterator[tuple]:
        """Start the run in the background and follow it. `end(run)`, once every job has finished: (the images to
        show, a note under them, an error that replaces them)."""
        owner = self._owner(session)
        # by the tab's owner key, which a reloaded page finds it by; a page without one (a Gradio API client) by its own
        session.run_key = owner or f"run:{uuid.uuid4().hex}"
        self.runs[session.run_key] = run
        run.run_in_background(self.worker, "ui", owner, end)
        # by a weak reference: a run whose end a page has shown is let go of at once
        threading.Thread(target=self._forget_when_stale, args=(run.ended, weakref.ref(run)), name="forget a run",
                         daemon=True).start()
        yield from self._follow_run(session, run)

    def _forget_when_stale(self, ended: threading.Event, run: "weakref.ref[SeveralJobs]") -> None:
        """Let go of a run FORGET_ENDED_RUNS_AFTER seconds after it ended, where no page came back for its end: it
        holds every picture it made."""
        ended.wait()
        time.sleep(FORGET_ENDED_RUNS_AFTER)
        stale = run()
        if stale is not None:
            self._forget(stale)

    def _forget(self, run: SeveralJobs) -> None:
        for key, kept in list(self.runs.items()):
            if kept is run:
                self.runs.pop(key, None)

    def _forget_ended_run(self, session: Session) -> None:
        """A new job of the tab's supersedes its run that ended unseen (the page lost its stream): a reload must
        follow the new job, and Interrupt reach it."""
        run = self.run_of(self._owner(session))
        if run is not None and run.ended.is_set():
            self._forget(run)

    def run_of(self, key: str | None) -> SeveralJobs | None:
        """The run of several jobs of this key (a tab's owner key) whose end no page has shown yet."""
        return self.runs.get(key) if key else None

    def _follow_run(self, session: Session, run: SeveralJobs) -> Iterator[tuple]:
        """Each job of the run as it comes, followed as a run of its own under a note "<what>: picture n of N"
        (others' jobs take their turns between), then the run's end."""
        count, followed = len(run.submissions), 0
        while True:
            if followed < len(run.job_turns):  # each in turn, also those the run went past while the page looked away
                job, turn = run.jobs[followed], run.job_turns[followed]
                followed += 1
                session.start(job)
                note = notice_html(f"{run.what}: picture {turn} of {count}")
                for update in self._follow(session, job):  # its progress (an HTML text, or a skip) under the note
                    yield (*update[:2], note + update[2], *update[3:]) if isinstance(update[2], str) else update
            elif run.ended.wait(POLL_SECONDS) and followed == len(run.jobs):
                break
        yield from self._run_end(session, run)

    def _run_end(self, session: Session, run: SeveralJobs) -> Iterator[tuple]:
        """The run's last update: why it stopped early, or its images (the plot's grids first); shown once."""
        self._forget(run)
        count = len(run.submissions)
        if run.error is not None:  # a later job could not be queued, or the end (the grid) could not be made
            where = (f"picture {run.turns_taken + 1} of {count}" if run.turns_taken < count
                     else f"the end of its {count} pictures")
            yield session, gr.skip(), notice_html(f"{run.what}: {where}") + \
                error_html(with_labels(str(run.error))), gr.update(visible=False), gr.skip(), ""
            return
        if not run.finished:  # Interrupt, or a job that failed (its own last update said why)
            if len(run.done) == len(run.jobs):  # Interrupt came between two jobs
                yield session, gr.skip(), notice_html(f"{run.what}: interrupted before picture {run.turns_taken + 1} "
                                                      f"of {count}."), gr.skip(), gr.skip(), gr.skip()
            return
        shown, note, error = run.outcome
        if error:
            yield session, gr.skip(), error_html(error), gr.update(visible=False), gr.skip(), ""
            return
        yield self._show_all(session, shown, run, note)

    def _show_all(self, session: Session, shown: list[GeneratedImage], run: SeveralJobs, note: str = "") -> tuple:
        """The last update of a run of several jobs: the images shown, the first of them large; `note` under them."""
        session.show(shown)
        session.selected = 0 if shown else None
        runs = len(run.jobs)
        return (session, gallery_items(shown), note, gr.update(visible=False, value=None), session.current_infotext(),
                seconds_html((run.ended_at or time.time()) - run.started_at, f" for {runs} run{'s' * (runs != 1)}"))

    def _several(self, session: Session, run: SeveralJobs, unreadable: list[str] = ()) -> Iterator[tuple]:
        """img2img's Batch and Loopback, or prompts from a list: the runs in turn, then all their images. `unreadable`:
        why each picture left out before the run could not be read (Batch), said at its end with those left out
        during it."""
        def end(run: SeveralJobs) -> tuple[list[GeneratedImage], str, str | None]:
            left_out = [*unreadable, *run.skipped]
            if not run.jobs:  # every picture failed as its turn came: as when none can be read before the run
                return [], "", left_out[0] if len(left_out) == 1 else (
                    f"{run.what}: none of the {len(left_out)} pictures can be read "
                    f"({left_out[0].removeprefix(run.what + ': ')})")
            return run.images(), left_out_html(run.what, left_out), None

        yield from self._start_run(session, run, end)

    def _plot(self, session: Session, plot: Plot, run: SeveralJobs, legend: bool, sub_images: bool,
              sub_grids: bool = False) -> Iterator[tuple]:
        """The X/Y/Z plot (or the prompt matrix): its cells in turn, then the grids (with a Z axis, the grid of them
        all, then each Z value's with sub_grids; the cells' images with sub_images, in the grids' order), drawn and
        saved on the server when the last cell is done. No grid is drawn from part of a plot."""
        def end(run: SeveralJobs) -> tuple[list[GeneratedImage], str, str | None]:
            made = in_grid_order(plot, run.done)
            grids = with_z_grid(plot_grids(made, plot.axes, legend,
                                           plot_params(plot.axes) if run.what == SCRIPT else {}), sub_grids)
            shown = saved_grids(grids, self.outputs, self.kind, what=run.what) + (
                [image for _, images in made for image in images] if sub_images else [])
            return shown, "", None

        yield from self._start_run(session, run, end)
