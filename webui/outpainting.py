"""A1111's "Poor man's outpainting" script: the picture is set on a larger canvas, and the new border (with a
little of the picture's edge, for a seamless join) is inpainted. Pure: the img2img tab submits the canvas and
its mask as one inpainting job.

As in A1111, the canvas grows to a multiple of 64 on each side it grows, the extra shared between the two
sides in the proportion asked for. Unlike A1111, which inpaints the canvas in tiles of the run's size, the
whole canvas is drawn in one run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

DIRECTIONS = ("left", "right", "up", "down")
MIN_PIXELS, MAX_PIXELS = 8, 256  # A1111's slider
CANVAS_STEP = 64


@dataclass(frozen=True)
class Outpainting:
    picture: Image.Image  # the canvas, the picture on it
    mask: Image.Image  # "L": white where it is drawn
    mask_blur: int  # for the inpainting run (A1111 doubles the script's)


def outpaint(picture: Image.Image, pixels: int, mask_blur: int, directions: list[str]) -> Outpainting:
    """The canvas and mask for growing `picture` by about `pixels` towards each of `directions`."""
    if not directions or set(directions) - set(DIRECTIONS):
        raise ValueError(f"Outpainting direction: pick one or more of {', '.join(DIRECTIONS)}")
    if not MIN_PIXELS <= pixels <= MAX_PIXELS:
        raise ValueError(f"Pixels to expand: {pixels}; use {MIN_PIXELS} to {MAX_PIXELS}")
    if mask_blur < 0:
        raise ValueError(f"Mask blur: {mask_blur}; use 0 or more")
    wanted = {side: pixels if side in directions else 0 for side in DIRECTIONS}
    left, right = _shared(picture.width, wanted["left"], wanted["right"])
    up, down = _shared(picture.height, wanted["up"], wanted["down"])
    canvas = Image.new("RGB", (picture.width + left + right, picture.height + up + down))
    canvas.paste(picture.convert("RGB"), (left, up))
    # The part kept: the picture, less 2 x blur on each grown side, so the new border blends into it.
    overlap = 2 * mask_blur
    mask = Image.new("L", canvas.size, 255)
    kept = (left + (overlap if left else 0), up + (overlap if up else 0),
            canvas.width - right - (overlap if right else 0), canvas.height - down - (overlap if down else 0))
    ImageDraw.Draw(mask).rectangle(kept, fill=0)
    return Outpainting(canvas, mask, overlap)


def _shared(length: int, before: int, after: int) -> tuple[int, int]:
    """How many pixels to add before and after a side of `length`: to a multiple of 64, shared as asked."""
    if not before and not after:
        return 0, 0
    grown = math.ceil((length + before + after) / CANVAS_STEP) * CANVAS_STEP - length
    first = before * grown // (before + after)
    return first, grown - first
