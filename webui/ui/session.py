"""A browser session's own state (gr.State): its job and what its gallery shows; and the gallery's items."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from webui.schemas import GeneratedImage
from webui.worker import Job


@dataclass
class Session:
    """Per-browser-session state (lives in gr.State): this session's job and what its gallery shows.

    `seeds`, `infotexts` and `paths` follow the gallery image for image, refreshed with every gallery update
    (while the job runs too), so a click, ♻ or Send to img2img reads the image the user sees, not the last
    finished run. It holds no pictures: the worker bounds the memory finished jobs take, and pictures kept
    in every session would get round that bound.
    """

    job_id: str | None = None
    tab: str = ""  # the browser tab's secret token (kept in its sessionStorage), so a reload finds its job
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)  # the saved files; None where an image was not saved
    selected: int | None = None  # the gallery's selected index; None when none is selected
    # the gallery's last pick could not be read (Gradio refuses a pick whose file was deleted): none is known
    pick_gone: bool = False
    resumed: bool = False  # the page load found this tab's job and greyed Generate out (so it gives it back)
    run_key: str | None = None  # the run of several jobs (a plot, a batch) it started last, for Interrupt

    def start(self, job: Job) -> None:
        self.job_id = job.id
        self.show([])
        self.selected, self.pick_gone = None, False  # the first update of the run clears the gallery's selection too

    def show(self, images: list[GeneratedImage]) -> None:
        self.seeds = [image.seed for image in images]
        self.infotexts = [image.infotext for image in images]
        self.paths = [image.path for image in images]

    def current_index(self) -> int:
        """The selected image, else the first (as ♻ in stable-diffusion-webui)."""
        return self.selected if self.selected is not None else 0

    def current_infotext(self) -> str:
        index = self.current_index()
        return self.infotexts[index] if index < len(self.infotexts) and not self.pick_gone else ""


def gallery_items(images: list[GeneratedImage]) -> list[tuple[Any, str]]:
    """Saved files are shown by path (no re-encoding); unsaved or since-deleted ones as PIL."""
    return [(image.path if image.path and os.path.exists(image.path) else image.image,
             f"seed {image.seed}" + (" (unfinished)" if image.unfinished else "")) for image in images]


def show_images(session: Session, job: Job, grid: bool = False) -> list[tuple[Any, str]]:
    """Gallery items for the job's images so far, and with `grid` its saved grid after them (A1111's Show grid in
    gallery, which puts it first: last here, so a picture clicked while the run went on keeps its place); the session
    records the same images, in the same order (the grid with the first picture's seed and infotext, as A1111's)."""
    images = list(job.images)  # one snapshot: the worker may append while we read
    grid_image = job.grid_image() if grid and images else None
    if grid_image is not None:
        images.append(grid_image)
    session.show(images)
    items = gallery_items(images)
    return items[:-1] + [(items[-1][0], "grid")] if grid_image is not None else items
