"""img2img's preparation of the picture to start from: its fingerprint, the run's size, and the fit to it; and
the strength that makes diffusers' img2img pipeline run the steps A1111 runs (pipeline_strength).

Image work (PIL only), done by the worker at submit, so the job holds a picture of the run's size and the
engine only encodes it. The three resize modes are A1111's, by its numbers: 0 just resize (stretch),
1 crop and resize (fill the size, cut the overflow), 2 resize and fill (fit inside, stretch the edges
outwards into the bars).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable

from PIL import Image, ImageOps

from webui.schemas import LATENT_RESIZE, MAX_SIZE, MIN_SIZE

RESAMPLE = Image.Resampling.LANCZOS
ORIENTATION = 0x0112  # the EXIF tag
# Larger pictures are refused before their pixels are read: a 2 MB PNG can hold 144 megapixels (2.4 GB in memory),
# and every run is at most 2048 wide anyway.
MAX_PICTURE_PIXELS = 4096 * 4096


def check_picture_size(width: int, height: int) -> None:
    """ValueError saying what to send when a picture is too large to read."""
    if width * height > MAX_PICTURE_PIXELS:
        raise ValueError(f"the picture is {width}x{height} ({width * height / 1e6:.0f} megapixels); send one of at "
                         f"most {MAX_PICTURE_PIXELS / 1e6:.1f} megapixels (4096x4096), scaled down")


def upright(image: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says; as it is where its EXIF cannot be read (a damaged block:
    the pixels still can be)."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, OSError, ValueError):  # PIL reports a damaged EXIF block as a SyntaxError
        return image


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(ORIENTATION)
    except (SyntaxError, OSError, ValueError):
        return None


def as_rgb(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """The picture as RGB, a transparent part on `background` (white, as a browser shows it), turned as its EXIF
    says; a 16-bit grey one scaled to 8 bits (PIL's convert would clip it to white)."""
    image = upright(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
        if image.getextrema()[1] > 255:
            image = image.point(lambda value: value / 256)
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        behind = Image.new("RGBA", image.size, background)
        return Image.alpha_composite(behind, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def image_sha1(image: Image.Image) -> str:
    """The fingerprint the request records for its init image: the same picture, the same hash, whatever file
    it came in."""
    digest = hashlib.sha1(f"{image.mode} {image.width}x{image.height} ".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def size_from_image(image: Image.Image, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The run's size: the width and height given; where one is given, the other in the picture's shape; where
    none is, the picture's own size (scaled down to fit the size limits). Multiples of 8, within the limits."""
    if width and height:
        return width, height
    own_width, own_height = upright_size(image)
    if width:
        return width, _side(width * own_height / own_width)
    if height:
        return _side(height * own_width / own_height), height
    scale = min(1.0, MAX_SIZE / max(own_width, own_height))
    return _side(own_width * scale), _side(own_height * scale)


def scaled_size(image: Image.Image, scale: float) -> tuple[int, int]:
    """A1111's "Resize by": the picture's size times `scale`, rounded down to multiples of 8; ValueError saying
    which scales fit when that leaves the size limits."""
    own_width, own_height = upright_size(image)
    width, height = int(own_width * scale) // 8 * 8, int(own_height * scale) // 8 * 8
    if min(width, height) < MIN_SIZE or max(width, height) > MAX_SIZE:
        # Two decimals, rounded inwards: the scales named must fit.
        lowest = math.ceil(MIN_SIZE / min(own_width, own_height) * 100) / 100
        highest = math.floor((MAX_SIZE + 7) / max(own_width, own_height) * 100) / 100
        fits = (f"pick a scale from {lowest:g} to {highest:g}" if lowest <= highest
                else "this picture's shape fits no scale: use Resize to")
        raise ValueError(f"Resize by {scale:g}: the {own_width}x{own_height} picture would be {width}x{height}, and "
                         f"sides run from {MIN_SIZE} to {MAX_SIZE}; {fits}")
    return width, height


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The picture's size as it is shown: an EXIF orientation of 5 to 8 turns it a quarter (as_rgb turns it)."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def _side(length: float) -> int:
    """A side of the run: rounded down to a multiple of 8, within the size limits."""
    return min(MAX_SIZE, max(MIN_SIZE, int(length) // 8 * 8))


Enlarge = Callable[[Image.Image, tuple[int, int]], Image.Image]  # a picture upscaler: (picture, size) -> picture


def fit_image(image: Image.Image, width: int, height: int, resize_mode: int,
              resample: Image.Resampling = RESAMPLE, enlarge: Enlarge | None = None) -> Image.Image:
    """The picture at width x height, fitted by the resize mode (a mask with a gentler resampling than a picture's,
    whose ringing would spread it). The latent resize keeps the picture's own size (within the size limits): the
    engine stretches its latents to the run's size. `enlarge`: A1111's Upscaler for img2img, which takes the picture
    to the size the mode scales it to where that is larger; resampling then fits it exactly."""
    if resize_mode == LATENT_RESIZE:
        own = size_from_image(image)
        return image if image.size == own else image.resize(own, resample)
    if enlarge is not None and enlarges(image.size, width, height, resize_mode):
        image = enlarge(image, fitted_scale_size(image.size, width, height, resize_mode))
    if resize_mode == 0 or image.size == (width, height):
        return image.resize((width, height), resample)
    if resize_mode == 1:
        return ImageOps.fit(image, (width, height), resample)
    if resize_mode == 2:
        return _resize_and_fill(image, width, height, resample)
    raise ValueError(f"unknown resize mode {resize_mode}")


def fitted_scale_size(size: tuple[int, int], width: int, height: int, resize_mode: int) -> tuple[int, int]:
    """The size a resize mode scales a picture of `size` to before it is cut or filled to width x height: that size
    itself (Just resize), the smallest cover of it (Crop and resize), the largest fit inside (Resize and fill)."""
    if resize_mode == 0:
        return width, height
    scale = (max if resize_mode == 1 else min)(width / size[0], height / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def enlarges(size: tuple[int, int], width: int, height: int, resize_mode: int) -> bool:
    """Whether the resize mode scales a picture of `size` up on its way to width x height (A1111's scale > 1, where its
    Upscaler for img2img runs)."""
    scaled = fitted_scale_size(size, width, height, resize_mode)
    return scaled[0] > size[0] or scaled[1] > size[1]


def pipeline_strength(steps_run: int, schedule: int) -> float:
    """The strength that makes diffusers' img2img pipeline run the last `steps_run` of `schedule` steps: it runs
    int(schedule x strength) of them; half a step more keeps float rounding from taking one away."""
    return min(1.0, (steps_run + 0.5) / schedule)


def _resize_and_fill(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """Fit inside, then fill the bars with the picture's edge rows (or columns) stretched across them."""
    scale = min(width / image.width, height / image.height)
    inner = image.resize((max(1, min(width, round(image.width * scale))),
                          max(1, min(height, round(image.height * scale)))), resample)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - inner.width) // 2, (height - inner.height) // 2
    right, bottom = left + inner.width, top + inner.height
    canvas.paste(inner, (left, top))
    w, h = inner.size
    bars = (((0, 0, w, 1), (w, top), (left, 0)), ((0, h - 1, w, h), (w, height - bottom), (left, bottom)),
            ((0, 0, 1, h), (left, h), (0, top)), ((w - 1, 0, w, h), (width - right, h), (right, top)))
    for edge, size, where in bars:
        if size[0] > 0 and size[1] > 0:
            canvas.paste(inner.crop(edge).resize(size), where)
    return canvas
