"""Cheap live previews of latents during denoising.

For full-size SD 1.x/2.x and SDXL VAEs a linear map from the 4 latent channels to RGB is good enough and
costs nothing; for small VAEs (the embedded model, test models) a real decode is just as cheap and
far more faithful, so those are decoded.
"""
from __future__ import annotations

import torch
from PIL import Image

from webui.engine.fast_path import uncompiled

# Approximate SD 1.x/2.x latent -> RGB factors (a widely published fact, not a fitted model).
SD_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
# SDXL's latents (a VAE scaling factor of 0.13025) map to RGB otherwise; A1111's cheap approximation uses these.
SDXL_LATENT_RGB = torch.tensor([
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
])
SDXL_SCALING_FACTOR = 0.13025
SMALL_VAE_PARAMS = 5_000_000


def latents_to_preview(latents: torch.Tensor, vae) -> Image.Image:
    """A preview of the first image of the batch."""
    first = latents[:1].detach()
    if sum(p.numel() for p in vae.parameters()) <= SMALL_VAE_PARAMS:
        # Uncompiled: a batch's first image has another shape than the batch, which would compile a variant.
        with torch.inference_mode(), uncompiled():
            decoded = vae.decode((first / vae.config.scaling_factor).to(vae.dtype)).sample[0]
        rgb = (decoded.float().clamp(-1, 1) + 1) / 2
    elif first.shape[1] == 4:
        factors = SDXL_LATENT_RGB if vae.config.scaling_factor == SDXL_SCALING_FACTOR else SD_LATENT_RGB
        rgb = torch.einsum("chw,cr->rhw", first[0].float().cpu(), factors)
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:  # an unknown latent layout: show the first three channels normalised
        rgb = first[0, :3].float()
        rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-6)
    array = (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
