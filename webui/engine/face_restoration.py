"""A1111's Restore faces: each face found in a picture (RetinaFace, webui/engine/face_detection.py) is aligned onto
FFHQ's 512x512 template, drawn again by GFPGAN (webui/engine/gfpgan_net.py) or CodeFormer
(webui/engine/codeformer_net.py), and pasted back.

The weight files are where A1111 keeps them: GFPGAN's, the face detector's and the face-parsing network's (the paste
mask, webui/engine/face_parsing.py) in models/GFPGAN, CodeFormer's in
models/Codeformer (`--gfpgan-models-path`, `--codeformer-models-path`); each is downloaded from its project's releases
when first used (not with --offline). The networks run on the worker's thread, in float32 (A1111 runs them so too).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from webui.engine.downloads import DownloadFailed, download
from webui.engine.models import file_stamp
from webui.schemas import DEFAULT_CODEFORMER_WEIGHT, InvalidRequest, known_restorer

FACE_SIZE = 512  # what both networks draw: FFHQ's aligned faces
DETECTOR, PARSER = "detector", "parser"
_FILES = {  # the file each network is read from when the folder has none of its own, and where it comes from
    "GFPGAN": ("GFPGANv1.4.pth", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth"),
    "CodeFormer": ("codeformer-v0.1.0.pth",
                   "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth"),
    DETECTOR: ("detection_Resnet50_Final.pth",
               "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"),
    PARSER: ("parsing_parsenet.pth",
             "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"),
}
_SUFFIXES = (".pth", ".safetensors")


class FaceRestorationError(InvalidRequest):
    """A face restorer that cannot be used: the message says what to pick or fix; the job is refused, not crashed."""


@dataclass(frozen=True)
class WeightFile:
    path: Path
    url: str


class FaceRestorers:
    """The face restorers' weight files and the networks built from them (kept in memory until forget())."""

    def __init__(self, gfpgan_folder: Path, codeformer_folder: Path, downloads: bool = True):
        self.folders = {"GFPGAN": Path(gfpgan_folder), "CodeFormer": Path(codeformer_folder),
                        DETECTOR: Path(gfpgan_folder), PARSER: Path(gfpgan_folder)}
        self.downloads = downloads
        self._lock = threading.Lock()
        self._built: dict[str, tuple[Path, tuple, torch.nn.Module]] = {}

    def weight_file(self, network: str) -> WeightFile:
        """The file a network ("GFPGAN", "CodeFormer" or DETECTOR) is read from: GFPGAN's and CodeFormer's own in their
        folder (the last by name, so GFPGANv1.4 before v1.3), else the released file there."""
        folder = self.folders[network]
        name, url = _FILES[network]
        if network in ("GFPGAN", "CodeFormer") and folder.is_dir():
            prefix = network.lower()
            own = sorted(path for path in folder.iterdir()
                         if path.suffix in _SUFFIXES and path.name.lower().startswith(prefix) and path.is_file())
            if own:
                return WeightFile(own[-1], url)
        return WeightFile(folder / name, url)

    def check(self, restorer: str) -> None:
        """FaceRestorationError unless the restorer is known and its files are here or can be downloaded."""
        try:
            restorer = known_restorer(restorer)
        except ValueError as err:
            raise FaceRestorationError(str(err)) from None
        if self.downloads:
            return
        for network in (restorer, DETECTOR, PARSER):
            file = self.weight_file(network)
            if not file.path.is_file():
                raise FaceRestorationError(
                    f"{restorer}: {file.path} is not there and this server does not download (--offline); put the "
                    f"file there (from {file.url}), or untick Restore faces")

    def restore(self, picture: Image.Image, restorer: str, codeformer_weight: float = DEFAULT_CODEFORMER_WEIGHT,
                device: str | torch.device = "cpu") -> Image.Image:
        """The RGB picture with each face found drawn again by the restorer (CodeFormer with `codeformer_weight`);
        the picture as it was when it has no face."""
        from webui.engine.face_detection import align_face, detect_faces, paste_face

        restorer = known_restorer(restorer)
        picture = picture.convert("RGB")
        detector = self._network(DETECTOR, device)
        faces = detect_faces(detector, picture)
        if not faces:
            return picture
        from webui.engine.face_parsing import face_mask

        net, parser = self._network(restorer, device), self._network(PARSER, device)
        result = picture
        for face in faces:  # every face is taken from the picture as it was, as facexlib crops them all first
            aligned = align_face(picture, face, FACE_SIZE)
            restored = _draw_again(net, aligned.picture, restorer, codeformer_weight, device)
            # pasted through the face-parsing mask (facexlib's use_parse, as A1111 asks for it)
            result = paste_face(result, restored, aligned.matrix, face_mask(parser, restored))
        return result

    def forget(self) -> None:
        """Drop the built networks (their memory goes back to the device); the next use reads the files again."""
        with self._lock:
            self._built.clear()

    def _network(self, network: str, device: str | torch.device) -> torch.nn.Module:
        file = self.weight_file(network)
        if not file.path.is_file():
            self._download(network, file)
        with self._lock:
            stamp = file_stamp(file.path)
            built = self._built.get(network)
            if built is None or built[:2] != (file.path, stamp):
                try:
                    built = (file.path, stamp, _LOADERS[network](file.path))
                except (OSError, ValueError) as err:
                    raise FaceRestorationError(f"{network}: {file.path.name} could not be used ({err}); replace "
                                               "the file, or untick Restore faces") from None
                self._built[network] = built
            return built[2].to(device)

    def _download(self, network: str, file: WeightFile) -> None:
        if not self.downloads:
            raise FaceRestorationError(f"{network}: {file.path} is not there and this server does not download "
                                       f"(--offline); put the file there (from {file.url})")
        with self._lock:  # one download of a file at a time
            if file.path.is_file():
                return
            try:  # a page of HTML, or a cut file, is no network
                download(file.url, file.path, _LOADERS[network], f"the {network} face network")
            except DownloadFailed as err:
                raise FaceRestorationError(f"{network}: could not download {file.url} ({err}); download it "
                                           f"yourself into {file.path}") from None


def _load_detector(path: Path) -> torch.nn.Module:
    from webui.engine.face_detection import load_detector

    return load_detector(path)


def _load_gfpgan(path: Path) -> torch.nn.Module:
    from webui.engine.gfpgan_net import load_gfpgan

    return load_gfpgan(path)


def _load_codeformer(path: Path) -> torch.nn.Module:
    from webui.engine.codeformer_net import load_codeformer

    return load_codeformer(path)


def _load_parser(path: Path) -> torch.nn.Module:
    from webui.engine.face_parsing import load_parser

    return load_parser(path)


_LOADERS = {DETECTOR: _load_detector, PARSER: _load_parser, "GFPGAN": _load_gfpgan, "CodeFormer": _load_codeformer}


@torch.inference_mode()
def _draw_again(net: torch.nn.Module, face: Image.Image, restorer: str, codeformer_weight: float,
                device: str | torch.device) -> Image.Image:
    """One aligned face through the network: RGB in [-1, 1] in, the same out, back to 8 bits as A1111 does (the
    fraction cut off, not rounded)."""
    pixels = torch.from_numpy(np.asarray(face, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    pixels = (pixels * 2 - 1).to(device)
    # CodeFormer gives (face, logits, latent), as its reference does and A1111 takes [0]
    drawn = net(pixels, w=codeformer_weight, adain=True)[0] if restorer == "CodeFormer" else net(pixels)
    drawn = ((drawn.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).cpu()
    return Image.fromarray((drawn * 255).numpy().astype(np.uint8))
