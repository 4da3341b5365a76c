"""A1111's "Prompts from file or textbox": one run for each line. A line is a prompt, or A1111's options for the
run (`--prompt "a cat" --negative_prompt "blurry" --steps 30 --seed 5`); what a line leaves out is the page's.

Pure reading: the caller runs the requests through the worker, one after another.
"""
from __future__ import annotations

import shlex

from webui.schemas import InvalidRequest, random_seed, seed_after

MAX_LINES = 100  # runs in one list: each is a job of its own

# A1111's options a line may give, by request field, and how each is read.
_OPTIONS = {"prompt": str, "negative_prompt": str, "styles": str, "sampler_name": str, "scheduler": str,
            "seed": int, "subseed": int, "subseed_strength": float, "steps": int, "cfg_scale": float, "width": int,
            "height": int, "batch_size": int, "n_iter": int, "clip_skip": int, "denoising_strength": float,
            "tiling": "boolean", "restore_faces": "boolean", "seed_resize_from_w": int, "seed_resize_from_h": int}
# A1111's options for what this server does not have: named in the message rather than passed over.
_NOT_HERE = ("sd_model", "outpath_samples", "outpath_grids", "prompt_for_display", "sampler_index", "do_not_save_samples",
             "do_not_save_grid")


PROMPT_POSITIONS = ("start", "end")  # A1111's "Insert prompts at the"


def line_requests(base: dict, text: str, same_seed: bool = False, iterate_seed: bool = False,
                  prompt_position: str | None = None) -> list[dict]:
    """One request for each non-empty line of text, the line's options over base; InvalidRequest naming the line
    and what to fix. same_seed: a random seed (-1) is picked once for every line. iterate_seed (A1111's "Iterate seed
    every line"): line n's seed is that seed + n x the base's images, unless the line gives one. prompt_position
    "start" or "end" (A1111's "Insert prompts at the"): a line's prompts go before or after the base's, joined by a
    space, instead of replacing them."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidRequest("Prompts from a list: write one prompt (or one line of --options) for each run")
    if len(lines) > MAX_LINES:
        raise InvalidRequest(f"Prompts from a list: {len(lines)} lines; at most {MAX_LINES} runs at once")
    base = dict(base)
    if (same_seed or iterate_seed) and base.get("seed", -1) == -1:
        base["seed"] = random_seed()
    images_per_line = base.get("batch_size", 1) * base.get("n_iter", 1)
    requests = []
    for number, line in enumerate(lines):
        try:
            fields = _options(line)
        except ValueError as err:
            raise InvalidRequest(f"Prompts from a list, line {number + 1}: {err}") from None
        if iterate_seed and "seed" not in fields:
            fields["seed"] = seed_after(base["seed"], number * images_per_line)
        requests.append(base | fields | _joined_prompts(base, fields, prompt_position))
    return requests


def _joined_prompts(base: dict, fields: dict, position: str | None) -> dict:
    """A line's prompts joined to the base's, at the start or the end (as A1111 joins them: where both are given)."""
    if position is None:
        return {}
    joined = {}
    for name in ("prompt", "negative_prompt"):
        if fields.get(name) and base.get(name):
            parts = (fields[name], base[name]) if position == "start" else (base[name], fields[name])
            joined[name] = " ".join(parts)
    return joined


def _options(line: str) -> dict:
    """The fields a line sets: its options, or the whole line as the prompt."""
    if not line.startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as err:  # an unclosed quote
        raise ValueError(f"{err}; close each quote") from None
    fields: dict = {}
    while words:
        flag = words.pop(0)
        name = flag[2:]
        if not flag.startswith("--") or not name:
            raise ValueError(f"{flag!r} is no option; write --name value, with quotes around a value holding spaces")
        if name in _NOT_HERE:
            raise ValueError(f"--{name} is an option this server does not have; take it out")
        if name not in _OPTIONS:
            raise ValueError(f"--{name} is no option; the options are --{', --'.join(_OPTIONS)}")
        if not words or words[0].startswith("--"):
            raise ValueError(f"--{name} needs a value")
        value = words.pop(0)
        while name in ("prompt", "negative_prompt") and words and not words[0].startswith("--"):
            value += " " + words.pop(0)  # as A1111: a prompt's words run on to the next option, quoted or not
        if _OPTIONS[name] == "boolean":  # A1111 writes --tiling true
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--{name} {value!r}: write true or false")
            fields[name] = value.lower() == "true"
            continue
        try:
            fields[name] = _OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"--{name} {value!r} is no {'whole ' if _OPTIONS[name] is int else ''}number") from None
    if "styles" in fields:
        fields["styles"] = [style.strip() for style in fields["styles"].split(",") if style.strip()]
    return fields
