"""A1111's "SD upscale" img2img script: the picture is enlarged with an upscaler, cut into overlapping tiles of
the run's size, each tile is drawn again by img2img, and the tiles are joined back into one picture. Pure: the
worker runs the tiles (webui/worker.py), so one job holds the whole upscale, its progress and its history row.

As in A1111, the tiles are the run's width x height, spread evenly so they cover the picture and overlap by at
least the overlap asked for, and the upscaled size is the picture's times the factor, rounded down to a multiple
of 8 as A1111's upscalers round it. Unlike A1111,
which pastes each tile over the last with a ramp as wide as the overlap setting, the joins here fade across the
whole part two tiles share, so no seam is left where tiles overlap by more than the setting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

# (schemas imports this module: nothing here may import schemas)
from webui.engine.hires import NO_UPSCALER, PICTURE_UPSCALERS as UPSCALERS

# UPSCALERS: SD upscale's choices, which schemas and the API read from here
__all__ = ["DEFAULT_UPSCALER", "MAX_OVERLAP", "MAX_SCALE", "MIN_SCALE", "UPSCALERS", "TileLayout", "enlarge",
           "tile_layout", "tile_starts", "upscaled_size"]

DEFAULT_UPSCALER = "Lanczos"  # not A1111's "None", which leaves the size: a filter needs no file
MAX_OVERLAP = 256  # A1111's slider
MIN_SCALE, MAX_SCALE = 1.0, 4.0  # A1111's slider
MAX_TILES = 256  # of one upscale: a 4096x4096 picture in 512x512 tiles is 100
MAX_PIXELS = 4096 * 4096  # of the upscaled picture, held with its tiles' sums while they are joined


def upscaled_size(size: tuple[int, int], scale: float, upscaler: str) -> tuple[int, int]:
    """The picture's size after the upscaler (as A1111's: rounded down to a multiple of 8); the same size with no
    upscaler."""
    if upscaler == NO_UPSCALER:
        return size
    return int(size[0] * scale) // 8 * 8, int(size[1] * scale) // 8 * 8


def enlarge(picture: Image.Image, scale: float, upscaler: str,
            resize: Callable[[Image.Image, tuple[int, int], str], Image.Image]) -> Image.Image:
    """The RGB picture enlarged by `scale` with the upscaler (as it is with "None"); `resize(picture, size, name)`
    runs the upscaler (a filter, or a model upscaler)."""
    size = upscaled_size(picture.size, scale, upscaler)
    return picture if size == picture.size else resize(picture, size, upscaler)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start: as few as cover `length` with neighbours sharing at least `overlap`
    pixels, spread evenly, the last ending at the edge."""
    count = max(1, math.ceil((length - overlap) / (tile - overlap)))
    if count == 1:
        return [0]
    return [i * (length - tile) // (count - 1) for i in range(count)]


@dataclass(frozen=True)
class TileLayout:
    """The tiles of one upscaled picture, row by row: each tile's top-left corner, all of one size."""
    size: tuple[int, int]  # the upscaled picture's
    tile: tuple[int, int]
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def corners(self) -> list[tuple[int, int]]:
        return [(x, y) for y in self.ys for x in self.xs]

    def cut(self, picture: Image.Image) -> list[Image.Image]:
        """The upscaled picture's tiles, in the order of `corners`."""
        width, height = self.tile
        return [picture.crop((x, y, x + width, y + height)) for x, y in self.corners]

    def join(self, tiles: list[Image.Image]) -> Image.Image:
        """The tiles (drawn again, in the order of `corners`) as one picture. Where tiles share pixels, each
        weighs less towards its edge, across all of the shared part, so one fades into the next."""
        columns = [_ramp(self.xs, self.tile[0], i) for i in range(len(self.xs))]
        rows = [_ramp(self.ys, self.tile[1], j) for j in range(len(self.ys))]
        total = np.zeros((self.size[1], self.size[0], 3), np.float32)
        weights = np.zeros((self.size[1], self.size[0], 1), np.float32)
        for index, tile in enumerate(tiles):
            j, i = divmod(index, len(self.xs))
            x, y = self.xs[i], self.ys[j]
            weight = (rows[j][:, None] * columns[i][None, :])[..., None]
            total[y:y + self.tile[1], x:x + self.tile[0]] += np.asarray(tile.convert("RGB"), np.float32) * weight
            weights[y:y + self.tile[1], x:x + self.tile[0]] += weight
        return Image.fromarray(np.rint(total / weights).clip(0, 255).astype(np.uint8))


def _ramp(starts: tuple[int, ...], tile: int, index: int) -> np.ndarray:
    """One tile's weights along a side: 1, falling towards each edge it shares with a neighbour, across the
    shared part (never to 0, so every pixel has weight)."""
    weight = np.ones(tile, np.float32)
    if index > 0:
        shared = starts[index - 1] + tile - starts[index]
        if shared > 0:
            weight[:shared] = np.minimum(weight[:shared], (np.arange(shared) + 0.5) / shared)
    if index < len(starts) - 1:
        shared = starts[index] + tile - starts[index + 1]
        if shared > 0:
            weight[tile - shared:] = np.minimum(weight[tile - shared:], (np.arange(shared)[::-1] + 0.5) / shared)
    return weight


def tile_layout(picture_size: tuple[int, int], tile: tuple[int, int], overlap: int, scale: float,
                upscaler: str) -> TileLayout:
    """The tiles for upscaling a picture of `picture_size`; ValueError saying what to change. (The upscaler's name
    is checked against the server's upscalers when the job is queued.)"""
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"SD upscale: Scale Factor {scale:g}; use {MIN_SCALE:g} to {MAX_SCALE:g}")
    if not 0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"SD upscale: Tile overlap {overlap}; use 0 to {MAX_OVERLAP}")
    width, height = upscaled_size(picture_size, scale, upscaler)
    if overlap >= min(tile):
        raise ValueError(f"SD upscale: the Tile overlap ({overlap}) must be smaller than the tile ({tile[0]}x"
                         f"{tile[1]}, the Width and Height): lower the overlap or raise the size")
    if width < tile[0] or height < tile[1]:
        raise ValueError(f"SD upscale: the upscaled picture ({width}x{height}) is smaller than a tile ({tile[0]}x"
                         f"{tile[1]}, the Width and Height): lower the Width and Height (or Resize by) or raise the "
                         "Scale Factor")
    if width * height > MAX_PIXELS:
        raise ValueError(f"SD upscale: the upscaled picture would be {width}x{height}; at most "
                         f"{MAX_PIXELS / 1e6:.1f} megapixels (4096x4096): lower the Scale Factor")
    layout = TileLayout((width, height), tile, tuple(tile_starts(width, tile[0], overlap)),
                        tuple(tile_starts(height, tile[1], overlap)))
    if len(layout.corners) > MAX_TILES:
        raise ValueError(f"SD upscale: {len(layout.xs)}x{len(layout.ys)} tiles; at most {MAX_TILES} can be drawn "
                         "in one upscale: raise the Width and Height (the tile), lower the Tile overlap or lower the "
                         "Scale Factor")
    return layout
