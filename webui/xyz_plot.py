"""A1111's X/Y/Z plot: one setting varied along each axis, one run for each combination, and the pictures laid
out in a grid (one grid per Z value) with the values as labels.

Pure planning and drawing: the caller runs the cells' requests through the worker, one after another, so
other users' jobs still take their turns. Values are written as in A1111: `5, 10, 20`; ranges `1-5` (1 to 5),
`1-9 (+2)` (1, 3, ..., 9), `0-1 [5]` (5 evenly spaced); quotes keep a comma in a text value.
"""
from __future__ import annotations

import csv
import itertools
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from webui.schemas import InvalidRequest, known_restorer, parse_request, random_seed, seed_after

MAX_PLOT_CELLS = 64  # runs in one plot: each is a job of its own
MAX_AXIS_VALUES = 64
AXIS_NAMES = ("X", "Y", "Z")


@dataclass(frozen=True)
class AxisType:
    label: str  # A1111's name for it, in the picker and the infotext
    kind: str  # "int", "float" or "text": how its values are read
    apply: Callable[[dict, Any], None]  # sets the value into a request (a dict of GenerationRequest fields)
    named: bool = True  # grid labels say "Steps: 20", else just the value (a sampler's or a prompt's text)
    tab: str | None = None  # the one tab it is for: "txt2img" (it sets the hires fix) or "img2img"; None: both


def _setter(field: str) -> Callable[[dict, Any], None]:
    def apply(request: dict, value: Any) -> None:
        request[field] = value
    return apply


# The texts Prompt S/R replaces in: the hires fix's own prompts too, so that its second pass follows the swap.
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


def _replace_in_prompts(request: dict, pair: tuple[str, str]) -> None:
    search, replacement = pair
    for field in PROMPT_FIELDS:
        if request.get(field):
            request[field] = request[field].replace(search, replacement)


def _reorder_prompt(request: dict, order: tuple[str, ...]) -> None:
    """A1111's Prompt order: the places the words take in the prompt, first to last, filled with them in this order."""
    prompt = request.get("prompt") or ""
    missing = [word for word in order if word not in prompt]
    if missing:
        raise ValueError(f"{missing[0]!r} is not in the prompt; Prompt order reorders words the prompt has")
    parts, rest = [], prompt
    for word in sorted(order, key=prompt.find):  # cut out in the order they stand
        at = rest.find(word)
        parts.append(rest[:at])
        rest = rest[at + len(word):]
    request["prompt"] = "".join(part + word for part, word in zip(parts, order)) + rest


def _add_styles(request: dict, names: str) -> None:
    """A1111's Styles axis: the value's styles (several joined by commas) added to the request's own."""
    request["styles"] = [*request.get("styles", []), *(name.strip() for name in names.split(",") if name.strip())]


def _set_eta(request: dict, eta: float) -> None:
    """A1111's Eta axis sets the run's eta, which its sampler reads as its own: DDIM's, or an ancestral one's."""
    request["eta_ddim"] = request["eta_ancestral"] = eta


def _set_size(request: dict, size: str) -> None:
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", size)
    if not match:
        raise ValueError(f"{size!r} is no size; write it as 512x768")
    request["width"], request["height"] = int(match.group(1)), int(match.group(2))


def _set_face_restore(request: dict, value: str) -> None:
    """A1111's Face restore axis: a restorer's name turns it on with that restorer; yes/true/1 on, anything else off."""
    chosen = value.strip().lower()
    if chosen in ("codeformer", "gfpgan"):
        request["face_restoration_model"] = known_restorer(chosen)
    request["restore_faces"] = chosen in ("codeformer", "gfpgan", "true", "yes", "y", "1")


def _flag_setter(field: str) -> Callable[[dict, Any], None]:
    """An on/off axis, its values True or False as A1111's (any case); another value is refused."""
    def apply(request: dict, value: str) -> None:
        word = value.strip().lower()
        if word not in ("true", "false"):
            raise ValueError(f"{value.strip()[:20]!r} is neither True nor False")
        request[field] = word == "true"
    return apply


AXIS_TYPES = {axis.label: axis for axis in (
    AxisType("Nothing", "text", lambda request, value: None),
    AxisType("Seed", "int", _setter("seed")),
    AxisType("Var. seed", "int", _setter("subseed")),
    AxisType("Var. strength", "float", _setter("subseed_strength")),
    AxisType("Steps", "int", _setter("steps")),
    AxisType("CFG Scale", "float", _setter("cfg_scale")),
    AxisType("Image CFG Scale", "float", _setter("image_cfg_scale"), tab="img2img"),
    AxisType("Prompt S/R", "text", _replace_in_prompts, named=False),
    AxisType("Prompt order", "text", _reorder_prompt, named=False),
    AxisType("Sampler", "text", _setter("sampler_name"), named=False),
    AxisType("Schedule type", "text", _setter("scheduler"), named=False),
    AxisType("Checkpoint name", "text", _setter("model"), named=False),
    AxisType("VAE", "text", _setter("sd_vae"), named=False),
    AxisType("Clip skip", "int", _setter("clip_skip")),
    AxisType("Denoising", "float", _setter("denoising_strength")),
    AxisType("Size", "text", _set_size),
    AxisType("Hires steps", "int", _setter("hr_second_pass_steps"), tab="txt2img"),
    AxisType("Hires sampler", "text", _setter("hr_sampler_name"), tab="txt2img"),
    AxisType("Hires upscaler", "text", _setter("hr_upscaler"), tab="txt2img"),
    AxisType("Styles", "text", _add_styles),
    AxisType("Face restore", "text", _set_face_restore),
    AxisType("Refiner checkpoint", "text", _setter("refiner_checkpoint")),  # None: no refiner
    AxisType("Refiner switch at", "float", _setter("refiner_switch_at")),
    AxisType("Negative Guidance minimum sigma", "float", _setter("s_min_uncond")),
    AxisType("Initial noise multiplier", "float", _setter("initial_noise_multiplier")),
    AxisType("Extra noise", "float", _setter("img2img_extra_noise")),
    AxisType("Token merging ratio", "float", _setter("token_merging_ratio")),
    AxisType("Token merging ratio high-res", "float", _setter("token_merging_ratio_hr"), tab="txt2img"),
    AxisType("Sigma Churn", "float", _setter("s_churn")),
    AxisType("Sigma min", "float", _setter("s_tmin")),
    AxisType("Sigma max", "float", _setter("s_tmax")),
    AxisType("Sigma noise", "float", _setter("s_noise")),
    AxisType("Eta", "float", _set_eta),
    AxisType("Schedule min sigma", "float", _setter("sigma_min")),
    AxisType("Schedule max sigma", "float", _setter("sigma_max")),
    AxisType("Schedule rho", "float", _setter("rho")),
    AxisType("Beta schedule alpha", "float", _setter("beta_dist_alpha")),
    AxisType("Beta schedule beta", "float", _setter("beta_dist_beta")),
    AxisType("RNG source", "text", _setter("randn_source")),  # CPU, NV, or A1111's GPU (read as NV)
    AxisType("Cond. Image Mask Weight", "float", _setter("inpainting_mask_weight"), tab="img2img"),
    AxisType("UniPC Order", "int", _setter("uni_pc_order")),
    AxisType("Always discard next-to-last sigma", "text", _flag_setter("always_discard_next_to_last_sigma")),
    AxisType("SGM noise multiplier", "text", _flag_setter("sgm_noise_multiplier")),
)}


@dataclass(frozen=True)
class Axis:
    name: str  # "X", "Y" or "Z"
    type: AxisType
    values: list[Any]
    text: str = ""  # the values as written, which the grid's infotext keeps

    def label(self, index: int) -> str:
        value = self.values[index]
        shown = value[1] if self.type.label == "Prompt S/R" else value
        if self.type.label == "Prompt order":
            shown = ", ".join(value)
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
    except (ValueError, OverflowError) as err:
        raise InvalidRequest(f"{name} values: {err}") from None
    if type_label == "Prompt order":  # every order of the words
        if math.factorial(len(values)) > MAX_AXIS_VALUES:
            raise InvalidRequest(f"{name} values: {len(values)} words make {math.factorial(len(values))} orders; at "
                                 f"most {MAX_AXIS_VALUES} fit on an axis (4 words)")
        values = list(itertools.permutations(values))
    if len(values) > MAX_AXIS_VALUES:
        raise InvalidRequest(f"{name} values: {len(values)} values; at most {MAX_AXIS_VALUES} fit on an axis")
    if type_label == "Prompt S/R":  # the first value is what the others replace in the prompts
        values = [(values[0], value) for value in values]
    return Axis(name, axis_type, values, text.strip())


SCRIPT = "X/Y/Z plot"  # A1111's "Script" infotext value for it


def plot_params(axes: list[Axis]) -> dict[str, str]:
    """A1111's keys for the plot in its grid's infotext: Script, and each axis's type and values as written (and
    the seeds picked for -1, "Fixed X Values"), so that pasting the grid's parameters sets the plot again."""
    params = {"Script": SCRIPT}
    for axis in axes:
        if axis.type.label == "Nothing":
            continue
        params[f"{axis.name} Type"], params[f"{axis.name} Values"] = axis.type.label, axis.text
        if axis.type.label in SEED_AXES and read_axis(axis.name, axis.type.label, axis.text).values != axis.values:
            params[f"Fixed {axis.name} Values"] = ", ".join(map(str, axis.values))
    return params


def _split(text: str) -> list[str]:
    """Comma-separated values, as a CSV line: quotes keep a comma inside a value; a line break parts values too."""
    text = text.replace("\r", "").replace("\n", ",")
    if not text.strip():
        return []
    try:
        return [item.strip() for item in next(csv.reader([text], skipinitialspace=True)) if item.strip()]
    except csv.Error as err:
        raise InvalidRequest(f"values: {err}; put a value holding a comma in double quotes") from None


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
        if kind == "int":  # in whole numbers, exact at any size (seeds go to 2**64): as A1111's int() cuts
            return [start + (end - start) * i // max(count - 1, 1) for i in range(count)]
        return [round(start + (end - start) * i / max(count - 1, 1), 6) for i in range(count)]
    step = step if step is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"{item!r}: a step of {step:g} never gets from {start:g} to {end:g}")
    if abs((end - start) / step) >= MAX_AXIS_VALUES:
        raise ValueError(f"{item!r}: more than {MAX_AXIS_VALUES} values")
    if kind == "int":  # exact, as A1111's range(): floats lose whole numbers past 2**53
        return list(range(start, end + (1 if step > 0 else -1), step))
    values, value = [], start
    while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
        values.append(number(round(value, 6)) if kind == "float" else value)
        value += step
    return values


@dataclass(frozen=True)
class Plot:
    axes: list[Axis]  # X, Y, Z, with a random seed value (-1) fixed unless kept
    cells: list[Cell]  # in the order they run: a Checkpoint name axis changes slowest, then Z, Y, X


SEED_AXES = ("Seed", "Var. seed")


def plan(base: dict, axes: list[Axis], keep_random_seeds: bool = False,
         check: Callable[[dict], Any] = parse_request, vary_seeds: tuple[bool, bool, bool] = (False, False, False)
         ) -> Plot:
    """Every combination's request, each checked whole by `check` (the worker's own checks, by default a
    request's) before any runs; InvalidRequest naming the values at fault. A random seed (-1), in the request or
    on a Seed axis, is picked once for all, so the pictures differ by the axes alone, unless keep_random_seeds.
    vary_seeds (A1111's "Vary seeds for X", Y, Z): the seed counts up along those axes, each cell its own."""
    x, y, z = axes
    count = len(x.values) * len(y.values) * len(z.values)
    if count > MAX_PLOT_CELLS:
        raise InvalidRequest(f"X/Y/Z plot: {count} combinations; at most {MAX_PLOT_CELLS} (use fewer values)")
    base = dict(base)
    check(base)  # what is wrong whatever the axes say is named plainly
    if not keep_random_seeds:
        axes = [_fixed_seeds(axis) for axis in axes]
        for field in ("seed", "subseed"):
            if base.get(field, -1) == -1:
                base[field] = random_seed()
    x, y, z = axes
    cells = []
    for (zi, zv), (yi, yv), (xi, xv) in itertools.product(enumerate(z.values), enumerate(y.values),
                                                          enumerate(x.values)):
        request = dict(base)
        where = [(axis, index) for axis, index in ((x, xi), (y, yi), (z, zi)) if axis.type.label != "Nothing"]
        for axis, index in where:
            _apply(axis, request, axis.values[index], index)
        _vary_seed(request, (xi, yi, zi), [len(axis.values) for axis in axes], vary_seeds)
        try:
            check(request)
        except InvalidRequest as err:
            values = ", ".join(f"{axis.name} value {axis.label(index)!r}" for axis, index in where)
            raise InvalidRequest(f"{values}: {err}") from None
        cells.append(Cell(xi, yi, zi, request))
    return Plot(axes, _run_order(cells, axes))


def _vary_seed(request: dict, where: tuple[int, ...], sizes: list[int], vary: tuple[bool, ...]) -> None:
    """The cell's seed counted up by its place along the varied axes, as A1111 counts: X fastest."""
    offset, step = 0, 1
    for index, size, varied in zip(where, sizes, vary):
        if varied:
            offset += index * step
            step *= size
    if offset and request.get("seed", -1) != -1:  # a random seed stays random
        request["seed"] = seed_after(request["seed"], offset)


def _fixed_seeds(axis: Axis) -> Axis:
    if axis.type.label not in SEED_AXES or -1 not in axis.values:
        return axis
    return replace(axis, values=[random_seed() if v == -1 else v for v in axis.values])


def _run_order(cells: list[Cell], axes: list[Axis]) -> list[Cell]:
    """The cells as they run: each model loaded once (the Checkpoint name axis slowest), else as planned."""
    for number, axis in enumerate(axes):
        if axis.type.label == "Checkpoint name":
            return sorted(cells, key=lambda cell: (cell.x, cell.y, cell.z)[number])  # stable: the rest in order
    return cells


def _apply(axis: Axis, request: dict, value: Any, index: int) -> None:
    if axis.type.label == "Prompt S/R" and not any(value[0] in (request.get(field) or "") for field in PROMPT_FIELDS):
        raise InvalidRequest(f"{axis.name} values: Prompt S/R's first value {value[0]!r} is not in the prompt; "
                             "it is the text the others replace")
    try:
        axis.type.apply(request, value)
    except ValueError as err:
        raise InvalidRequest(f"{axis.name} value {axis.label(index)!r}: {err}") from None


# --- drawing -------------------------------------------------------------------------------

MAX_GRID_PIXELS = 80_000_000  # below Pillow's decompression-bomb warning, so the saved grid opens again
MIN_FONT = 8


def draw_grid(pictures: dict[tuple[int, int], Image.Image], x: Axis, y: Axis, title: str | None = None,
              legend: bool = True) -> Image.Image:
    """One grid: pictures by (x, y) index in columns and rows, the X labels above, the Y labels on the left and
    the title (the Z value) over all, unless legend is off. Cells take the largest picture's size (the whole
    scaled down to stay under MAX_GRID_PIXELS); a missing picture (a failed run) leaves its cell white. A label
    too long for its place is set smaller, then cut with "…"."""
    columns, rows = len(x.values), len(y.values)
    cell_w = max(picture.width for picture in pictures.values())
    cell_h = max(picture.height for picture in pictures.values())
    scale = min(1.0, (MAX_GRID_PIXELS / (columns * cell_w * rows * cell_h * 1.5)) ** 0.5)  # 1.5: room for labels
    if scale < 1:
        pictures = {where: picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
                    for where, picture in pictures.items()}
        cell_w, cell_h = max(1, round(cell_w * scale)), max(1, round(cell_h * scale))
    size = max(12, min(48, cell_h // 14))
    gap = size // 2
    x_labels = [_fit(x.label(i), size, cell_w - gap, cell_h // 3) for i in range(columns)] if (
        legend and x.type.label != "Nothing") else []
    left = max(96, cell_w * 3 // 4) if legend and y.type.label != "Nothing" else 0
    y_labels = [_fit(y.label(j), size, left - gap, cell_h) for j in range(rows)] if left else []
    titled = _fit(title, size, columns * cell_w - gap, cell_h // 3) if legend and title else None
    title_h = _height(titled) + gap if titled else 0
    top = title_h + (max(_height(label) for label in x_labels) + gap if x_labels else 0)
    grid = Image.new("RGB", (left + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if titled:
        _write(draw, titled, left, 0, columns * cell_w)
    for i, label in enumerate(x_labels):
        _write(draw, label, left + i * cell_w, title_h, cell_w)
    for j, label in enumerate(y_labels):
        _write(draw, label, 0, top + j * cell_h + (cell_h - _height(label)) // 2, left)
    for (i, j), picture in pictures.items():
        grid.paste(picture.convert("RGB"), (left + i * cell_w + (cell_w - picture.width) // 2,
                                            top + j * cell_h + (cell_h - picture.height) // 2))
    return grid


def _fit(text: str, size: int, width: int, height: int) -> tuple[ImageFont.ImageFont, list[str]]:
    """The font and lines that set text within width x height pixels: smaller type first, then cut with "…"."""
    width = max(width, 1)
    for tried in range(size, MIN_FONT - 1, -1):
        font = ImageFont.load_default(size=tried)  # Pillow's own font: nothing to install on a server
        lines = _wrapped(text, font, width)
        if len(lines) * _line_height(font) <= height:
            return font, lines
    keep = max(1, height // _line_height(font))
    if len(lines) > keep:
        lines = lines[:keep - 1] + [_cut(" ".join(lines[keep - 1:]), font, width)]
    return font, lines


def _wrapped(text: str, font, width: int) -> list[str]:
    """Greedy word wrap by measured width; a word wider than a line is broken where it must be."""
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(line) <= width:
            lines[-1] = line
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = next(n for n in range(len(word) - 1, 0, -1) if font.getlength(word[:n]) <= width or n == 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def _cut(text: str, font, width: int) -> str:
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _line_height(font) -> int:
    return font.size + font.size // 3


def _height(label: tuple[ImageFont.ImageFont, list[str]]) -> int:
    font, lines = label
    return len(lines) * _line_height(font)


def _write(draw: ImageDraw.ImageDraw, label: tuple[ImageFont.ImageFont, list[str]], left: int, top: int,
           width: int) -> None:
    """The label's lines, centred in the band [left, left + width)."""
    font, lines = label
    for k, line in enumerate(lines):
        draw.text((left + (width - font.getlength(line)) / 2, top + k * _line_height(font)), line, fill="black",
                  font=font)
