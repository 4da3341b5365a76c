"""A1111's X/Y/Z plot: one setting varied along each axis, one run for each combination, and the pictures laid
out in a grid (one grid per Z value) with the values as labels.

Pure planning and drawing: the caller runs the cells' requests through the worker, one after another, so
other users' jobs still take their turns. Values are written as in A1111: `5, 10, 20`; ranges `1-5` (1 to 5),
`1-9 (+2)` (1, 3, ..., 9), `0-1 [5]` (5 evenly spaced); quotes keep a comma in a text value.
"""
from __future__ import annotations

import csv
import itertools
import random
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from webui.schemas import MAX_SEED, InvalidRequest, parse_request

MAX_PLOT_CELLS = 64  # runs in one plot: each is a job of its own
MAX_AXIS_VALUES = 64
AXIS_NAMES = ("X", "Y", "Z")


@dataclass(frozen=True)
class AxisType:
    label: str  # A1111's name for it, in the picker and the infotext
    kind: str  # "int", "float" or "text": how its values are read
    apply: Callable[[dict, Any], None]  # sets the value into a request (a dict of GenerationRequest fields)
    named: bool = True  # grid labels say "Steps: 20", else just the value (a sampler's or a prompt's text)


def _setter(field: str) -> Callable[[dict, Any], None]:
    def apply(request: dict, value: Any) -> None:
        request[field] = value
    return apply


def _replace_in_prompts(request: dict, pair: tuple[str, str]) -> None:
    search, replacement = pair
    for field in ("prompt", "negative_prompt"):
        request[field] = (request.get(field) or "").replace(search, replacement)


def _set_size(request: dict, size: str) -> None:
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", size)
    if not match:
        raise ValueError(f"{size!r} is no size; write it as 512x768")
    request["width"], request["height"] = int(match.group(1)), int(match.group(2))


AXIS_TYPES = {axis.label: axis for axis in (
    AxisType("Nothing", "text", lambda request, value: None),
    AxisType("Seed", "int", _setter("seed")),
    AxisType("Var. seed", "int", _setter("subseed")),
    AxisType("Var. strength", "float", _setter("subseed_strength")),
    AxisType("Steps", "int", _setter("steps")),
    AxisType("CFG Scale", "float", _setter("cfg_scale")),
    AxisType("Prompt S/R", "text", _replace_in_prompts, named=False),
    AxisType("Sampler", "text", _setter("sampler_name"), named=False),
    AxisType("Schedule type", "text", _setter("scheduler"), named=False),
    AxisType("Checkpoint name", "text", _setter("model"), named=False),
    AxisType("Clip skip", "int", _setter("clip_skip")),
    AxisType("Denoising", "float", _setter("denoising_strength")),
    AxisType("Size", "text", _set_size),
    AxisType("Hires steps", "int", _setter("hr_second_pass_steps")),
)}


@dataclass(frozen=True)
class Axis:
    name: str  # "X", "Y" or "Z"
    type: AxisType
    values: list[Any]

    def label(self, index: int) -> str:
        value = self.values[index]
        shown = value[1] if self.type.label == "Prompt S/R" else value
        if isinstance(shown, float):
            shown = f"{shown:g}"
        return f"{self.type.label}: {shown}" if self.type.named else str(shown)


@dataclass(frozen=True)
class Cell:
    """One combination: where it sits (x, y, z indices) and the request that draws it."""
    x: int
    y: int
    z: int
    request: dict


def read_axis(name: str, type_label: str, text: str) -> Axis:
    """The axis `name` ("X", "Y", "Z") of type type_label with its values written as text; InvalidRequest saying
    what to fix. Nothing (or no values) is an axis of one value that changes nothing."""
    axis_type = AXIS_TYPES.get(type_label)
    if axis_type is None:
        raise InvalidRequest(f"{name} type: {type_label!r} is no axis type; choose one of {', '.join(AXIS_TYPES)}")
    items = _split(text)
    if type_label == "Nothing" or not items:
        return Axis(name, AXIS_TYPES["Nothing"], [None])
    try:
        values = [value for item in items for value in _values(axis_type.kind, item)]
    except ValueError as err:
        raise InvalidRequest(f"{name} values: {err}") from None
    if len(values) > MAX_AXIS_VALUES:
        raise InvalidRequest(f"{name} values: {len(values)} values; at most {MAX_AXIS_VALUES} fit on an axis")
    if type_label == "Prompt S/R":  # the first value is what the others replace in the prompts
        values = [(values[0], value) for value in values]
    return Axis(name, axis_type, values)


def _split(text: str) -> list[str]:
    """Comma-separated values, as a CSV line: quotes keep a comma inside a value."""
    if not text.strip():
        return []
    return [item.strip() for item in next(csv.reader([text], skipinitialspace=True)) if item.strip()]


_RANGE = re.compile(r"^([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*(?:\(\s*([+-]?\d+(?:\.\d*)?)\s*\)|"
                    r"\[\s*(\d+)\s*\])?$")


def _values(kind: str, item: str) -> list[Any]:
    """One written item's values: a number, a range (1-5, 1-9 (+2), 0-1 [5]) or a text."""
    if kind == "text":
        return [item]
    number = int if kind == "int" else float
    match = _RANGE.match(item)
    if not match:
        try:
            return [number(item)]
        except ValueError:
            raise ValueError(f"{item!r} is no {'whole ' if kind == 'int' else ''}number or range "
                             "(write 5, or 1-5, 1-9 (+2), 0-1 [5])") from None
    start, end, step, count = match.groups()
    try:
        start, end = number(start), number(end)
        step = number(step) if step is not None else None
    except ValueError:
        raise ValueError(f"{item!r}: a range of whole numbers takes whole numbers") from None
    if count is not None:
        count = int(count)
        if not 1 <= count <= MAX_AXIS_VALUES:
            raise ValueError(f"{item!r}: take 1 to {MAX_AXIS_VALUES} values")
        spaced = [start + (end - start) * i / max(count - 1, 1) for i in range(count)]
        return [number(round(value)) if kind == "int" else round(value, 6) for value in spaced]
    step = step if step is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"{item!r}: a step of {step:g} never gets from {start:g} to {end:g}")
    if abs((end - start) / step) >= MAX_AXIS_VALUES:
        raise ValueError(f"{item!r}: more than {MAX_AXIS_VALUES} values")
    values, value = [], start
    while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
        values.append(number(round(value, 6)) if kind == "float" else value)
        value += step
    return values


def plan_cells(base: dict, axes: list[Axis], keep_random_seeds: bool = False) -> list[Cell]:
    """Every combination's request, Z slowest and X fastest, each checked as a request; InvalidRequest naming the
    axis value at fault. A random seed (-1) is picked once for all, so the pictures differ by the axes alone,
    unless keep_random_seeds."""
    x, y, z = axes
    count = len(x.values) * len(y.values) * len(z.values)
    if count > MAX_PLOT_CELLS:
        raise InvalidRequest(f"X/Y/Z plot: {count} combinations; at most {MAX_PLOT_CELLS} (use fewer values)")
    base = dict(base)
    if not keep_random_seeds:
        for field in ("seed", "subseed"):
            if base.get(field, -1) == -1:
                base[field] = random.randint(0, MAX_SEED)
    cells = []
    for (zi, zv), (yi, yv), (xi, xv) in itertools.product(enumerate(z.values), enumerate(y.values),
                                                          enumerate(x.values)):
        request = dict(base)
        for axis, value, index in ((x, xv, xi), (y, yv, yi), (z, zv, zi)):
            _apply(axis, request, value, index)
        cells.append(Cell(xi, yi, zi, request))
    return cells


def _apply(axis: Axis, request: dict, value: Any, index: int) -> None:
    if value is None:
        return
    where = f"{axis.name} value {axis.label(index)!r}"
    if axis.type.label == "Prompt S/R" and value[0] not in (request.get("prompt") or "") + (
            request.get("negative_prompt") or ""):
        raise InvalidRequest(f"{axis.name} values: Prompt S/R's first value {value[0]!r} is not in the prompt; "
                             "it is the text the others replace")
    try:
        axis.type.apply(request, value)
    except ValueError as err:
        raise InvalidRequest(f"{where}: {err}") from None
    try:
        parse_request(request)
    except InvalidRequest as err:
        raise InvalidRequest(f"{where}: {err}") from None


# --- drawing -------------------------------------------------------------------------------

def draw_grid(pictures: dict[tuple[int, int], Image.Image], x: Axis, y: Axis, title: str | None = None,
              legend: bool = True) -> Image.Image:
    """One grid: pictures by (x, y) index in columns and rows, the X labels above, the Y labels on the left and
    the title (the Z value) over all, unless legend is off. Cells take the largest picture's size; a missing
    picture (a failed run) leaves its cell white."""
    cell_w = max(picture.width for picture in pictures.values())
    cell_h = max(picture.height for picture in pictures.values())
    font = _font(max(12, min(48, cell_h // 14)))
    line_h = font.size + font.size // 3
    show_x = legend and x.type.label != "Nothing"
    show_y = legend and y.type.label != "Nothing"
    x_lines = [_wrapped(x.label(i), font, cell_w) for i in range(len(x.values))] if show_x else []
    y_lines = [_wrapped(y.label(j), font, cell_w) for j in range(len(y.values))] if show_y else []
    title_lines = _wrapped(title, font, cell_w * len(x.values)) if legend and title else []
    top = (len(title_lines) + max(map(len, x_lines), default=0)) * line_h + (line_h // 2 if show_x or title_lines else 0)
    left = (max(_text_width(line, font) for lines in y_lines for line in lines) + font.size) if show_y else 0
    grid = Image.new("RGB", (left + cell_w * len(x.values), top + cell_h * len(y.values)), "white")
    draw = ImageDraw.Draw(grid)
    _write(draw, title_lines, font, left, 0, cell_w * len(x.values), line_h)
    for i, lines in enumerate(x_lines):
        _write(draw, lines, font, left + i * cell_w, len(title_lines) * line_h, cell_w, line_h)
    for j, lines in enumerate(y_lines):
        middle = top + j * cell_h + (cell_h - len(lines) * line_h) // 2
        _write(draw, lines, font, 0, middle, left, line_h)
    for (i, j), picture in pictures.items():
        grid.paste(picture.convert("RGB"), (left + i * cell_w + (cell_w - picture.width) // 2,
                                            top + j * cell_h + (cell_h - picture.height) // 2))
    return grid


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own font: nothing to install on a server


def _text_width(text: str, font) -> int:
    return int(font.getlength(text))


def _wrapped(text: str, font, width: int) -> list[str]:
    """The text in lines that fit `width` pixels (at least a word a line)."""
    per_line = max(4, int(width / max(font.getlength("n"), 1)))
    return textwrap.wrap(text, per_line) or [""]


def _write(draw: ImageDraw.ImageDraw, lines: list[str], font, left: int, top: int, width: int, line_h: int) -> None:
    """Lines centred in the band [left, left + width)."""
    for k, line in enumerate(lines):
        draw.text((left + (width - _text_width(line, font)) / 2, top + k * line_h), line, fill="black", font=font)
