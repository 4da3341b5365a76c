"""Composable diffusion, as A1111 reads a prompt: `a castle AND a dragon:0.8` is two prompts, each denoised in
the same UNet batch, whose pulls away from the negative prompt add up with their weights:

    guided = uncond + cfg * sum_i weight_i * (cond_i - uncond)

A part's weight is a number after a colon at its very end (1 when there is none); a lone prompt ending in one
(`a castle:1.2`) is one part of that weight, as in A1111. The negative prompt is not split.

diffusers' pipelines do classifier-free guidance themselves (uncond + cfg * (cond - uncond)), so the parts are
folded in around the UNet: a pre-hook turns each image's one cond row into a row per part, and a hook after it
hands back uncond + sum_i weight_i * (cond_i - uncond) as the cond row. Every sampler then runs unchanged.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch

from webui.engine.unet_hooks import removed_after, with_prediction

AND = re.compile(r"\bAND\b")
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111's: "text:1.5"


@dataclass(frozen=True)
class Part:
    text: str
    weight: float = 1.0


def split_parts(prompt: str) -> list[Part]:
    """The prompt's parts between AND, each with its weight."""
    parts = []
    for piece in AND.split(prompt):
        text, weight = WEIGHT.match(piece).groups()
        parts.append(Part(text, float(weight) if weight is not None else 1.0))
    return parts


def is_composed(prompt: str) -> bool:
    """Whether the prompt needs composing: more than one part, or one part with a weight of its own."""
    parts = split_parts(prompt)
    return len(parts) > 1 or parts[0].weight != 1.0


def part_texts(prompt: str) -> list[str]:
    """The texts the text encoder reads for a prompt: its parts' (as A1111, `a cat:1` reads `a cat`)."""
    return [part.text for part in split_parts(prompt)]


def and_in_square_brackets(prompt: str) -> bool:
    """Whether an AND stands inside [...] (prompt editing, alternation), which A1111 would cut in two."""
    depth = 0
    for token in re.finditer(r"\\.|\[|\]|\bAND\b", prompt):
        text = token.group()
        if text == "[":
            depth += 1
        elif text == "]":
            depth = max(0, depth - 1)
        elif text == "AND" and depth:
            return True
    return False


def composition_error(prompt: str, phase_prompts: list[str], guided: bool) -> str | None:
    """Why a pass of `prompt`, whose phases read `phase_prompts`, cannot be composed, or None."""
    if not any(is_composed(text) for text in phase_prompts):
        return None
    if and_in_square_brackets(prompt):
        return ("AND inside [...] is not read (A1111 would cut the brackets in two); put the [...] inside each part, "
                "as in [a cat:a dog:5] AND a tree")
    if not guided:
        parts = split_parts(next(text for text in phase_prompts if is_composed(text)))
        if len(parts) > 1:
            return "AND needs classifier-free guidance: set a CFG scale above 1"
        return (f"it ends in ':{parts[0].weight:g}', which A1111 reads as the prompt's own weight (composable "
                "diffusion), and that needs a CFG scale above 1: raise CFG, or end the prompt otherwise "
                "(a comma after the number)")
    if len({tuple(part.weight for part in split_parts(text)) for text in phase_prompts}) > 1:
        # The UNet batch holds a row per part for the whole pass, each with its weight.
        return "the parts' weights may not change during a run (a [...] in a part's weight); write them as numbers"
    return None


@contextlib.contextmanager
def composed_guidance(unet, weights: list[float] | None) -> Iterator[None]:
    """While inside, a UNet call under CFG (rows: each image's uncond, then each image's cond, whose text
    embeddings hold the parts one after another along the tokens) runs a row per part and gives back
    uncond + sum_i weight_i * (cond_i - uncond) as the cond row. None: the calls are left alone."""
    if weights is None:
        yield
        return
    count = len(weights)

    def spread(_module, args, kwargs):
        sample, timestep, *rest = args
        images = sample.shape[0] // 2
        kwargs = {**kwargs, "encoder_hidden_states": _row_per_part(kwargs["encoder_hidden_states"], images, count)}
        added = kwargs.get("added_cond_kwargs")
        if added:  # SDXL: each part's pooled vector (side by side as the parts' tokens are); the size numbers repeat
            kwargs["added_cond_kwargs"] = {
                name: _row_per_part(value, images, count) if name == "text_embeds" else _repeated(value, images, count)
                for name, value in added.items()}
        sample = _repeated(sample, images, count)
        if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == 2 * images:
            timestep = _repeated(timestep, images, count)
        return (sample, timestep, *rest), kwargs

    def combine(prediction):
        images = prediction.shape[0] // (count + 1)
        uncond = prediction[:images]
        conds = prediction[images:].reshape(count, images, *prediction.shape[1:])
        guided = uncond + sum(weight * (cond - uncond) for weight, cond in zip(weights, conds))
        return torch.cat([uncond, guided.to(prediction.dtype)])

    with removed_after([unet.register_forward_pre_hook(spread, with_kwargs=True),
                        unet.register_forward_hook(lambda _module, _args, output: with_prediction(output, combine))]):
        yield


def _row_per_part(value: torch.Tensor, images: int, count: int) -> torch.Tensor:
    """[uncond rows; cond rows holding the parts side by side along dim 1] -> [uncond rows, as wide as one part; a
    row per part of each image, part by part]."""
    width = value.shape[1] // count
    conds = value[images:].unflatten(1, (count, width)).transpose(0, 1).flatten(0, 1)
    return torch.cat([value[:images, :width], conds])


def _repeated(value: torch.Tensor, images: int, count: int) -> torch.Tensor:
    """[uncond rows; cond rows] -> [uncond rows; the cond rows `count` times over]."""
    return torch.cat([value[:images], value[images:].repeat(count, *[1] * (value.ndim - 1))])
