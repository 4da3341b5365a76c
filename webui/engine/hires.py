"""Hires fix (A1111's txt2img second pass): the size it makes, and the latent upscalers.

A1111 draws the picture at the first size, enlarges it, and denoises it again part-way at the larger size
(an img2img pass), which keeps the composition of the small picture and adds the detail. Names, sizes and
the steps of the second pass follow A1111, so its infotexts and API requests mean the same here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

# A1111's latent upscalers: name -> (torch interpolation mode, antialias).
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Upscalers that enlarge the decoded picture (name -> PIL's filter; Extras uses them too); A1111's ESRGAN family
# needs model files.
IMAGE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
NO_UPSCALER = "None"  # A1111's name for "leave the size alone"
PICTURE_UPSCALERS = (NO_UPSCALER, *IMAGE_UPSCALERS)  # Extras' and SD upscale's choices, as A1111 lists them
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
MAX_SCHEDULE = 1000  # a second pass of s steps at strength d is a schedule of s/d steps; samplers stop at 1000


@dataclass(frozen=True)
class HiresSize:
    """The size the picture is enlarged to (multiples of 8), and the size kept after cutting the overflow
    when both a width and a height were given for another shape."""

    upscaled: tuple[int, int]
    final: tuple[int, int]


def hires_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0) -> HiresSize:
    """A1111's rule: by the scale, or to the resize width and/or height (one alone keeps the shape; both
    fill that size and cut what sticks out)."""
    if not resize_x and not resize_y:
        to = (int(width * scale), int(height * scale))
        target = to
    elif not resize_y:
        to = target = (resize_x, resize_x * height // width)
    elif not resize_x:
        to = target = (resize_y * width // height, resize_y)
    else:
        target = (resize_x, resize_y)
        if width / height < resize_x / resize_y:
            to = (resize_x, resize_x * height // width)
        else:
            to = (resize_y * width // height, resize_y)
    upscaled = (to[0] // 8 * 8, to[1] // 8 * 8)
    return HiresSize(upscaled, (min(upscaled[0], target[0] // 8 * 8), min(upscaled[1], target[1] // 8 * 8)))


def schedule_steps(hires_steps: int, strength: float) -> int:
    """The schedule whose last `hires_steps` steps are the second pass, as A1111 makes it: hires_steps / strength
    steps (the strength kept below 1), so the pass starts `strength` deep and runs exactly the hires steps."""
    return int(hires_steps / min(strength, 0.999))


def upscale_latents(latents: torch.Tensor, upscaler: str, size: tuple[int, int]) -> torch.Tensor:
    """Latents enlarged to `size` (latent pixels, width x height) by a latent upscaler."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return F.interpolate(latents.float(), size=(size[1], size[0]), mode=mode, antialias=antialias).to(latents.dtype)


def crop_center(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The middle `size` (width x height) of the latents."""
    left, top = _middle(latents.shape[-1], latents.shape[-2], size)
    return latents[..., top:top + size[1], left:left + size[0]]


def crop_center_picture(picture: Image.Image, size: tuple[int, int], factor: int) -> Image.Image:
    """The part of a picture that crop_center keeps of its latents (`size` in pixels, `factor` pixels a latent)."""
    left, top = _middle(picture.width // factor, picture.height // factor, (size[0] // factor, size[1] // factor))
    return picture.crop((left * factor, top * factor, left * factor + size[0], top * factor + size[1]))


def _middle(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    return (width - size[0]) // 2, (height - size[1]) // 2
