"""Picture upscalers, A1111's: PIL's filters (Lanczos, Nearest) and the model upscalers, ESRGAN and Real-ESRGAN
networks read from the files of `models/ESRGAN` and `models/RealESRGAN` (`--esrgan-models-path`,
`--realesrgan-models-path`). One `resize` serves the hires fix, SD upscale and Extras.

As in A1111, a file in the ESRGAN folder is named by its file name without the suffix ("4x-UltraSharp"), and
Real-ESRGAN's own files by A1111's names ("R-ESRGAN 4x+"), so pasted infotexts find them; those are listed even
before they are downloaded (not with --offline), and the first use downloads the file from Real-ESRGAN's releases.
A model enlarges by its own scale, again while the picture is smaller than asked (three passes at most), and
Lanczos then gives the exact size, as A1111 does it. Model upscalers run on the worker's thread: the network is
moved to the device it is asked for.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from webui.engine.downloads import DownloadFailed, download
from webui.engine.hires import IMAGE_UPSCALERS, NO_UPSCALER
from webui.engine.models import file_stamp, files_under
from webui.engine.upscaler_nets import WEIGHT_FILE_SUFFIXES, UpscalerFileError, build_network, read_weights, \
    upscale_tensor
from webui.schemas import InvalidRequest

MAX_PASSES = 3
MAX_PASS_PIXELS = 8192 * 8192  # one pass's result is held as floats: 800 MB
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
# Real-ESRGAN's released files under A1111's names, and where they are downloaded from.
REAL_ESRGAN_FILES = {
    "R-ESRGAN General 4xV3": ("realesr-general-x4v3.pth", f"{_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth"),
    "R-ESRGAN General WDN 4xV3": ("realesr-general-wdn-x4v3.pth",
                                  f"{_RELEASES}/v0.2.5.0/realesr-general-wdn-x4v3.pth"),
    "R-ESRGAN AnimeVideo": ("realesr-animevideov3.pth", f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth"),
    "R-ESRGAN 4x+": ("RealESRGAN_x4plus.pth", f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth"),
    "R-ESRGAN 4x+ Anime6B": ("RealESRGAN_x4plus_anime_6B.pth", f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth"),
    "R-ESRGAN 2x+": ("RealESRGAN_x2plus.pth", f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth"),
}

log = logging.getLogger(__name__)


class UpscalerError(InvalidRequest):
    """An upscaler that cannot be used: the message says what to pick or fix; the job is refused, not crashed."""


@dataclass(frozen=True)
class UpscalerModel:
    name: str
    path: Path
    url: str | None = None  # where the file comes from when it is not there yet


class UpscalerLibrary:
    """The model upscalers' files, looked at again on each call, and the last network built (one in memory)."""

    def __init__(self, esrgan_folder: Path, real_esrgan_folder: Path, downloads: bool = True):
        self.esrgan_folder, self.real_esrgan_folder = Path(esrgan_folder), Path(real_esrgan_folder)
        self.downloads = downloads
        self._lock = threading.Lock()  # one build at a time
        self._download_lock = threading.Lock()  # one download at a time
        self._built: tuple[Path, tuple, torch.nn.Module] | None = None

    def models(self) -> list[UpscalerModel]:
        """The ESRGAN folder's files, the Real-ESRGAN folder's, then Real-ESRGAN's downloadable files; a name
        given twice is the first's."""
        known = {file: name for name, (file, _url) in REAL_ESRGAN_FILES.items()}
        found = [UpscalerModel(path.stem, path) for path in files_under(self.esrgan_folder, WEIGHT_FILE_SUFFIXES)]
        found += [UpscalerModel(known.get(path.name, path.stem), path)
                  for path in files_under(self.real_esrgan_folder, WEIGHT_FILE_SUFFIXES)]
        if self.downloads:
            found += [UpscalerModel(name, self.real_esrgan_folder / file, url)
                      for name, (file, url) in REAL_ESRGAN_FILES.items()]
        by_name: dict[str, UpscalerModel] = {}
        for model in found:
            by_name.setdefault(model.name, model)
        return list(by_name.values())

    def names(self) -> list[str]:
        return [model.name for model in self.models()]

    def find(self, name: str) -> UpscalerModel:
        for model in self.models():
            if model.name == name:
                return model
        raise UpscalerError(f"there is no upscaler {name[:100]!r} on this server; choose one of "
                            f"{', '.join(picture_upscalers(self))} (model upscalers are the files of "
                            f"{self.esrgan_folder} and {self.real_esrgan_folder}: put the file there)")

    def check(self, name: str) -> None:
        """UpscalerError unless `name` is a filter, "None", or a model whose file builds (or will be downloaded)."""
        if name in IMAGE_UPSCALERS or name == NO_UPSCALER:
            return
        model = self.find(name)
        if model.path.is_file():
            self.network(model)

    def network(self, model: UpscalerModel) -> torch.nn.Module:
        """The model's network, built on the CPU in float32 (resize moves it to the device it runs on) and built
        again when its file changed; the file downloaded first when it is not there yet."""
        if not model.path.is_file():
            # Under a lock of its own: a download takes minutes, and check() in request threads waits for the
            # build lock (a file that is there), never for a download.
            with self._download_lock:
                if not model.path.is_file():
                    self._download(model)
        with self._lock:
            stamp = file_stamp(model.path)
            if self._built is None or self._built[:2] != (model.path, stamp):
                try:
                    network = build_network(read_weights(model.path), model.name)
                except UpscalerFileError as err:
                    raise UpscalerError(f"upscaler {model.name}: {err}") from None
                self._built = (model.path, stamp, network)
            return self._built[2]

    def forget(self) -> None:
        """Drop the built network (its memory goes back to the device); the next use reads the file again."""
        with self._lock:
            self._built = None

    def _download(self, model: UpscalerModel) -> None:
        if model.url is None or not self.downloads:
            raise UpscalerError(f"upscaler {model.name}: its file {model.path} is gone; put it back or pick another")
        try:  # a page of HTML, or a cut file, is no upscaler
            download(model.url, model.path, lambda partial: read_weights(partial, model.path.suffix),
                     f"upscaler {model.name}")
        except DownloadFailed as err:
            raise UpscalerError(f"upscaler {model.name}: could not download {model.url} ({err}); download it "
                                f"yourself into {model.path}, or pick another upscaler") from None

    def resize(self, picture: Image.Image, size: tuple[int, int], name: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Image.Image:
        """The RGB picture at `size` (width, height) by the named upscaler: a filter directly; a model by its
        passes, then Lanczos to the exact size."""
        if name in IMAGE_UPSCALERS:
            return picture.resize(size, IMAGE_UPSCALERS[name])
        network = self.network(self.find(name)).to(device, dtype)
        for done in range(MAX_PASSES):
            short = picture.width < size[0] or picture.height < size[1]
            if not short and (done or picture.size != size):  # the size asked is the picture's own: one pass
                break
            picture = run_network(network, _fit_for_pass(picture, size, network.scale))
            if network.scale == 1:  # a 1x model cleans, and would clean again, never enlarging
                break
        return picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)


def _fit_for_pass(picture: Image.Image, size: tuple[int, int], scale: int) -> Image.Image:
    """The picture, shrunk first where the pass would make more than MAX_PASS_PIXELS: just what `size` needs."""
    if picture.width * scale * picture.height * scale <= MAX_PASS_PIXELS:
        return picture
    needed = (max(1, -(-size[0] // scale)), max(1, -(-size[1] // scale)))
    return picture.resize(needed, Image.Resampling.LANCZOS)


def picture_upscalers(library: UpscalerLibrary | None) -> list[str]:
    """Extras' and SD upscale's list, in A1111's order: None, the filters, the models."""
    return [NO_UPSCALER, *IMAGE_UPSCALERS, *(library.names() if library else [])]


@torch.inference_mode()
def run_network(network: torch.nn.Module, picture: Image.Image) -> Image.Image:
    """One pass of the network over an RGB picture (on the network's device and dtype)."""
    weights = next(network.parameters())
    pixels = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)[None]  # (a copy: writable)
    pixels = pixels.to(weights.device, weights.dtype) / 255
    out = upscale_tensor(network, pixels).float()
    return Image.fromarray(out[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy())
