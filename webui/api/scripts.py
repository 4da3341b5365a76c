"""stable-diffusion-webui's selectable scripts on /sdapi/v1/txt2img and img2img: `script_name` and its positional
`script_args`, read as A1111 1.10 reads them, into what runs here: request fields (SD upscale), one job on other
pictures (poor man's outpainting), or a run of several jobs that the page runs too (webui/runs.py: the X/Y/Z plot,
the prompt matrix, prompts from a list, Loopback).

Each script's arguments are listed once (label, default, how to read it), for reading and for /script-info. Args left
out, or null, take A1111's defaults; script names are matched without case, as A1111 matches them.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from PIL import Image

from webui.loopback import CURVES, INTERROGATIONS, MAX_LOOPS
from webui.outpainting import DIRECTIONS, MAX_BLUR, MAX_PIXELS, MIN_PIXELS, outpainting_job
from webui.prompt_lines import PROMPT_POSITIONS
from webui.prompt_matrix import matrix_plot
from webui.runs import SeveralJobs, found_models, in_grid_order, line_run, loopback_run, plot_grids, plot_run, \
    side_by_side, with_z_grid
from webui.engine.soft_inpainting import DEFAULTS as SOFT_DEFAULTS, LABELS as SOFT_LABELS, RANGES as SOFT_RANGES
from webui.engine.soft_inpainting import SOFT_INPAINTING_FIELDS, STEPS as SOFT_STEPS
from webui.schemas import MASKED_CONTENT, GeneratedImage, InvalidRequest
from webui.sd_upscale import DEFAULT_UPSCALER, MAX_OVERLAP, MAX_SCALE, MIN_SCALE, UPSCALERS as SD_UPSCALERS
from webui.worker import Job, Worker
from webui.xyz_plot import AXIS_NAMES, AXIS_TYPES, SCRIPT, plan, plot_params, read_axis

# A1111's names, as /sdapi/v1/scripts lists them (its titles in lower case).
XYZ_PLOT, PROMPT_MATRIX, PROMPT_LINES = "x/y/z plot", "prompt matrix", "prompts from file or textbox"
LOOPBACK, OUTPAINTING, SD_UPSCALE = "loopback", "poor man's outpainting", "sd upscale"
SCRIPTS = {"txt2img": (PROMPT_MATRIX, PROMPT_LINES, XYZ_PLOT),
           "img2img": (LOOPBACK, OUTPAINTING, PROMPT_MATRIX, PROMPT_LINES, SD_UPSCALE, XYZ_PLOT)}
SEVERAL_JOBS = (XYZ_PLOT, PROMPT_MATRIX, PROMPT_LINES, LOOPBACK)  # the scripts that run several jobs
# A1111's always-on scripts here (besides the ControlNet extension's: webui/api/controlnet.py), taken from
# alwayson_scripts: {name: {"args": [...]}}, and listed by /scripts and /script-info as A1111 lists them.
SOFT_INPAINTING = "soft inpainting"
ALWAYS_ON = {"txt2img": (), "img2img": (SOFT_INPAINTING,)}

# A1111 1.10's X/Y/Z plot axes, in its order, each for both tabs or for one: x_type, y_type and z_type are indexes
# into those of the tab. Ours are taken by label; the others are refused by name.
A1111_AXES = (
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", "txt2img"), ("CFG Scale", None), ("Image CFG Scale", "img2img"), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None), ("Sigma min", None),
    ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None), ("Schedule min sigma", None),
    ("Schedule max sigma", None), ("Schedule rho", None), ("Beta schedule alpha", None), ("Beta schedule beta", None),
    ("Eta", None), ("Clip skip", None), ("Denoising", None), ("Initial noise multiplier", None), ("Extra noise", None),
    ("Hires upscaler", "txt2img"), ("Cond. Image Mask Weight", "img2img"), ("VAE", None), ("Styles", None),
    ("UniPC Order", None), ("Face restore", None), ("Token merging ratio", None),
    ("Token merging ratio high-res", None), ("Always discard next-to-last sigma", None),
    ("SGM noise multiplier", None), ("Refiner checkpoint", None), ("Refiner switch at", None), ("RNG source", None),
    ("FP8 mode", None), ("Size", None),
)
# The axes A1111 takes from a dropdown (its x_values_dropdown...) unless csv_mode: a list of its choices.
_DROPDOWN_AXES = ("Sampler", "Hires sampler", "Checkpoint name", "Schedule type", "Hires upscaler", "VAE", "Styles",
                  "Refiner checkpoint", "RNG source", "Always discard next-to-last sigma", "SGM noise multiplier")


def a1111_axes(kind: str) -> list[str]:
    """The X/Y/Z plot's axis labels a tab offers in A1111, by their index."""
    return [label for label, only in A1111_AXES if only in (None, kind)]


@dataclass(frozen=True)
class Arg:
    """One of a script's script_args: A1111's label and default, how a value is read (ValueError saying what is
    wrong), and what /script-info says of it."""
    label: str
    default: Any
    read: Callable[[Any], Any] = lambda value: value
    choices: Sequence[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    field: str | None = None  # SD upscale: the request field it sets


def number(value: Any, whole: bool = False, low: float | None = None, high: float | None = None) -> int | float:
    """A script argument that is a number (a JSON number, or one written as text); whole: an integer; within low to
    high where given."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    # (an int is exact and may be larger than any float: compared as it is, never converted first)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"expected a number, got {value!r}"[:200])
    if whole and value != int(value):
        raise ValueError(f"expected a whole number, got {value!r}"[:200])
    if (low is not None and value < low) or (high is not None and value > high):
        shown = f"{value:g}" if isinstance(value, float) else f"{value}"[:20]
        raise ValueError(f"{shown} is out of range; use {_bound(low)} to {_bound(high)}")
    return int(value) if whole else float(value)


def _bound(limit: float | None) -> str:
    return "any" if limit is None else f"{limit:g}"


def _whole(low: float | None = None, high: float | None = None) -> Callable[[Any], int]:
    return lambda value: number(value, True, low, high)


def _fraction(value: Any) -> float:
    return number(value, False, 0, 1)


def _boolean(value: Any) -> bool:
    """A checkbox: true or false (as JSON, or written as text; 0 and 1 too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}"[:200])


def _one_of(choices: Sequence[str], by_index: bool = False) -> Callable[[Any], Any]:
    """A choice by name, without case (by_index: or by its place, which is what is returned)."""
    def read(value: Any) -> Any:
        names = [choice.lower() for choice in choices]
        if isinstance(value, str) and value.strip().lower() in names:
            index = names.index(value.strip().lower())
            return index if by_index else choices[index]
        if by_index and not isinstance(value, bool) and isinstance(value, int) and 0 <= value < len(choices):
            return value
        places = " (or its number from 0)" if by_index else ""
        raise ValueError(f"expected one of {', '.join(choices)}{places}, got {value!r}"[:300])
    return read


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a text, got {type(value).__name__}")
    return value


def _directions(value: Any) -> list[str]:
    """Outpainting's sides: a list of left, right, up and down (a text of them, parted by commas, too)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected a list of {', '.join(DIRECTIONS)}")
    read = _one_of(DIRECTIONS)
    return [read(item) for item in items if item.strip()]


def _sd_upscaler(value: Any) -> str:
    """SD upscale's upscaler, given by its place in A1111's list (0 None, 1 Lanczos, 2 Nearest) or by name (a model
    upscaler's too)."""
    by_name = {upscaler.lower(): upscaler for upscaler in SD_UPSCALERS}
    if isinstance(value, str) and value.strip().lower() in by_name:
        return by_name[value.strip().lower()]
    try:
        index = number(value, whole=True)
    except ValueError:
        index = -1
    if 0 <= index < len(SD_UPSCALERS):
        return SD_UPSCALERS[index]
    if isinstance(value, str) and value.strip() and index < 0:
        return value.strip()  # a model upscaler's name: checked against the server's files when the job is queued
    choices = ", ".join(f"{i} {upscaler}" for i, upscaler in enumerate(SD_UPSCALERS))
    raise ValueError(f"no upscaler {value!r} on this server; send one of {choices} (the number or the name), or a "
                     "model upscaler's name from GET /sdapi/v1/upscalers (A1111's numbers past 2 differ by server)")


def _axis_type(kind: str) -> Callable[[Any], str]:
    """An X/Y/Z plot axis type: A1111's index into the tab's axes (or its label), as our axis's label."""
    labels = a1111_axes(kind)

    def read(value: Any) -> str:
        if isinstance(value, str) and not value.strip().isdigit():
            label = next((label for label in labels if label.lower() == value.strip().lower()), None)
            if label is None:
                raise ValueError(f"no axis {value!r}; send the index of one of {kind}'s axes (GET "
                                 "/sdapi/v1/script-info lists them)"[:300])
        else:
            index = number(value, whole=True)
            if not 0 <= index < len(labels):
                raise ValueError(f"no axis {index}; {kind}'s axes are 0 to {len(labels) - 1}")
            label = labels[index]
        if label not in AXIS_TYPES or AXIS_TYPES[label].tab not in (None, kind):
            ours = ", ".join(f"{labels.index(name)} {name}" for name in labels if name in AXIS_TYPES)
            raise ValueError(f"the axis {label!r} is not on this server; its axes are {ours}")
        return label
    return read


def _axis_values(value: Any) -> str:
    """An axis's values as A1111 takes them: a text (`5, 10, 20`), or a list (the dropdown's), as that text."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
        line = io.StringIO()
        csv.writer(line).writerow(value)  # quotes keep a comma inside a value
        return line.getvalue().strip()
    raise ValueError(f"expected a text or a list, got {type(value).__name__}")


def _interrogation(value: Any) -> str:
    """None or CLIP, in any case (A1111's DeepBooru tagger is not offered)."""
    for choice in INTERROGATIONS:
        if str(value).strip().lower() == choice.lower():
            return choice
    raise ValueError(f"{value!r}: send None or CLIP (A1111's DeepBooru tagger is not on this server)"[:200])


def _margin(value: Any) -> int:
    return number(value, True, 0, 500)


def _between(low: float, high: float) -> Callable[[Any], float]:
    return lambda value: number(value, False, low, high)


def _args(kind: str, name: str) -> tuple[Arg, ...]:
    """A script's script_args in A1111's order."""
    if name == XYZ_PLOT:
        axes = a1111_axes(kind)
        return (*(arg for axis, default in zip(AXIS_NAMES, ("Seed", "Nothing", "Nothing")) for arg in (
                    Arg(f"{axis} type", default, _axis_type(kind), choices=axes),
                    Arg(f"{axis} values", "", _axis_values),
                    Arg(f"{axis} values", [], _axis_values))),
                Arg("Draw legend", True, _boolean), Arg("Include Sub Images", False, _boolean),
                Arg("Include Sub Grids", False, _boolean), Arg("Keep -1 for seeds", False, _boolean),
                *(Arg(f"Vary seeds for {axis}", False, _boolean) for axis in AXIS_NAMES),
                Arg("Grid margins (px)", 0, _margin, minimum=0, maximum=500, step=2),
                Arg("Use text inputs instead of dropdowns", False, _boolean))
    if name == PROMPT_MATRIX:
        return (Arg("Set at prompt start", False, _boolean), Arg("Random seeds", False, _boolean),
                Arg("Prompt type", "positive", _one_of(("positive", "negative")), choices=["positive", "negative"]),
                Arg("Joining char", "comma", _one_of(("comma", "space")), choices=["comma", "space"]),
                Arg("Grid margins", 0, _margin, minimum=0, maximum=500, step=2))
    if name == PROMPT_LINES:
        return (Arg("Iterate seed every line", False, _boolean),
                Arg("Use same random seed for all lines", False, _boolean),
                Arg("Insert prompts at the", "start", _one_of(PROMPT_POSITIONS), choices=list(PROMPT_POSITIONS)),
                Arg("List of prompt inputs", "", _text))
    if name == LOOPBACK:
        return (Arg("Loops", 4, _whole(1, MAX_LOOPS), minimum=1, maximum=MAX_LOOPS, step=1),
                Arg("Final denoising strength", 0.5, _fraction, minimum=0, maximum=1, step=0.01),
                Arg("Denoising strength curve", "Linear", _one_of(CURVES), choices=list(CURVES)),
                Arg("Append interrogated prompt at each iteration", "None", _interrogation,
                    choices=list(INTERROGATIONS)))
    if name == SOFT_INPAINTING:  # its checkbox, then its sliders
        return (Arg("Soft inpainting", False, _boolean),
                *(Arg(label, default, _between(low, high), minimum=low, maximum=high, step=step, field=field)
                  for label, default, (low, high), step, field
                  in zip(SOFT_LABELS, SOFT_DEFAULTS, SOFT_RANGES, SOFT_STEPS, SOFT_INPAINTING_FIELDS)))
    if name == OUTPAINTING:
        return (Arg("Pixels to expand", 128, _whole(MIN_PIXELS, MAX_PIXELS), minimum=MIN_PIXELS, maximum=MAX_PIXELS,
                    step=8),
                Arg("Mask blur", 4, _whole(0, MAX_BLUR), minimum=0, maximum=MAX_BLUR, step=1),
                Arg("Masked content", "fill", _one_of(MASKED_CONTENT, by_index=True), choices=list(MASKED_CONTENT)),
                Arg("Outpainting direction", list(DIRECTIONS), _directions, choices=list(DIRECTIONS)))
    return (Arg("Info", None),  # SD upscale
            Arg("Tile overlap", 64, _whole(), minimum=0, maximum=MAX_OVERLAP, step=16, field="sd_upscale_overlap"),
            Arg("Upscaler", DEFAULT_UPSCALER, _sd_upscaler, field="sd_upscale_upscaler"),
            Arg("Scale Factor", 2.0, number, minimum=MIN_SCALE, maximum=MAX_SCALE, step=0.05, field="sd_upscale_scale"))


def script_name(name: str | None, kind: str) -> str | None:
    """The script a body names (A1111's name, in lower case), None for none; InvalidRequest for one not here."""
    name = (name or "").strip()
    if name.lower() in ("", "none"):
        return None
    if name.lower() not in SCRIPTS[kind]:
        raise InvalidRequest(f"script_name: there is no {kind} script {name!r} on this server; {kind} has "
                             f"{', '.join(map(repr, SCRIPTS[kind]))} (GET /sdapi/v1/scripts lists them)")
    return name.lower()


def read_args(kind: str, name: str, given: list | None, where: str = "script_args") -> tuple[list[Any], list[str]]:
    """The script's arguments, given or A1111's defaults, read; and what is refused, naming where[i]. Args past the
    script's own are left alone, as A1111 leaves them."""
    given, values, refused = list(given or []), [], []
    for position, arg in enumerate(_args(kind, name)):
        value = given[position] if position < len(given) and given[position] is not None else arg.default
        try:
            values.append(arg.read(value))
        except ValueError as err:
            refused.append(f"{where}[{position}] ({arg.label.lower()}): {err}")
            values.append(None)
    return values, refused


def soft_inpainting_fields(alwayson: dict[str, Any] | None, kind: str, has_mask: bool
                           ) -> tuple[dict[str, Any], list[str], list[str]]:
    """A body's alwayson_scripts["soft inpainting"] (its name in any case, as A1111 matches it) as request fields:
    the fields, what is refused (naming the arg) and notes (on, but with no mask to soften)."""
    script = next((value for name, value in (alwayson or {}).items() if name.lower() == SOFT_INPAINTING), None)
    where = f"alwayson_scripts.{SOFT_INPAINTING}"
    if script is None:
        return {}, [], []
    if kind != "img2img":
        return {}, [f"{where}: soft inpainting is an img2img script for inpainting; send it to /sdapi/v1/img2img "
                    "with a mask"], []
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        return {}, [f"{where}: send {{\"args\": [enabled, {', '.join(label.lower() for label in SOFT_LABELS)}]}}"], []
    values, refused = read_args(kind, SOFT_INPAINTING, script.get("args"), f"{where}.args")
    if refused or not values[0]:
        return {}, refused, []
    if not has_mask:  # as A1111, which softens only a mask
        return {}, [], [f"{where}: no mask was sent, so soft inpainting did not run (it softens inpainting's mask)"]
    return {"soft_inpainting": True} | dict(zip(SOFT_INPAINTING_FIELDS, values[1:])), [], []


def sd_upscale_fields(values: list[Any]) -> dict[str, Any]:
    """SD upscale's request fields, from its arguments read."""
    return {"sd_upscale": True} | {arg.field: value for arg, value in zip(_args("img2img", SD_UPSCALE), values)
                                   if arg.field}


def sd_upscale_names() -> dict[str, str]:
    """SD upscale's request fields -> the script_args they came from, for messages about them."""
    return {arg.field: f"script_args[{position}] ({arg.label.lower()})"
            for position, arg in enumerate(_args("img2img", SD_UPSCALE)) if arg.field}


def script_info(kind: str, name: str, upscalers: list[str]) -> list[dict[str, Any]]:
    """A script's args as A1111's /sdapi/v1/script-info describes them; `upscalers`: SD upscale's choices."""
    return [{"label": arg.label, "value": arg.default, "minimum": arg.minimum, "maximum": arg.maximum,
             "step": arg.step, "choices": list(arg.choices) if arg.choices else (
                 upscalers if arg.field == "sd_upscale_upscaler" else None)}
            for arg in _args(kind, name)]


# --- the scripts that change the pictures or run several jobs ---------------------------------------------------
def outpainting(values: list[Any], picture: Image.Image, mask: Image.Image | None
                ) -> tuple[Image.Image, Image.Image, dict[str, Any]]:
    """Poor man's outpainting: the canvas and mask its one job inpaints, and that job's request fields."""
    if mask is not None:
        raise InvalidRequest("mask: poor man's outpainting makes its own mask; send none")
    pixels, blur, fill, directions = values
    canvas, grown_mask, fields = outpainting_job(picture, pixels, blur, directions)
    return canvas, grown_mask, fields | {"inpainting_fill": fill}


@dataclass
class Result:
    """What a run of several jobs answers: grids first, then its images (`made`, with the job of each) where
    `send_made`; info's all_seeds, all_prompts and infotexts follow the images made, as A1111's."""
    grids: list[GeneratedImage]
    made: list[tuple[Job, GeneratedImage]]
    send_made: bool = True


@dataclass
class ScriptRun:
    run: SeveralJobs
    result: Callable[[], Result]  # once the run has ended: what it answers
    notes: list[str] = field(default_factory=list)  # what runs other than asked


def _made(jobs: list[Job]) -> list[tuple[Job, GeneratedImage]]:
    return [(job, image) for job in jobs for image in job.images]


def several_jobs(kind: str, name: str, values: list[Any], base: dict, picture: Image.Image | None,
                 mask: Image.Image | None, worker: Worker, find_model: Callable[[str], str]) -> ScriptRun:
    """The run of a script that runs several jobs, each checked before any is queued; InvalidRequest saying what to
    fix. find_model: a Checkpoint name axis's value -> the model's name (ModelNotFound for none)."""
    if name == XYZ_PLOT:
        return _xyz_plot(values, base, picture, mask, worker, find_model)
    if name == PROMPT_MATRIX:
        return _prompt_matrix(values, base, picture, mask, worker)
    if name == PROMPT_LINES:
        iterate, same_seed, position, text = values
        run = line_run(worker, base, text, same_seed, picture, mask, iterate_seed=iterate, prompt_position=position)
        return ScriptRun(run, lambda: Result([], _made(run.jobs)))
    loops, final_strength, curve, interrogation = values
    run = loopback_run(worker, base, loops, final_strength, curve, picture, mask, interrogation)
    return ScriptRun(run, lambda: _loopback_result(run, loops))


def _margin_note(margin: int) -> list[str]:
    return [f"script_args: grid margins of {margin} px are not drawn here; the grid has none"] if margin else []


def _xyz_plot(values: list[Any], base: dict, picture: Image.Image | None, mask: Image.Image | None, worker: Worker,
              find_model: Callable[[str], str]) -> ScriptRun:
    legend, lone_images, sub_grids, keep_seeds, vary_x, vary_y, vary_z, margin, csv_mode = values[9:]
    axes = []
    for number_, axis in enumerate(AXIS_NAMES):
        label, text, dropdown = values[3 * number_:3 * number_ + 3]
        if dropdown and (not text or (label in _DROPDOWN_AXES and not csv_mode)):
            text = dropdown  # A1111 reads the dropdown's list for these
        try:
            axes.append(found_models(read_axis(axis, label, text), find_model))
        except InvalidRequest as err:
            raise InvalidRequest(f"script_args[{3 * number_ + 1}] ({axis.lower()} values): "
                                 f"{str(err).removeprefix(f'{axis} values: ')}") from None
    plot = plan(base, axes, keep_seeds, check=worker.check, vary_seeds=(vary_x, vary_y, vary_z))
    run = plot_run(plot, picture, mask, SCRIPT)

    def result() -> Result:
        if not run.finished:  # no grid is drawn from part of a plot
            return Result([], _made(run.jobs))
        made = in_grid_order(plot, run.jobs)
        grids = with_z_grid(plot_grids([(cell, job.images) for cell, job in made], plot.axes, legend,
                                       plot_params(plot.axes)), sub_grids)
        return Result(grids, [(job, job.images[0]) for _, job in made if job.images], send_made=lone_images)
    return ScriptRun(run, result, _margin_note(margin))


def _prompt_matrix(values: list[Any], base: dict, picture: Image.Image | None, mask: Image.Image | None,
                   worker: Worker) -> ScriptRun:
    at_start, different_seeds, prompt_type, joining, margin = values
    plot = matrix_plot(base, parts_first=at_start, different_seeds=different_seeds, negative=prompt_type == "negative",
                       check=worker.check, joiner=", " if joining == "comma" else " ")
    run = plot_run(plot, picture, mask, "Prompt matrix")

    def result() -> Result:
        if not run.finished:
            return Result([], _made(run.jobs))
        made = in_grid_order(plot, run.jobs)
        grids = plot_grids([(cell, job.images) for cell, job in made], plot.axes, True, {})
        return Result(grids, _made([job for _, job in made]))
    return ScriptRun(run, result, _margin_note(margin))


def _loopback_result(run: SeveralJobs, loops: int) -> Result:
    """As A1111's Loopback: every loop's picture (with several batch counts, each chain's last), and their grid first
    when there are more than one. A loop cut short by Skip counts: the next went on from its picture."""
    finished = [job for job in run.jobs if job.images]
    chains = math.ceil(len(run.submissions) / loops)
    if chains > 1:
        finished = [job for number, job in enumerate(run.jobs, 1) if number % loops == 0 and job in finished]
    made = [(job, job.images[0]) for job in finished]
    grids = [GeneratedImage(side_by_side([image.image for _, image in made]), made[0][1].seed, 0,
                            made[0][1].infotext)] if len(made) > 1 else []
    return Result(grids, made)
