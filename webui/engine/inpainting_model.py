"""Models made for inpainting (sd-v1-5-inpainting and its kin): their UNet reads 9 channels, the 4 of the latents
and 5 that say what to keep: a mask (1 where the picture is drawn again) and the latents of the picture with
that part greyed out. As A1111 gives them:
- txt2img: all drawn again, from a grey picture;
- img2img and the hires fix's second pass: all drawn again, from the start picture greyed out;
- inpainting: the mask, rounded, and the start picture greyed out under it.
How far greyed out is A1111's Inpainting conditioning mask strength (1: all grey, the default).
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
GREY = 128  # 0 in the VAE's -1..1, as A1111's 0.5


def takes_masked_picture(unet) -> bool:
    return unet.config.in_channels == INPAINTING_CHANNELS


def unet_refusal(name: str, in_channels: int) -> str:
    """Why a model whose UNet takes none of UNET_INPUTS is refused."""
    return (f"{name}'s UNet takes {in_channels} input channels (neither a text-to-image, an inpainting nor an "
            f"instruct-pix2pix model); only text-to-image (4), inpainting ({INPAINTING_CHANNELS}) and "
            f"instruct-pix2pix ({EDIT_CHANNELS}) models load")


def masked_picture_input(encode: Callable[[Image.Image], torch.Tensor], size: tuple[int, int],
                         picture: Image.Image | list[Image.Image] | None = None, mask: Image.Image | None = None,
                         rounded: bool = True, weight: float = 1.0) -> torch.Tensor:
    """The 5 extra channels at `size` (pixels, width x height): the mask ("L", the picture's size; none: all of it
    drawn), at least half on where rounded (not rounded: as far as it covers, as A1111 gives it with soft
    inpainting), and the picture greyed out under it. `weight` is A1111's Inpainting conditioning mask strength:
    below 1 the picture shows through the grey, so the model keeps more of it. No picture: all grey (txt2img). A
    list of pictures gives a row each."""
    if mask is None:
        drawn = np.ones((size[1], size[0]), np.float32)
    else:
        drawn = (np.asarray(mask) >= 128).astype(np.float32) if rounded else np.asarray(mask, np.float32) / 255
    pictures = picture if isinstance(picture, list) else [picture]
    latents = torch.cat([encode(_greyed_out(one, size, drawn, weight)) for one in pictures])
    small = F.interpolate(torch.from_numpy(drawn)[None, None], size=latents.shape[-2:])
    return torch.cat([small.to(latents.device, latents.dtype).expand(latents.shape[0], -1, -1, -1), latents], dim=1)


def _greyed_out(picture: Image.Image | None, size: tuple[int, int], drawn: np.ndarray, weight: float) -> Image.Image:
    """The picture (stretched to `size`) moved towards grey by `weight` times the mask; no picture: grey."""
    if picture is None:
        return Image.new("RGB", size, (GREY,) * 3)
    if picture.size != size:  # a start picture kept at its own size (resize mode "Just resize (latent upscale)")
        picture = picture.resize(size, Image.LANCZOS)
    kept = (1 - weight * drawn)[..., None]
    pixels = GREY + (np.asarray(picture.convert("RGB"), np.float32) - GREY) * kept
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


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
