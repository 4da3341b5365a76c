"""Inpainting's preparation: which part of the picture is drawn again, what the run starts from there, and how
the new picture is laid back into the old (Inpainting.compose).

It works with any model, as A1111's does: the mask (white = draw again) is blurred; the run is img2img, and
after every step the latents outside the mask are put back to the picture's, noised to where the run stands;
at the end the picture's own pixels are laid over the result outside the mask, through the blurred edge.
"Only masked" runs on the mask's surroundings alone, at the run's size (more detail for a small part), and
pastes the result back into the whole picture.

Image work, done by the worker at submit; the engine uses latent_keep and compose. A model made for inpainting
also reads the mask itself: inpainting_model.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from webui.engine.img2img import RESAMPLE, Enlarge, as_rgb, fit_image, size_from_image, upright
from webui.schemas import MASKED_CONTENT, GenerationRequest

# "Only masked" with no size given: the part is drawn this large on its longer side (SD 1.x's own size).
ONLY_MASKED_SIDE = 512
MASK_RESAMPLE = Image.Resampling.BILINEAR  # Lanczos' ringing would spread the mask's edge


@dataclass
class Inpainting:
    """What the engine needs besides the start picture: where to draw, and how to lay the result in."""

    mask: Image.Image  # "L", the run's size: how much each pixel is drawn again (blurred edge); the latent mask's source
    fill: int  # what the masked part starts from (MASKED_CONTENT's index)
    original: Image.Image  # RGB: the picture the result is laid into (the whole picture for "Only masked")
    overlay: Image.Image  # "L", original's size: how much of the new picture shows at each pixel
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of original that the run drew
    # A1111's Overlay original for inpaint: off, the part drawn shows as the run drew it, unmasked
    overlaid: bool = True

    def latent_keep(self, size: tuple[int, int], rounded: bool = True) -> torch.Tensor:
        """1 where the run keeps the picture, 0 where it draws, at the latents' (height, width): the blurred
        mask shrunk and rounded, as A1111's latent mask (unrounded: its shades kept, for soft inpainting)."""
        height, width = size
        small = np.asarray(self.mask.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        return torch.from_numpy(1 - (np.round(small) if rounded else small))[None, None]

    def compose(self, drawn: Image.Image, overlay: Image.Image | None = None) -> Image.Image:
        """The run's picture laid into the original, showing through the overlay, or through `overlay` ("L", the
        run's size: soft inpainting's, for this picture) within the part drawn; not overlaid (and without soft
        inpainting's, which A1111 lays in whatever the setting), the part drawn whole."""
        left, top, right, bottom = self.box
        size = (right - left, bottom - top)
        placed = drawn if drawn.size == size else ImageOps.fit(drawn, size, RESAMPLE)
        if overlay is None and not self.overlaid:
            overlay = Image.new("L", size, 255)
        elif overlay is None:
            overlay = self.overlay.crop(self.box)
        elif overlay.size != size:
            overlay = ImageOps.fit(overlay, size, RESAMPLE)
        result = self.original.copy()
        result.paste(placed, (left, top), overlay)
        return result


def read_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask picture -> "L", white where to draw, at `size` (the picture's): a picture with transparency is
    read by its alpha (a painted layer), any other by its brightness; rounded to black and white at half."""
    mask = upright(mask)
    grey = None
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):  # not opaque all over: the paint is where it is opaque
            grey = alpha
    if grey is None:  # read as a picture is (16-bit greys scaled, not clipped to white)
        grey = as_rgb(mask).convert("L")
    grey = grey.point(lambda value: 255 if value >= 128 else 0)
    return grey if grey.size == size else grey.resize(size, Image.Resampling.NEAREST)


def prepare_inpainting(picture: Image.Image, mask: Image.Image, request: GenerationRequest,
                       enlarge: Enlarge | None = None) -> tuple[int, int, Image.Image, Inpainting]:
    """The run's width and height, the picture it starts from and the Inpainting, for an RGB picture and its
    mask ("L" at its size, read_mask's) and a request's inpainting fields. ValueError when nothing is to be drawn.
    `enlarge`: the Upscaler for img2img, where the picture (or the part drawn) is enlarged."""
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    if mask.getbbox() is None:
        raise ValueError("the mask is empty, so nothing would be drawn: paint over the part to draw again (or pick "
                         "Inpaint masked, if the mask covers all of it), or use img2img without a mask")
    if request.inpaint_full_res:
        return _only_masked(picture, mask, request, enlarge)
    width, height = size_from_image(picture, request.width, request.height)
    start = fit_image(picture, width, height, request.resize_mode, enlarge=enlarge)
    run_mask = fit_image(mask, width, height, request.resize_mode, MASK_RESAMPLE)
    # Doubled, as A1111's: the new picture shows fully from half-way into the blurred edge.
    overlay = run_mask.point(lambda value: min(255, value * 2))
    inpainting = Inpainting(run_mask, request.inpainting_fill, start, overlay, (0, 0, width, height),
                            request.overlay_inpaint is not False)
    return width, height, _with_fill(start, run_mask, request.inpainting_fill), inpainting


def _only_masked(picture: Image.Image, mask: Image.Image, request: GenerationRequest,
                 enlarge: Enlarge | None = None) -> tuple[int, int, Image.Image, Inpainting]:
    left, top, right, bottom = mask.getbbox()
    pad = request.inpaint_full_res_padding
    box = (max(0, left - pad), max(0, top - pad), min(mask.width, right + pad), min(mask.height, bottom + pad))
    width, height = _only_masked_size(box, request.width, request.height)
    box = expand_to_shape(box, width, height, mask.size)
    # The part is filled from the colours it holds around the mask, as A1111's; one the mask covers whole (no padding,
    # no blur) holds none, and is cut from the picture filled whole instead (at the picture's scale: A1111 paints
    # such a part black)
    covered_whole = mask.crop(box).getextrema()[0] == 255
    source = _with_fill(picture, mask, request.inpainting_fill) if covered_whole else picture
    start = fit_image(source.crop(box), width, height, 2, enlarge=enlarge)
    run_mask = fit_image(mask.crop(box), width, height, 2, MASK_RESAMPLE)
    inpainting = Inpainting(run_mask, request.inpainting_fill, picture, mask, box, request.overlay_inpaint is not False)
    return width, height, start if covered_whole else _with_fill(start, run_mask, request.inpainting_fill), inpainting


def _only_masked_size(box: tuple[int, int, int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The run's size for "Only masked": the width and height given, else the part's shape at ONLY_MASKED_SIDE."""
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    scale = ONLY_MASKED_SIDE / max(box_width, box_height)
    return size_from_image(Image.new("L", (round(box_width * scale), round(box_height * scale))), width, height)


def expand_to_shape(box: tuple[int, int, int, int], width: int, height: int,
                    bounds: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box grown, about its middle, to the shape of width x height, and moved back inside bounds (the
    picture's size) where it juts out; cut at the picture where it cannot fit."""
    left, top, right, bottom = box
    box_width, box_height = right - left, bottom - top
    if box_width * height < box_height * width:  # too narrow: widen
        left, right = _grow(left, right, round(box_height * width / height), bounds[0])
    else:  # too flat: heighten
        top, bottom = _grow(top, bottom, round(box_width * height / width), bounds[1])
    return left, top, right, bottom


def _grow(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """[start, end) grown about its middle to `length`, moved inside [0, limit), cut to it if longer."""
    length = min(length, limit)
    start = max(0, min(start - (length - (end - start)) // 2, limit - length))
    return start, start + length


def _with_fill(start: Image.Image, mask: Image.Image, fill: int) -> Image.Image:
    """The start picture, its masked part painted with the colours around it unless the masked content is
    "original" (A1111 does so for the latent ones too, whose latents are then replaced there anyway)."""
    return start if MASKED_CONTENT[fill] == "original" else fill_masked(start, mask)


# The fill's blurs of the kept colours, coarse to fine: (Gaussian radius, times laid over), as A1111's masking.fill
FILL_BLURS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2))


def fill_masked(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture painted over, as far as the mask covers it (its blurred edge partly), by the colours of the kept
    pixels around it, as A1111's fill: the kept colours blurred coarse to fine (FILL_BLURS), each blur laid over the
    ones before by how much kept colour it holds there (alpha compositing), the kept pixels themselves last; then
    each pixel's colour over all it was given. A pixel the blurred mask covers nearly whole so lends almost nothing
    (the masked object does not come back through a blurred edge), and one far from any kept colour still gets the
    nearest. A mask that keeps nothing leaves no colour to take: black, as A1111's."""
    keep = ImageOps.invert(mask)
    lent = Image.new("RGBa", picture.size)  # each pixel's colour as far as the mask keeps it (premultiplied)
    lent.paste(picture.convert("RGBA").convert("RGBa"), mask=keep)
    colour = np.zeros((picture.height, picture.width, 3), dtype=np.float32)  # laid over so far, premultiplied
    cover = np.zeros((picture.height, picture.width, 1), dtype=np.float32)  # ... and how much of it there is
    layers = [lent.filter(ImageFilter.GaussianBlur(radius)) for radius, _ in FILL_BLURS] + [lent]
    for layer, times in zip(layers, [times for _, times in FILL_BLURS] + [1]):
        values = np.asarray(layer, dtype=np.float32)
        weight = values[..., 3:] / 255
        for _ in range(times):
            colour = values[..., :3] + colour * (1 - weight)
            cover = weight + cover * (1 - weight)
    painted = np.divide(colour, cover, out=np.zeros_like(colour), where=cover > 0)
    return Image.fromarray(np.clip(painted.round(), 0, 255).astype(np.uint8))
