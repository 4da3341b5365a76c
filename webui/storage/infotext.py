"""A1111 infotext: the `parameters` text that stable-diffusion-webui puts in its PNGs.

Layout (a format other tools read):
    <prompt, may span lines>
    Negative prompt: <negative prompt>          (omitted when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ..., Model: ...
A value holding ',', ':' or a newline is written JSON-quoted. A parser treats the last line as
parameters only when it holds at least 3 `Key: value` pairs.
"""
from __future__ import annotations

import json
import re
from typing import Any

NEGATIVE_PREFIX = "Negative prompt:"
# One `Key: value` pair; the value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([\w][\w \-/+()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

# Infotext key -> GenerationRequest field, for the keys that map one to one.
_REQUEST_FIELDS = {
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Model": ("model", str),
}


def quote(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Join prompt, negative prompt and parameters; params with value None are left out."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, {key: value as text})."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines:
        pairs = _parse_pairs(lines[-1])
        if len(pairs) >= 3:
            params = pairs
            lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), params


def _parse_pairs(line: str) -> dict[str, str]:
    pairs = {}
    for key, value in _PAIR.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # keep the text as written: a half-quoted value is still useful to show
        pairs[key.strip()] = value
    return pairs


def request_fields_from_infotext(text: str) -> dict[str, Any]:
    """Turn an infotext (ours or stable-diffusion-webui's) into GenerationRequest fields.

    Keys we don't know are left out; values that don't convert are skipped rather than failing,
    since a PNG from another tool may carry keys in formats we never wrote.
    """
    prompt, negative, params = parse_infotext(text)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for key, (name, convert) in _REQUEST_FIELDS.items():
        if key in params:
            try:
                fields[name] = convert(params[key])
            except ValueError:
                continue
    size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", params.get("Size", ""))
    if size:
        fields["width"], fields["height"] = int(size.group(1)), int(size.group(2))
    return fields
