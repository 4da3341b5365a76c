"""The Canny edge detector, in numpy: the "canny" preprocessor of ControlNet (sd-webui-controlnet runs OpenCV's).

Written here rather than adding OpenCV (a large binary wheel) for one function. Steps as Canny's: a small Gaussian
blur, Sobel gradients (their L1 magnitude, as OpenCV's default, on the colour channel with the strongest gradient
at each pixel), non-maximum suppression along the gradient's direction, then hysteresis: pixels above `high` are
edges, and pixels above `low` that touch an edge join it. OpenCV runs no blur; the 3x3 binomial one here (it
lowers a sharp step's gradient by a quarter) keeps single-pixel noise out of the map.
"""
from __future__ import annotations

import numpy as np

_TAN_22_5 = np.tan(np.pi / 8)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def canny(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges of an (H, W) or (H, W, C) uint8 picture: an (H, W) uint8 map, 255 on the edges, 0 elsewhere."""
    image = pixels.astype(np.float32)
    if image.ndim == 2:
        image = image[..., None]
    gx, gy = _sobel(_blur(image))
    magnitude = np.abs(gx) + np.abs(gy)
    strongest = magnitude.argmax(axis=2)[..., None]  # per pixel, the channel with the largest gradient
    gx, gy, magnitude = (np.take_along_axis(a, strongest, axis=2)[..., 0] for a in (gx, gy, magnitude))
    thin = _suppress_non_maxima(magnitude, gx, gy)
    return _hysteresis(thin, low, high)


def _blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")  # OpenCV's Canny replicates the border too
    smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]  # [1 2 1] down the columns
    smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [1 2 1] along the rows
    gx = smooth_rows[:, 2:] - smooth_rows[:, :-2]
    gy = smooth_cols[2:] - smooth_cols[:-2]
    return gx, gy


def _suppress_non_maxima(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The magnitude where it is a maximum across the edge (the gradient's direction, in 4 sectors), else 0. As
    OpenCV, one side compares strictly and the other not, so a two-pixel ridge keeps one pixel."""
    p = np.pad(magnitude, 1)
    height, width = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= _TAN_22_5 * ax  # the gradient runs along the row: compare left and right
    vertical = ax <= _TAN_22_5 * ay
    falling = gx * gy > 0  # down-right (y grows downwards)
    sectors = [(horizontal, (0, -1), (0, 1)), (vertical & ~horizontal, (-1, 0), (1, 0)),
               (~horizontal & ~vertical & falling, (-1, -1), (1, 1)),
               (~horizontal & ~vertical & ~falling, (-1, 1), (1, -1))]
    keep = np.zeros_like(magnitude, dtype=bool)
    for sector, before, after in sectors:
        keep |= sector & (magnitude > shifted(*before)) & (magnitude >= shifted(*after))
    return np.where(keep, magnitude, 0)


def _hysteresis(magnitude: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges: pixels above `high`, and those above `low` joined to them through 8-neighbours. Grown a ring at a time
    from the newest edge pixels (whole-array steps: a per-pixel search in Python took seconds on a busy picture)."""
    low, high = min(low, high), max(low, high)  # as OpenCV, which swaps them
    edges = magnitude > high
    waiting = (magnitude > low) & ~edges
    newest = edges
    while newest.any() and waiting.any():
        newest = _grow(newest) & waiting
        edges |= newest
        waiting &= ~newest
    return edges.astype(np.uint8) * 255


def _grow(mask: np.ndarray) -> np.ndarray:
    """The pixels 8-next to `mask`, and its own."""
    p = np.pad(mask, 1)
    height, width = mask.shape
    grown = mask.copy()
    for dy, dx in _NEIGHBOURS:
        grown |= p[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    return grown
