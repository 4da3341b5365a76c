"""A1111's Soft inpainting (its built-in "Soft Inpainting" script, 1.8+): the blurred mask read as how strongly each
pixel is drawn again, instead of rounded to draw / keep.

- While denoising, after every step the latents are a blend of the picture's (noised to where the run stands) and the
  run's, by a weight that follows the mask and the noise level: mask ** (sigma ** schedule_bias x
  preservation_strength). A mask of 1 is all the run's, 0 all the picture's; between, the picture weighs more while
  the noise is high. The blend keeps the vectors' lengths (per latent pixel, across channels) near the longer of the
  two, more so the higher the transition contrast boost, so half-blended parts do not fade.
- No final hard blend: the last step's blend is the result.
- At the end, the picture's own pixels are laid over the result where the latents changed little: a mask from the
  difference between the run's last latents and the picture's, smoothed, against the difference threshold (biased by
  the mask as far as mask influence says), sharpened by the difference contrast.

The defaults, ranges and infotext keys are A1111's (SOFT_INPAINTING_KEYS). The run blends the noisy latents after
each step, where A1111 blends the model's denoised estimate inside each model call: the same weights, at the same
noise levels, fitted to how this project's inpainting puts its kept part back (generate.py's _MaskedStart).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

# The request fields, A1111's defaults and slider ranges, in A1111's order (its args and infotext keys).
SOFT_INPAINTING_FIELDS = ("soft_inpainting_schedule_bias", "soft_inpainting_preservation_strength",
                          "soft_inpainting_transition_contrast_boost", "soft_inpainting_mask_influence",
                          "soft_inpainting_difference_threshold", "soft_inpainting_difference_contrast")
DEFAULTS = (1.0, 0.5, 4.0, 0.0, 0.5, 2.0)
RANGES = ((0.0, 8.0), (0.0, 8.0), (1.0, 32.0), (0.0, 1.0), (0.0, 8.0), (0.0, 8.0))
STEPS = (0.1, 0.05, 0.5, 0.05, 0.25, 0.25)  # A1111's sliders'
LABELS = ("Schedule bias", "Preservation strength", "Transition contrast boost", "Mask influence",
          "Difference threshold", "Difference contrast")
ENABLED_KEY = "Soft inpainting enabled"
SOFT_INPAINTING_KEYS = tuple(f"Soft inpainting {label.lower()}" for label in LABELS)

_KERNEL_RADIUS, _KERNEL_STDDEV = 2, 1.5  # the difference map's smoothing neighbourhood (5x5), as A1111's
_SEAM_BLUR = 4  # pixels: the pixel mask's Gaussian blur, against the latent grid's blocks


@dataclass(frozen=True)
class SoftInpainting:
    schedule_bias: float = DEFAULTS[0]
    preservation_strength: float = DEFAULTS[1]
    transition_contrast_boost: float = DEFAULTS[2]
    mask_influence: float = DEFAULTS[3]
    difference_threshold: float = DEFAULTS[4]
    difference_contrast: float = DEFAULTS[5]

    @classmethod
    def of(cls, request) -> "SoftInpainting | None":
        """The request's settings where it inpaints with soft inpainting on; None otherwise."""
        if not (request.soft_inpainting and request.is_inpainting):
            return None
        return cls(*(getattr(request, name) for name in SOFT_INPAINTING_FIELDS))

    def step_weight(self, drawn: torch.Tensor, sigma: float) -> torch.Tensor:
        """How much of the run's latents a step keeps at each latent pixel (the rest is the picture's), for the mask
        `drawn` (1: drawn again) at noise level `sigma`. 0 ** 0 is 1: with no preservation, all the run's."""
        return torch.pow(drawn, sigma ** self.schedule_bias * self.preservation_strength)

    def blend(self, picture: torch.Tensor, run: torch.Tensor, drawn: torch.Tensor, sigma: float) -> torch.Tensor:
        """The latents a step goes on with: the picture's and the run's blended by step_weight."""
        return blend_latents(picture, run, self.step_weight(drawn, sigma), self.transition_contrast_boost)

    def pixel_masks(self, picture: torch.Tensor, final: torch.Tensor, drawn: torch.Tensor,
                    size: tuple[int, int]) -> list[Image.Image]:
        """One "L" mask per image, at `size` (pixels, width x height): how much of the run's picture shows at each
        pixel, by how far its last latents (`final`) moved from the picture's; `drawn` is the latent mask."""
        distances = torch.linalg.vector_norm((final - picture).double(), dim=1).cpu().numpy()
        scale = _threshold_scale(drawn[:, 0].double().cpu().numpy(), self.preservation_strength, self.mask_influence)
        masks = []
        for index, distance in enumerate(distances):
            distance = weighted_percentile_filter(distance, 0.9, 1.0)  # a difference spreads to its neighbours
            distance = weighted_percentile_filter(distance, 0.25, 0.75)  # then speckles are smoothed away
            half = self.difference_threshold * scale[min(index, len(scale) - 1)]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(half > 0, distance / half, np.inf)  # no threshold: no difference is small
            picture_share = smootherstep(1 / (1 + ratio ** self.difference_contrast))
            shown = ((1 - picture_share) * 255).astype(np.uint8)
            mask = Image.fromarray(shown, "L").resize(size, Image.Resampling.LANCZOS)
            masks.append(mask.filter(ImageFilter.GaussianBlur(_SEAM_BLUR)))
        return masks


def blend_latents(picture: torch.Tensor, run: torch.Tensor, weight: torch.Tensor, boost: float) -> torch.Tensor:
    """Linear interpolation from `picture` to `run` by `weight` (per latent pixel), each result vector (across the
    channels) then scaled to the power mean, of power `boost`, of the two vectors' lengths: at 1 the plain mean of the
    lengths; higher, nearer the longer one, which keeps contrast where two different vectors partly cancel out."""
    wide = torch.float32 if run.device.type == "mps" else torch.float64  # large powers of lengths need the range
    mixed = picture * (1 - weight) + run * weight
    length = torch.linalg.vector_norm(mixed, dim=1, keepdim=True).to(wide) + 1e-5
    share = weight[:, :1].to(wide)
    lengths = [torch.linalg.vector_norm(latents, dim=1, keepdim=True).to(wide) ** boost for latents in (picture, run)]
    wanted = (lengths[0] * (1 - share) + lengths[1] * share) ** (1 / boost)
    return mixed * (wanted / length).to(mixed.dtype)


def sigma_of(scheduler, timestep) -> float:
    """The noise level (k-diffusion's sigma, sqrt((1 - alpha_bar) / alpha_bar)) of a scheduler's timestep, which may
    lie between two whole timesteps (Karras schedules): log sigma interpolated, as k-diffusion does."""
    alphas = scheduler.alphas_cumprod.double().cpu().numpy()
    log_sigmas = 0.5 * np.log((1 - alphas) / alphas)
    position = float(timestep)
    return math.exp(float(np.interp(position, np.arange(len(log_sigmas)), log_sigmas)))


def _threshold_scale(drawn: np.ndarray, strength: float, influence: float) -> np.ndarray:
    """How far the difference threshold stretches at each latent pixel: 1 with no mask influence (the threshold as
    set); with it, larger where the mask keeps the picture (its pixels stay through larger changes), 0 where fully
    drawn (the run's pixels always show)."""
    kept = 1 - np.clip(drawn, 0, 1) ** (strength / 2)
    kept = 0.5 * (1 - influence) + kept * influence
    return kept / (1.00001 - kept)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """Perlin's smootherstep on [0, 1]: flat at both ends."""
    return x * x * x * (x * (6 * x - 15) + 10)


def gaussian_kernel(radius: int = _KERNEL_RADIUS, stddev: float = _KERNEL_STDDEV) -> np.ndarray:
    """A (2r+1)^2 kernel, exp(-d^2 / stddev^2), 1 at the middle, tapered to reach 0 one pixel past the radius."""
    at_zero = math.exp(-((radius + 1) ** 2) / stddev ** 2)
    offsets = np.arange(-radius, radius + 1)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return np.maximum(0.0, (np.exp(-squared / stddev ** 2) - at_zero) / (1 - at_zero))


def weighted_percentile_filter(values: np.ndarray, low: float, high: float, min_width: float = 1.0,
                               kernel: np.ndarray | None = None) -> np.ndarray:
    """Each pixel replaced by the weighted mean of its neighbourhood's values between the `low` and `high` fractions
    of their weight, sorted by value (0.9-1: near the largest; 0.25-0.75: about the median); the neighbours weighted
    by `kernel` (gaussian_kernel's), those past the edge left out. The band is at least `min_width` of weight wide.
    A1111's weighted histogram filter, for whole arrays at once."""
    kernel = gaussian_kernel() if kernel is None else kernel
    radius = kernel.shape[0] // 2
    height, width = values.shape
    padded = np.pad(values.astype(np.float64), radius)
    inside = np.pad(np.ones_like(values, dtype=np.float64), radius)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape).reshape(height, width, -1)
    weights = (np.lib.stride_tricks.sliding_window_view(inside, kernel.shape) * kernel).reshape(height, width, -1)
    order = np.argsort(np.where(weights > 0, windows, np.inf), axis=-1, kind="stable")
    windows = np.take_along_axis(windows, order, -1)
    weights = np.take_along_axis(weights, order, -1)
    tops = np.cumsum(weights, axis=-1)
    bottoms = tops - weights
    total = tops[..., -1:]
    start, end = total * low, total * high
    narrow = (end - start) < min_width
    middle = (start + end) / 2
    start = np.where(narrow, middle - min_width / 2, start)
    end = np.where(narrow, middle + min_width / 2, end)
    over = narrow & (end > total)  # a band pushed past the top or bottom moves back inside, keeping its width
    start, end = np.where(over, total - min_width, start), np.where(over, total, end)
    under = narrow & (start < 0)
    start, end = np.where(under, 0, start), np.where(under, min_width, end)
    overlap = np.clip(np.minimum(end, tops) - np.maximum(start, bottoms), 0, None)
    weight = overlap.sum(-1)
    summed = (windows * overlap).sum(-1)
    return np.where(weight > 0, summed / np.where(weight > 0, weight, 1), 0.0).astype(values.dtype)
