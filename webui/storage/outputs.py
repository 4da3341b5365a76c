"""PNG files under outputs/, named and laid out as stable-diffusion-webui does.

    outputs/txt2img-images/YYYY-MM-DD/NNNNN-<seed>.png   (counter continues across restarts)
    outputs/txt2img-grids/YYYY-MM-DD/grid-NNNN.png

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
_GRID_NUMBERED = re.compile(r"^grid-(\d{4,})\.")


class OutputStore:
    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self._next_numbers: dict[Path, int] = {}

    def image_folder(self, kind: str, day: dt.date | None = None) -> Path:
        return self.outdir / f"{kind}-images" / (day or dt.date.today()).isoformat()

    def grid_folder(self, kind: str, day: dt.date | None = None) -> Path:
        return self.outdir / f"{kind}-grids" / (day or dt.date.today()).isoformat()

    def save_image(self, image: Image.Image, infotext: str, seed: int, kind: str = "txt2img") -> Path:
        folder = self.image_folder(kind)
        return self._save(image, infotext, folder, lambda n: f"{n:05d}-{seed}.png", _NUMBERED)

    def save_grid(self, grid: Image.Image, infotext: str, kind: str = "txt2img") -> Path:
        folder = self.grid_folder(kind)
        return self._save(grid, infotext, folder, lambda n: f"grid-{n:04d}.png", _GRID_NUMBERED)

    def resolve(self, path: str | Path) -> Path:
        return resolve_inside(self.outdir, path)

    def _save(self, image: Image.Image, infotext: str, folder: Path, name_for, numbered: re.Pattern) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        metadata = PngInfo()
        metadata.add_text("parameters", infotext)
        fd, temp_name = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG", pnginfo=metadata)
            return self._claim_name(Path(temp_name), folder, name_for, numbered)
        finally:
            Path(temp_name).unlink(missing_ok=True)

    def _claim_name(self, temp: Path, folder: Path, name_for, numbered: re.Pattern) -> Path:
        """Give the finished file its numbered name. os.link fails instead of overwriting when
        another process sharing this folder took the number first; then take the next one."""
        while True:
            if folder not in self._next_numbers:
                self._next_numbers[folder] = highest_number(folder, numbered) + 1
            number = self._next_numbers[folder]
            self._next_numbers[folder] = number + 1
            final = folder / name_for(number)
            try:
                os.link(temp, final)
                return final
            except FileExistsError:
                del self._next_numbers[folder]  # rescan: someone else wrote here
            except OSError:  # no hard links (some network or FUSE drives): a plain rename
                os.replace(temp, final)
                return final


def resolve_inside(root: Path, path: str | Path) -> Path:
    """root/path, or ValueError when it lands outside root: callers never reach other files ('..')."""
    root = Path(root).resolve()
    candidate = (root / path).resolve()
    if candidate != root and root not in candidate.parents:
        raise ValueError(f"path {str(path)!r} is outside the outputs folder")
    return candidate


def highest_number(folder: Path, numbered: re.Pattern = _NUMBERED) -> int:
    """The largest file number in the folder (NNNNN-... images, grid-NNNN grids), or -1."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := numbered.match(p.name))] if folder.exists() else []
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
