"""Extras (A1111's tab and its /sdapi/v1/extra-* routes): a picture enlarged, or shrunk, then its faces restored.

The upscalers are PIL's filters (Lanczos, Nearest), which need no model and no GPU, so they run where they are
asked (a Gradio event, an API request) instead of in the worker's queue, where they would wait behind generations;
and the model upscalers (ESRGAN, Real-ESRGAN: webui/engine/upscalers.py), which run on the worker, which owns the
device, as the face restorers do (GFPGAN, then CodeFormer, each blended in by its visibility, as A1111 orders them:
webui/engine/face_restoration.py). Names, sizes and the infotext keys follow A1111, so its API clients and its PNG
Info read ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from webui.engine.hires import IMAGE_UPSCALERS, NO_UPSCALER, PICTURE_UPSCALERS
from webui.engine.img2img import as_rgb
from webui.engine.upscalers import MAX_PASS_PIXELS
from webui.schemas import MAX_UPSCALER_NAME, InvalidRequest, describe_validation_errors
from webui.storage.infotext import build_infotext
from webui.storage.outputs import read_infotext, text_chunks

if TYPE_CHECKING:
    from webui.worker import Worker

EXTRAS_UPSCALERS = PICTURE_UPSCALERS  # those of every server; the model upscalers come after them
MODEL_CONTEXT = 16  # pixels of the original around a crop's part that a model upscaler sees too
MAX_SCALE = 8.0  # A1111's largest factor
MAX_PICTURES = 100  # in one batch
MAX_SIDE = 8192  # an 8192x8192 RGB picture is 200 MB in memory, and its PNG takes seconds to write
# All of one API request's results, which it holds at once (as PNGs, then base64 in JSON): two 8192x8192.
MAX_REQUEST_PIXELS = 2 * MAX_SIDE * MAX_SIDE


class UpscaleSettings(BaseModel):
    """How to resize, under A1111's API field names."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # JSON's NaN is no factor

    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h")
    upscaling_resize: float = Field(2.0, gt=0, le=MAX_SCALE, description="the factor, for resize_mode 0")
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_SIDE, description="the width, for resize_mode 1")
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_SIDE, description="the height, for resize_mode 1")
    upscaling_crop: bool = Field(True, description="resize_mode 1: cut what sticks out of the width x height "
                                                   "(false: keep the shape, filling the size at least)")
    upscaler_1: str = Field(NO_UPSCALER, description=f"one of {', '.join(EXTRAS_UPSCALERS)} ('None', A1111's "
                                                     "default: the picture is left as it is), or a model upscaler "
                                                     "(GET /sdapi/v1/upscalers)")
    upscaler_2: str = Field(NO_UPSCALER, description="a second upscaler, blended in by extras_upscaler_2_visibility")
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1, description="0..1: how much of upscaler_2 shows")
    gfpgan_visibility: float = Field(0.0, ge=0, le=1, description="0..1: how much of GFPGAN's restored faces shows "
                                                                  "(0: GFPGAN does not run)")
    codeformer_visibility: float = Field(0.0, ge=0, le=1, description="0..1: how much of CodeFormer's restored faces "
                                                                      "shows (0: CodeFormer does not run)")
    # 0 as A1111's Extras and API have it (its generation setting's default is 0.5)
    codeformer_weight: float = Field(0.0, ge=0, le=1, description="CodeFormer's weight: 0 changes a face most, 1 "
                                     "least")

    @property
    def face_restorers(self) -> list[tuple[str, float]]:
        """(restorer, visibility) of those that run, in A1111's order: GFPGAN, then CodeFormer."""
        return [(name, visibility) for name, visibility in (("GFPGAN", self.gfpgan_visibility),
                                                            ("CodeFormer", self.codeformer_visibility))
                if visibility > 0]

    @field_validator("resize_mode")
    @classmethod
    def _known_mode(cls, mode: int) -> int:
        if mode not in (0, 1):
            raise ValueError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {mode}")
        return mode

    @field_validator("upscaler_1", "upscaler_2", mode="before")
    @classmethod
    def _known_upscaler(cls, name: Any) -> Any:
        if name is None or name == "":
            return NO_UPSCALER
        if isinstance(name, str) and len(name) > MAX_UPSCALER_NAME:
            raise ValueError(f"an upscaler's name has at most {MAX_UPSCALER_NAME} characters")
        return name  # a model upscaler's name is checked by the Upscalers that run it


def parse_upscale(data: dict[str, Any], labels: dict[str, str] | None = None) -> UpscaleSettings:
    """A dict (from the UI) as UpscaleSettings, or InvalidRequest naming each field to fix (by its label in
    `labels`, where it has one)."""
    try:
        return UpscaleSettings.model_validate(data)
    except ValidationError as err:
        errors = [error | {"loc": tuple((labels or {}).get(str(part), part) for part in error["loc"])}
                  for error in err.errors()]
        raise InvalidRequest(describe_validation_errors(errors)) from None


class Upscalers:
    """What runs Extras' upscalers and face restorers: the filters here, in the caller's thread; model upscalers and
    face restorers on the worker, after the jobs queued before (without a worker only the filters exist)."""

    def __init__(self, worker: "Worker | None" = None):
        self.worker = worker

    def names(self) -> list[str]:
        return [*EXTRAS_UPSCALERS, *(self.worker.engine.upscalers.names() if self.worker else [])]

    def check(self, settings: UpscaleSettings) -> None:
        """InvalidRequest naming the field whose upscaler is not on this server (or whose file does not build)."""
        for label in ("upscaler_1", "upscaler_2"):
            name = getattr(settings, label)
            if name in EXTRAS_UPSCALERS:
                continue
            if self.worker is None:
                raise InvalidRequest(f"{label}: unknown upscaler {name[:100]!r}; choose one of: "
                                     f"{', '.join(EXTRAS_UPSCALERS)}")
            try:
                self.worker.engine.upscalers.check(name)
            except InvalidRequest as err:
                raise InvalidRequest(f"{label}: {err}") from None
        for restorer, _visibility in settings.face_restorers:
            label = f"{restorer.lower()}_visibility"
            if self.worker is None:
                raise InvalidRequest(f"{label}: face restoration runs on the worker, which this server has not")
            try:
                self.worker.engine.faces.check(restorer)
            except InvalidRequest as err:
                raise InvalidRequest(f"{label}: {err}") from None

    def restore_faces(self, picture: Image.Image, restorer: str, codeformer_weight: float) -> Image.Image:
        """The picture with its faces drawn again by the restorer, on the worker."""
        if self.worker is None:
            raise InvalidRequest("face restoration runs on the worker, which this server has not")
        return self.worker.call(lambda engine: engine.restore_faces(picture, restorer, codeformer_weight),
                                activity=f"Extras: restoring faces with {restorer}").result()

    def resize(self, picture: Image.Image, resized: tuple[int, int], kept: tuple[int, int], name: str) -> Image.Image:
        """The middle `kept` of the picture resized to `resized` by the named upscaler. Only that part is resized,
        so a crop never makes the larger picture first: a filter resizes just the box it keeps; a model enlarges
        the whole pixels around it (with some context, so its edges are as the whole's) by its own scale."""
        box = _middle(picture.size, resized, kept)
        if name in IMAGE_UPSCALERS:
            return picture.resize(kept, IMAGE_UPSCALERS[name], box=box)
        if self.worker is None:
            raise InvalidRequest(f"unknown upscaler {name[:100]!r}; choose one of: {', '.join(EXTRAS_UPSCALERS)}")
        scale = (resized[0] / picture.width, resized[1] / picture.height)
        # context: MODEL_CONTEXT pixels of the original, fewer where each would become many (a thin picture)
        context = [min(MODEL_CONTEXT, math.ceil(MODEL_CONTEXT * 8 / s)) for s in scale]
        part = (max(0, math.floor(box[0]) - context[0]), max(0, math.floor(box[1]) - context[1]),
                min(picture.width, math.ceil(box[2]) + context[0]), min(picture.height, math.ceil(box[3]) + context[1]))
        size = (round((part[2] - part[0]) * scale[0]), round((part[3] - part[1]) * scale[1]))
        if size[0] * size[1] > MAX_PASS_PIXELS:  # what one pass may make
            raise InvalidRequest(f"{name}: the {kept[0]}x{kept[1]} kept of {resized[0]}x{resized[1]} would be made "
                                 f"from a {size[0]}x{size[1]} enlargement, too large for a model upscaler; untick "
                                 "Crop to fit, ask for a shape nearer the picture's, or use Lanczos")
        source = picture if part == (0, 0, *picture.size) else picture.crop(part)
        whole = self.worker.call(lambda engine: engine.upscale_picture(source, size, name),
                                 activity=f"Extras: upscaling with {name}").result()
        if whole.size == kept:
            return whole
        left = min(max(0, round(box[0] * scale[0] - part[0] * scale[0])), size[0] - kept[0])
        top = min(max(0, round(box[1] * scale[1] - part[1] * scale[1])), size[1] - kept[1])
        return whole.crop((left, top, left + kept[0], top + kept[1]))


FILTERS_ONLY = Upscalers()


@dataclass
class Upscaled:
    """The resized picture, the text chunks the original carried (its generation parameters under `parameters`, also
    those A1111 reads from a JPEG's EXIF or a NovelAI PNG), and what was done as A1111's infotext keys ({} when
    nothing was)."""
    image: Image.Image
    original_texts: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def infotext(self) -> str:
        """A1111's `postprocessing` text, e.g. "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"."""
        return build_infotext("", "", self.info)

    @property
    def texts(self) -> dict[str, str]:
        """The text chunks to save it with: the original's, and what was done under `postprocessing`, as A1111 keeps
        them."""
        return self.original_texts | ({"postprocessing": self.infotext} if self.info else {})


def upscaled_size(width: int, height: int, settings: UpscaleSettings) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the size the picture is resized to, the size kept after the crop). Scale to: the factor that makes the
    picture cover the width x height, as A1111 picks it; the crop then cuts the middle of that size. ValueError when
    a side would be 0 or past MAX_SIDE."""
    if settings.upscaler_1 == NO_UPSCALER:
        return (width, height), (width, height)
    if settings.resize_mode == 1:
        target = (settings.upscaling_resize_w, settings.upscaling_resize_h)
        scale = max(target[0] / width, target[1] / height)
    else:
        scale = settings.upscaling_resize
    resized = (max(1, round(width * scale)), max(1, round(height * scale)))
    kept = target if settings.resize_mode == 1 and settings.upscaling_crop else resized
    if max(kept) > MAX_SIDE:
        raise ValueError(f"the {width}x{height} picture would become {kept[0]}x{kept[1]}; at most "
                         f"{MAX_SIDE} pixels a side can be made: pick a smaller factor or size")
    return resized, kept


def upscale(image: Image.Image, settings: UpscaleSettings, upscalers: Upscalers = FILTERS_ONLY) -> Upscaled:
    """The picture (as RGB, transparency on white) resized as the settings say; ValueError saying what to change
    when the result would be too large, InvalidRequest when an upscaler cannot be used."""
    texts = text_chunks(image, limit=None)  # copied whole: a ComfyUI workflow is JSON that a cut would break
    if parameters := read_infotext(image):
        texts["parameters"] = parameters
    result, info = _resized(as_rgb(image), settings, upscalers)
    for restorer, visibility in settings.face_restorers:  # A1111's keys, rounded as it rounds them
        restored = upscalers.restore_faces(result, restorer, settings.codeformer_weight)
        result = restored if visibility >= 1 else Image.blend(result, restored, visibility)
        info[f"{restorer} visibility"] = round(visibility, 3)
        if restorer == "CodeFormer":
            info["CodeFormer weight"] = round(settings.codeformer_weight, 3)
    return Upscaled(result, texts, info)


def _resized(picture: Image.Image, settings: UpscaleSettings, upscalers: Upscalers
             ) -> tuple[Image.Image, dict[str, Any]]:
    """The picture resized by the upscalers, and A1111's infotext keys of what was done."""
    if settings.upscaler_1 == NO_UPSCALER:
        return picture, {}
    resized, kept = upscaled_size(picture.width, picture.height, settings)
    # A1111's keys, in its order
    asked = f"{settings.upscaling_resize_w}x{settings.upscaling_resize_h}"
    info: dict[str, Any] = ({"Postprocess upscale to": asked} if settings.resize_mode == 1
                            else {"Postprocess upscale by": settings.upscaling_resize})
    if kept != resized:
        info["Postprocess crop to"] = f"{kept[0]}x{kept[1]}"
    info["Postprocess upscaler"] = settings.upscaler_1
    result = upscalers.resize(picture, resized, kept, settings.upscaler_1)
    if settings.upscaler_2 != NO_UPSCALER and settings.extras_upscaler_2_visibility > 0:
        info["Postprocess upscaler 2"] = settings.upscaler_2
        second = upscalers.resize(picture, resized, kept, settings.upscaler_2)
        result = Image.blend(result, second, settings.extras_upscaler_2_visibility)
    return result, info


def _middle(size: tuple[int, int], resized: tuple[int, int], kept: tuple[int, int]) -> tuple[float, ...]:
    """The part of the original (a box in its pixels) that becomes the middle `kept` of it resized to `resized`:
    only that part is resized, so a crop never makes the larger picture first."""
    scale_x, scale_y = resized[0] / size[0], resized[1] / size[1]
    left, top = (resized[0] - kept[0]) // 2, (resized[1] - kept[1]) // 2
    return left / scale_x, top / scale_y, (left + kept[0]) / scale_x, (top + kept[1]) / scale_y
