"""A1111's img2img colour correction: a result's colours brought back to those of the picture it started from, so
that runs fed their own output (Loopback) do not drift towards one cast, while the result keeps its own lightness.

As A1111: each of the CIELAB channels of the result takes the reference's distribution (histogram matching), and
the matched picture then gets the result's luminosity back (the "Luminosity" blend of image editors).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageCms

_SRGB = ImageCms.createProfile("sRGB")
_LAB = ImageCms.createProfile("LAB")
_TO_LAB = ImageCms.buildTransform(_SRGB, _LAB, "RGB", "LAB")
_FROM_LAB = ImageCms.buildTransform(_LAB, _SRGB, "LAB", "RGB")
_LUMA = np.array([0.3, 0.59, 0.11])  # the blend mode's luminosity weights (W3C compositing)


def match_histogram(channel: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`channel`'s values mapped so that their distribution is `reference`'s: each value goes to the reference value
    at the same quantile."""
    values, positions, counts = np.unique(channel.ravel(), return_inverse=True, return_counts=True)
    reference_values, reference_counts = np.unique(reference.ravel(), return_counts=True)
    quantiles = np.cumsum(counts) / channel.size
    reference_quantiles = np.cumsum(reference_counts) / reference.size
    return np.interp(quantiles, reference_quantiles, reference_values)[positions].reshape(channel.shape)


def with_luminosity(colours: np.ndarray, luminosity: np.ndarray) -> np.ndarray:
    """RGB `colours` (floats 0..255) at the luminosity of `luminosity`'s pixels, hue and saturation kept; colours the
    shift pushes out of range are pulled back towards their grey, as the blend mode does."""
    shifted = colours + ((luminosity @ _LUMA) - (colours @ _LUMA))[..., None]
    grey = (shifted @ _LUMA)[..., None]
    low, high = shifted.min(axis=-1, keepdims=True), shifted.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = np.where(low < 0, grey + (shifted - grey) * grey / (grey - low), shifted)
        shifted = np.where(high > 255, grey + (shifted - grey) * (255 - grey) / (high - grey), shifted)
    return np.clip(np.nan_to_num(shifted), 0, 255)


def _to_lab(picture: Image.Image) -> np.ndarray:
    """CIELAB as numbers: L 0..255, a and b -128..127 (PIL stores those two as signed bytes)."""
    raw = np.asarray(ImageCms.applyTransform(picture.convert("RGB"), _TO_LAB))
    return np.concatenate([raw[..., :1].astype(np.int16), raw[..., 1:].view(np.int8).astype(np.int16)], axis=-1)


def _from_lab(lab: np.ndarray) -> Image.Image:
    lab = np.round(lab)
    raw = np.concatenate([np.clip(lab[..., :1], 0, 255).astype(np.uint8),
                          np.clip(lab[..., 1:], -128, 127).astype(np.int8).view(np.uint8)], axis=-1)
    return ImageCms.applyTransform(Image.fromarray(raw, "LAB"), _FROM_LAB)


def match_colors(picture: Image.Image, reference: Image.Image) -> Image.Image:
    """The RGB `picture` with `reference`'s colours, keeping its own luminosity."""
    lab, reference_lab = _to_lab(picture), _to_lab(reference)
    recoloured = _from_lab(np.stack([match_histogram(lab[..., i], reference_lab[..., i]) for i in range(3)], axis=-1))
    blended = with_luminosity(np.asarray(recoloured, dtype=np.float64), np.asarray(picture.convert("RGB"), np.float64))
    return Image.fromarray(np.round(blended).astype(np.uint8), "RGB")
