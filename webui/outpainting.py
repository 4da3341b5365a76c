"""A1111's "Poor man's outpainting" script: the picture is set on a larger canvas, and the new border (with a
little of the picture's edge, for a seamless join) is inpainted. Pure: the img2img tab submits the canvas and
its mask as one inpainting job.

As in A1111, the canvas grows to a multiple of 64 on each side it grows, the extra shared between the two
sides in the proportion asked for. Unlike A1111, which inpaints the canvas in tiles of the run's size, the
whole canvas is drawn in one run; a side that is not grown and is no multiple of 8 gets the few pixels that
make it one, drawn too, so the picture is never stretched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from webui.engine.img2img import as_rgb
from webui.schemas import MAX_MASK_BLUR, MAX_SIZE, MIN_SIZE, InvalidRequest

DIRECTIONS = ("left", "right", "up", "down")
MIN_PIXELS, MAX_PIXELS = 8, 256  # A1111's slider
MAX_BLUR = MAX_MASK_BLUR // 2  # the run's blur is twice this
CANVAS_STEP = 64
SIZE_STEP = 8  # a side that does not grow is drawn a few pixels wider, to a multiple of this


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
    if not 0 <= mask_blur <= MAX_BLUR:
        raise ValueError(f"Mask blur: {mask_blur}; use 0 to {MAX_BLUR}")
    wanted = {side: pixels if side in directions else 0 for side in DIRECTIONS}
    left, right = _shared(picture.width, wanted["left"], wanted["right"])
    up, down = _shared(picture.height, wanted["up"], wanted["down"])
    canvas = Image.new("RGB", (picture.width + left + right, picture.height + up + down))
    canvas.paste(as_rgb(picture), (left, up))
    # The part kept: the picture, less 2 x blur on each side asked to grow, so the new border blends into it.
    overlap = {side: 2 * mask_blur if wanted[side] else 0 for side in DIRECTIONS}
    mask = Image.new("L", canvas.size, 255)
    # (PIL's rectangle includes its far edge; A1111's keeps one column of the new border black at blur 0.)
    kept = (left + overlap["left"], up + overlap["up"], canvas.width - right - overlap["right"] - 1,
            canvas.height - down - overlap["down"] - 1)
    if kept[0] <= kept[2] and kept[1] <= kept[3]:  # else the blur's overlap covers the picture: all is drawn
        ImageDraw.Draw(mask).rectangle(kept, fill=0)
    return Outpainting(canvas, mask, 2 * mask_blur)


def _shared(length: int, before: int, after: int) -> tuple[int, int]:
    """How many pixels to add before and after a side of `length`: to a multiple of 64, shared as asked. A side
    asked not to grow gets the few pixels (after it) that make it a multiple of 8, as every run's size is."""
    if not before and not after:
        return 0, -length % SIZE_STEP
    grown = math.ceil((length + before + after) / CANVAS_STEP) * CANVAS_STEP - length
    first = before * grown // (before + after)
    return first, grown - first


def outpainting_job(picture: Image.Image, pixels: int, mask_blur: int, directions: list[str] | None
                    ) -> tuple[Image.Image, Image.Image, dict]:
    """The canvas and mask to inpaint for growing `picture` (directions None: every side), and the request's fields
    for inpainting them (the whole canvas, at its size); InvalidRequest saying what to change."""
    try:
        grown = outpaint(picture, int(pixels), int(mask_blur), list(DIRECTIONS if directions is None else directions))
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    width, height = grown.picture.size
    if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
        raise InvalidRequest(f"Poor man's outpainting: the canvas would be {width}x{height}; each side must be "
                             f"{MIN_SIZE} to {MAX_SIZE}: expand by fewer pixels, use a smaller picture, or grow a "
                             "short side too")
    return grown.picture, grown.mask, {"width": width, "height": height, "resize_mode": 0,
                                       "mask_blur": grown.mask_blur, "inpainting_mask_invert": 0,
                                       "inpaint_full_res": False}
