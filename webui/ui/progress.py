"""HTML for the results area: progress bar, queue position, errors, time taken.

Pure functions of a Job so they can be tested without a browser. Every piece of text that came
from a user or an exception is escaped.
"""
from __future__ import annotations

import html

from webui.schemas import JobState
from webui.ui.params import with_labels
from webui.worker import Job

POLL_SECONDS = 0.25  # how often a page following a job looks at it
TOKENS_PER_CHUNK = 75  # CLIP reads 75 tokens per chunk; longer prompts are split into chunks


def token_counter(count: int) -> str:
    """'12/75', or '80/150' once a prompt spills into a second chunk (as stable-diffusion-webui)."""
    limit = max(1, -(-count // TOKENS_PER_CHUNK)) * TOKENS_PER_CHUNK
    return f"<span class='dw-tokens'>{count}/{limit}</span>"


def too_long_counter(length: int, limit: int) -> str:
    """The token counter of a prompt over the length Generate takes."""
    return f"<span class='dw-tokens dw-too-long'>too long: {length:,}/{limit:,} characters</span>"


def error_html(message: str) -> str:
    return f"<div class='dw-error' role='alert'>{html.escape(message)}</div>"


def notice_html(message: str) -> str:
    return f"<div class='dw-notice'>{html.escape(message)}</div>"


def left_out_html(what: str, reasons: list[str]) -> str:
    """A notice of the pictures a run (`what`: "Batch") left out because they could not be read, and why; "" where
    none was."""
    if not reasons:
        return ""
    reasons = [reason.removeprefix(f"{what}: ") for reason in reasons]
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    return notice_html(f"{what}: {len(reasons)} picture{'s' if len(reasons) > 1 else ''} left out, as they could "
                       f"not be read: {shown}")


def format_seconds(seconds: float | None) -> str:
    """A wait as the bars show it: 45s, 3m 05s, and past an hour 175h 30m (a training may take days)."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_html(job: Job, position: int | None, worker_activity: str | None = None) -> str:
    """What the job is doing now: queued (with jobs ahead, and what the worker does meanwhile, such as
    compiling a model), starting, or at step N with an ETA."""
    if job.state is JobState.QUEUED:
        ahead = position or 0
        text = f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead of yours" if ahead else "Queued: yours is next"
        return _bar(0.0, f"{text} · {worker_activity}" if worker_activity else text)
    progress = job.progress
    if job.state is JobState.RUNNING and progress.step == 0:
        return _bar(0.0, progress.note or "Starting…")
    image = f" · image {progress.image_index + 1}/{progress.image_count}" if progress.image_count > 1 else ""
    text = (f"Step {progress.step}/{progress.total_steps}{image} · "
            f"{progress.fraction:.0%} · ETA {format_seconds(progress.eta_seconds)}")
    return _bar(progress.fraction, f"{text} · {progress.note}" if progress.note else text)


def final_html(job: Job) -> str:
    """The message left under the gallery when a job ends: nothing on a clean success."""
    if job.state is JobState.FAILED:
        return error_html(f"Generation failed: {with_labels(job.error or 'unknown error')}") + _warnings_html(job)
    unfinished = sum(image.unfinished for image in job.images)
    # As in A1111, what Interrupt or Skip cut short is shown as it stood, and not saved.
    cut_short = f"; {unfinished} unfinished shown, not saved" if unfinished else ""
    if job.state is JobState.CANCELLED:
        saved = sum(image.path is not None for image in job.images)
        return notice_html(f"Interrupted; {saved} image{'s' if saved != 1 else ''} saved{cut_short}.") + \
            _warnings_html(job)
    if not job.images:  # Skip came before the first step of every batch
        return notice_html("Skipped; no image made.") + _warnings_html(job)
    if unfinished:
        return notice_html(f"Skipped{cut_short}.") + _warnings_html(job)
    return _warnings_html(job)


def _warnings_html(job: Job) -> str:
    """Saving problems: the images are in the gallery, but not (all) on disk or in the history."""
    if not job.warnings:
        return ""
    more = f" (and {len(job.warnings) - 1} more like it)" if len(job.warnings) > 1 else ""
    return error_html(f"{job.warnings[0]}{more}. Free some disk space or check that the outputs folder "
                      "(--outdir) is writable; download the images you want to keep from the gallery.")


def timing_html(job: Job) -> str:
    return "" if job.seconds is None else seconds_html(job.seconds)


def seconds_html(seconds: float, what: str = "") -> str:
    return f"<span class='dw-time'>Time taken: {seconds:.1f} s{html.escape(what)}</span>"


def _bar(fraction: float, text: str) -> str:
    percent = max(0.0, min(1.0, fraction)) * 100
    return (
        "<div class='dw-progress'>"
        f"<div class='dw-progress-bar' style='width:{percent:.1f}%'></div>"
        f"<div class='dw-progress-text'>{html.escape(text)}</div>"
        "</div>"
    )


def bar_html(fraction: float, text: str) -> str:
    """A progress bar with its text, for what is no Job (the Train tab's training run)."""
    return _bar(fraction, text)
