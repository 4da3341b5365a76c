"""PNG files under outputs/, named and laid out as stable-diffusion-webui does.

    outputs/txt2img-images/YYYY-MM-DD/NNNNN-<seed>.png   (counter continues across restarts)
    outputs/txt2img-grids/YYYY-MM-DD/NNNNN-<seed>.png

Every file is written under a temporary name and renamed, so a crash never leaves a half-written
PNG under a real name. Only the worker thread writes here.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_NUMBERED = re.compile(r"^(\d{5})-")


class OutputStore:
    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self._next_numbers: dict[Path, int] = {}

    def image_folder(self, kind: str, day: dt.date | None = None) -> Path:
        return self.outdir / f"{kind}-images" / (day or dt.date.today()).isoformat()

    def grid_folder(self, kind: str, day: dt.date | None = None) -> Path:
        return self.outdir / f"{kind}-grids" / (day or dt.date.today()).isoformat()

    def save_image(self, image: Image.Image, infotext: str, seed: int, kind: str = "txt2img") -> Path:
        return self._save(image, infotext, seed, self.image_folder(kind))

    def save_grid(self, images: list[Image.Image], infotext: str, seed: int, kind: str = "txt2img") -> Path:
        return self._save(make_grid(images), infotext, seed, self.grid_folder(kind))

    def resolve(self, path: str | Path) -> Path:
        """A path inside outdir, or ValueError: callers never reach files outside it (no '..')."""
        candidate = (self.outdir / path).resolve()
        root = self.outdir.resolve()
        if candidate != root and root not in candidate.parents:
            raise ValueError(f"path {str(path)!r} is outside the outputs folder")
        return candidate

    def _save(self, image: Image.Image, infotext: str, seed: int, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        number = self._take_number(folder)
        final = folder / f"{number:05d}-{seed}.png"
        metadata = PngInfo()
        metadata.add_text("parameters", infotext)
        fd, temp_name = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG", pnginfo=metadata)
            os.replace(temp_name, final)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return final

    def _take_number(self, folder: Path) -> int:
        if folder not in self._next_numbers:
            self._next_numbers[folder] = highest_number(folder) + 1
        number = self._next_numbers[folder]
        self._next_numbers[folder] = number + 1
        return number


def highest_number(folder: Path) -> int:
    """The largest NNNNN prefix among the folder's files, or -1 when there is none."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.exists() else []
    return max(numbers, default=-1)


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Lay images out in a near-square grid, row by row."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text of a PNG (ours or stable-diffusion-webui's), if it has one."""
    return image.info.get("parameters") or (getattr(image, "text", None) or {}).get("parameters")
