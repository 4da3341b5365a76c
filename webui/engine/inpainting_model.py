"""Models made for inpainting (sd-v1-5-inpainting and its kin): their UNet reads 9 channels, the 4 of the latents
and 5 that say what to keep: a mask (1 where the picture is drawn again) and the latents of the picture with
that part greyed out. As A1111 gives them:
- txt2img, img2img and the hires fix's second pass: all drawn again, from a grey picture;
- inpainting: the mask, rounded, and the start picture greyed out under it.
The 5 channels are added to every UNet call of a pass by a forward pre-hook, so diffusers' txt2img and img2img
pipelines run these models unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from webui.engine.unet_hooks import removed_after

INPAINTING_CHANNELS = 9  # 4 latents + 1 mask + 4 masked-picture latents
EDIT_CHANNELS = 8  # instruct-pix2pix: 4 latents + 4 of the picture to edit (webui/engine/instruct_pix2pix.py)
UNET_INPUTS = (4, INPAINTING_CHANNELS, EDIT_CHANNELS)  # the UNets that load: text to image, inpainting, pix2pix


def takes_masked_picture(unet) -> bool:
    return unet.config.in_channels == INPAINTING_CHANNELS


def unet_refusal(name: str, in_channels: int) -> str:
    """Why a model whose UNet takes none of UNET_INPUTS is refused."""
    return (f"{name}'s UNet takes {in_channels} input channels (neither a text-to-image, an inpainting nor an "
            f"instruct-pix2pix model); only text-to-image (4), inpainting ({INPAINTING_CHANNELS}) and "
            f"instruct-pix2pix ({EDIT_CHANNELS}) models load")


def masked_picture_input(encode: Callable[[Image.Image], torch.Tensor], size: tuple[int, int],
                         picture: Image.Image | None = None, mask: Image.Image | None = None,
                         rounded: bool = True) -> torch.Tensor:
    """The 5 extra channels (one row) at `size` (pixels, width x height): with no picture, all to be drawn from
    grey; else the picture greyed out where the mask ("L", the picture's size) is at least half on (not rounded:
    greyed as far as the mask covers it, as A1111 gives it with soft inpainting)."""
    if mask is None:
        drawn = np.ones((size[1], size[0]), np.float32)
    else:
        drawn = (np.asarray(mask) >= 128).astype(np.float32) if rounded else np.asarray(mask, np.float32) / 255
    grey = Image.new("RGB", size, (128, 128, 128))  # 0 in the VAE's -1..1, as A1111's 0.5
    masked = grey if picture is None else Image.composite(grey, picture, Image.fromarray(np.round(drawn * 255).astype(np.uint8)))
    latents = encode(masked)
    small = F.interpolate(torch.from_numpy(drawn)[None, None], size=latents.shape[-2:])
    return torch.cat([small.to(latents.device, latents.dtype), latents], dim=1)


@contextlib.contextmanager
def extra_input(unet, channels: torch.Tensor | None) -> Iterator[None]:
    """While inside, every call of the UNet reads `channels` (one row per image) after its latents; CFG's doubled
    batch reads them twice. None adds nothing (a text-to-image model)."""
    if channels is None:
        yield
        return

    def add_channels(_module, args, kwargs):
        sample = args[0]
        extra = channels.to(sample.device, sample.dtype).repeat(sample.shape[0] // channels.shape[0], 1, 1, 1)
        return (torch.cat([sample, extra], dim=1), *args[1:]), kwargs

    with removed_after([unet.register_forward_pre_hook(add_channels, with_kwargs=True)]):
        yield
