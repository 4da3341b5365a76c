"""Live previews of latents during denoising, by A1111's Live preview methods (its show_progress_type setting):

- Approx cheap: for full-size SD 1.x/2.x and SDXL VAEs a linear map from the 4 latent channels to RGB, which costs
  nothing; small VAEs (the embedded model, test models) are decoded, as cheap and far more faithful.
- Full: the model's own VAE decodes the first picture, the finished picture's colours at a decode's cost.
- TAESD: madebyollin's tiny decoder of the same latents (A1111's `models/VAE-taesd/taesd_decoder.pth`, and
  `taesdxl_decoder.pth` for SDXL, fetched on first use as A1111 does), near Full's look at a fraction of its cost.
  Where it cannot be had, Approx cheap's preview is shown and the log says why, once.
A1111's Approx NN (a small network of its own) is read as Approx cheap.

What is shown is where the run is heading (A1111's default preview subject): each step's estimate of the finished
latents, as the sampler works it out, rather than the noisy latents it goes on with; PLMS, which keeps none, shows
those.
"""
from __future__ import annotations

import functools
import logging
import pickle
import threading
from pathlib import Path

import torch
from PIL import Image

from webui.engine.downloads import DownloadFailed, download
from webui.engine.fast_path import uncompiled

log = logging.getLogger(__name__)

PREVIEW_METHODS = ("Approx cheap", "Full", "TAESD")
TAESD_FILES = {False: "taesd_decoder.pth", True: "taesdxl_decoder.pth"}  # by SDXL or not
TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/{}"

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


def latents_to_preview(latents: torch.Tensor, vae, method: str = "Approx cheap", tiny_decoder=None) -> Image.Image:
    """A preview of the first image of the batch, by `method` (PREVIEW_METHODS); TAESD's needs `tiny_decoder`
    (TinyDecoders.decoder), without which it is Approx cheap's."""
    first = latents[:1].detach()
    if method == "TAESD" and tiny_decoder is not None:
        with torch.inference_mode():
            decoded = tiny_decoder(first.to(next(tiny_decoder.parameters()).dtype))[0]
        return _picture((decoded.float().clamp(-1, 1) + 1) / 2)
    if method == "Full" or sum(p.numel() for p in vae.parameters()) <= SMALL_VAE_PARAMS:
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
    return _picture(rgb)


def _picture(rgb: torch.Tensor) -> Image.Image:
    """A (3, h, w) tensor of 0..1 as a picture."""
    array = (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


class TinyDecoders:
    """TAESD's decoders, read from `folder` once each (fetched into it first where they are not there, unless
    `downloads` is off). One that cannot be had is asked for no more; the next start tries again."""

    def __init__(self, folder: Path, downloads: bool = True):
        self.folder, self.downloads = folder, downloads
        self._lock = threading.Lock()
        self._decoders: dict[bool, torch.nn.Module | None] = {}

    def decoder(self, sdxl: bool, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module | None:
        with self._lock:
            if sdxl not in self._decoders:
                self._decoders[sdxl] = self._read(self.folder / TAESD_FILES[sdxl])
            decoder = self._decoders[sdxl]
        return decoder.to(device, dtype) if decoder is not None else None

    def _read(self, path: Path) -> torch.nn.Module | None:
        try:
            if not path.is_file():
                if not self.downloads:
                    raise OSError("it is not there and this server does not download (--offline)")
                download(TAESD_URL.format(path.name), path, load_tiny_decoder, "a TAESD decoder")
            return load_tiny_decoder(path)
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, DownloadFailed) as err:
            log.warning("TAESD live previews: %s cannot be used (%s); the previews are Approx cheap's (put the file "
                        "there from %s)", path, err, TAESD_URL.format(path.name))
            return None


def load_tiny_decoder(path: Path) -> torch.nn.Module:
    """A TAESD decoder file (madebyollin's layout, as A1111 reads it) as diffusers' DecoderTiny, which takes latents
    as the UNet leaves them and gives pictures in -1..1. What torch.load or load_state_dict raise for a file that is
    none (RuntimeError, pickle.UnpicklingError, ...), ValueError for one of other weights."""
    from diffusers.models.autoencoders.vae import DecoderTiny

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("it holds no weights")
    decoder = DecoderTiny(in_channels=4, out_channels=3, num_blocks=(3, 3, 3, 1), block_out_channels=(64,) * 4,
                          upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest")
    decoder.load_state_dict(_diffusers_keys(state))
    return decoder.eval().requires_grad_(False)


def _diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """madebyollin's keys ("1.weight", "3.conv.0.weight") as DecoderTiny's ("layers.0.weight", ...): its first layer,
    the clamp, has no weights and is part of DecoderTiny's forward, so every layer's index is one lower."""
    renamed = {}
    for key, value in state.items():
        index, dot, rest = key.partition(".")
        if not index.isdigit() or not dot:
            raise ValueError(f"{key!r} is no TAESD decoder key")
        renamed[f"layers.{int(index) - 1}.{rest}"] = value
    return renamed


def keeping_estimates(scheduler):
    """The scheduler, made to keep each step's estimate of the finished latents for denoised_estimate (its step's
    pred_original_sample, which the pipeline itself drops)."""
    step = scheduler.step

    @functools.wraps(step)  # the pipeline reads the step's signature to know what it takes
    def step_keeping_the_estimate(*args, **kwargs):
        out = step(*args, **kwargs)
        scheduler.denoised_estimate = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(
            out, "pred_original_sample", None)
        return out

    scheduler.step = step_keeping_the_estimate
    return scheduler


def denoised_estimate(scheduler) -> torch.Tensor | None:
    """The last step's estimate of the finished latents, where the scheduler has one: kept by keeping_estimates, or
    the last model output of a multistep solver that converts them into such estimates (DPM++, UniPC)."""
    estimate = getattr(scheduler, "denoised_estimate", None)
    if estimate is not None:
        return estimate
    config = scheduler.config
    predicts_x0 = config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++") or config.get("predict_x0")
    outputs = getattr(scheduler, "model_outputs", None)
    return outputs[-1] if predicts_x0 and outputs else None
