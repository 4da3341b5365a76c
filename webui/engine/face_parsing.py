"""Face parsing for pasting restored faces back: the ParseNet network (parsing_parsenet.pth) and the soft mask.

A1111 pastes each restored 512x512 face back through a mask drawn from a face-parsing network instead of a plain
square: ParseNet labels every pixel with one of 19 classes (skin, brows, eyes, nose, lips, hair, neck, cloth, ...),
the face-like classes become 255 and the rest 0, two wide Gaussian blurs (101x101, sigma 11) feather the edge, and a
10-pixel frame is cleared so no hard square border shows. `face_mask` reproduces those steps exactly, up to the
resize and warp back into the picture, which the caller does.

Module and attribute names follow the published weight file's keys (`encoder.1.conv1.conv2d.weight`,
`body.0.conv1.norm.norm.running_mean`, `out_mask_conv.conv2d.bias`, ...), so the file loads as it is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from webui.engine.upscaler_nets import load_network, read_weights

PARSE_SIZE = 512  # ParseNet reads 512x512 faces; other sizes are resized first, as facexlib does

# 255 where a parsing class belongs to the face that gets pasted, 0 where it does not. Indexed by class:
# 0 background, 14 neck, 16 cloth, 17 hair, 18 hat stay out (facexlib's MASK_COLORMAP).
MASK_COLORMAP = np.array([0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0],
                         dtype=np.float64)
BLUR_SIZE = 101
BLUR_SIGMA = 11.0
BORDER = 10  # pixels cleared at every edge after blurring


class BatchNorm(nn.Module):
    """BatchNorm2d one level down (`norm.norm.*` in the weight file)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvLayer(nn.Module):
    """Reflection-padded 3x3 convolution; optionally nearest 2x upsampling before it or stride 2 in it, then
    batch norm and LeakyReLU(0.2) where asked. With batch norm the convolution has no bias."""

    def __init__(self, in_channels: int, out_channels: int, scale: str = "none", norm: bool = False,
                 activate: bool = False):
        super().__init__()
        self.upsample = scale == "up"
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, stride=2 if scale == "down" else 1, bias=not norm)
        self.norm = BatchNorm(out_channels) if norm else None
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if self.norm is not None:
            x = self.norm(x)
        return F.leaky_relu(x, 0.2) if self.activate else x


class ResidualBlock(nn.Module):
    """Two normed convolutions plus a skip path; the skip is a plain convolution where the block changes the
    resolution or the width. Going down, the second convolution strides; going up, the first upsamples."""

    def __init__(self, in_channels: int, out_channels: int, scale: str = "none"):
        super().__init__()
        reshapes = scale != "none" or in_channels != out_channels
        self.shortcut_func = ConvLayer(in_channels, out_channels, scale) if reshapes else None
        self.conv1 = ConvLayer(in_channels, out_channels, "up" if scale == "up" else "none", norm=True,
                               activate=True)
        self.conv2 = ConvLayer(out_channels, out_channels, "down" if scale == "down" else "none", norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut_func is None else self.shortcut_func(x)
        return skip + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """Encoder (down to `min_feat_size`), residual body, decoder (up to `out_size`), then two heads: per-pixel
    class logits (`parsing_ch` classes) and an RGB image. Defaults are the published parsing_parsenet.pth
    configuration. The network is fully convolutional: the sizes set the number of down/up steps only."""

    def __init__(self, in_size: int = 512, out_size: int = 512, min_feat_size: int = 32, base_ch: int = 64,
                 parsing_ch: int = 19, res_depth: int = 10, ch_range: tuple[int, int] = (32, 256)):
        super().__init__()
        min_ch, max_ch = ch_range

        def clip(channels: int) -> int:
            return max(min_ch, min(channels, max_ch))

        min_feat_size = min(in_size, min_feat_size)
        down_steps = (in_size // min_feat_size).bit_length() - 1  # floor(log2)
        up_steps = (out_size // min_feat_size).bit_length() - 1

        # the unclipped width doubles per step down and halves per step up; each layer's width is it clipped
        width = base_ch
        encoder: list[nn.Module] = [ConvLayer(3, base_ch)]
        for _ in range(down_steps):
            encoder.append(ResidualBlock(clip(width), clip(width * 2), scale="down"))
            width *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*(ResidualBlock(clip(width), clip(width)) for _ in range(res_depth)))
        decoder = []
        for _ in range(up_steps):
            decoder.append(ResidualBlock(clip(width), clip(width // 2), scale="up"))
            width //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(clip(width), 3)
        self.out_mask_conv = ConvLayer(clip(width), parsing_ch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, H, W) RGB in [-1, 1]. Returns (class logits (N, parsing_ch, H', W'), image (N, 3, H', W'))
        with H' = H * out_size / in_size."""
        features = self.encoder(x)
        decoded = self.decoder(features + self.body(features))
        return self.out_mask_conv(decoded), self.out_img_conv(decoded)


def load_parser(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                **architecture) -> ParseNet:
    """ParseNet with the weights of a `.pth` (a flat state dict, read without running pickled code) or
    `.safetensors` file, in eval mode on `device` as `dtype`. `architecture`: ParseNet arguments where they differ
    from the published configuration (tests' tiny networks). A file whose keys or shapes do not fit raises
    ValueError naming the file and the first differences."""
    path = Path(path)
    what = "a ParseNet face-parsing weights file (parsing_parsenet.pth)"
    return load_network(path, lambda: ParseNet(**architecture), what, read_weights(path), device, dtype)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernel for sigma > 0: exp(-x^2 / (2 sigma^2)) at x = i - (size - 1) / 2, summing to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-0.5 / (sigma * sigma) * x * x)
    return kernel / kernel.sum()


def _filter_rows(padded: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every row with `kernel`, keeping only the fully covered positions (a shifted-slice sum, so no
    size x kernel-length temporary)."""
    width = padded.shape[1] - len(kernel) + 1
    out = np.zeros((padded.shape[0], width), dtype=np.float64)
    for offset, weight in enumerate(kernel):
        out += weight * padded[:, offset:offset + width]
    return out


def gaussian_blur(image: np.ndarray, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """cv2.GaussianBlur(image, (size, size), sigma) of a 2-D array in float64: the separable kernel above, with
    OpenCV's default border BORDER_REFLECT_101 (mirrored without repeating the edge pixel: ...c b | a b c...)."""
    radius = size // 2
    if min(image.shape) <= radius:
        raise ValueError(f"a {size}x{size} blur needs an image larger than {radius} pixels on each side, "
                         f"got {image.shape[1]}x{image.shape[0]}")
    kernel = gaussian_kernel(size, sigma)
    padded = np.pad(np.asarray(image, dtype=np.float64), radius, mode="reflect")  # numpy's reflect is REFLECT_101
    return _filter_rows(_filter_rows(padded, kernel).T, kernel).T


def _parser_input(face: Image.Image) -> torch.Tensor:
    """(1, 3, 512, 512) RGB in [-1, 1]. A face of another size is resized bilinearly on its 8-bit pixels first
    (cv2.resize INTER_LINEAR in facexlib: half-pixel centres, no antialiasing, rounded back to 8 bits; cv2's
    fixed-point weights put some pixels one level off this. A1111's faces are always 512, so this never runs there)."""
    pixels = torch.from_numpy(np.asarray(face.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    if pixels.shape[-2:] != (PARSE_SIZE, PARSE_SIZE):
        resized = F.interpolate(pixels.float(), size=(PARSE_SIZE, PARSE_SIZE), mode="bilinear", align_corners=False)
        pixels = resized.round().clamp(0, 255)
    return (pixels.float() / 255 - 0.5) / 0.5


def colour_mask(classes: np.ndarray) -> np.ndarray:
    """Parsing classes (H, W) to 255 where the class is part of the pasted face and 0 elsewhere (float64)."""
    return MASK_COLORMAP[classes]


def soften_mask(mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask feathered as facexlib does: blurred twice, the frame cleared, scaled to [0, 1] (float32)."""
    mask = gaussian_blur(gaussian_blur(mask))
    mask[:BORDER, :] = 0
    mask[-BORDER:, :] = 0
    mask[:, :BORDER] = 0
    mask[:, -BORDER:] = 0
    return (mask / 255).astype(np.float32)


def face_mask(parser: nn.Module, face: Image.Image) -> np.ndarray:
    """The soft paste-back mask of a restored face: float32 (512, 512) in [0, 1], in face coordinates (at the
    parsing size; a face of another size needs the mask resized back to it, as facexlib does after this).
    `parser`: a ParseNet, or anything that maps (1, 3, 512, 512) to a tuple whose first item is class logits."""
    weight = next(parser.parameters())
    with torch.no_grad():
        logits = parser(_parser_input(face).to(device=weight.device, dtype=weight.dtype))[0]
    return soften_mask(colour_mask(logits.argmax(dim=1)[0].cpu().numpy()))
