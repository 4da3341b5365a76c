"""The networks of A1111's model upscalers, built from a weights file alone.

Two families cover the files users put in `models/ESRGAN` and `models/RealESRGAN`:
  - RRDBNet, ESRGAN's network (4x-UltraSharp, Remacri, ESRGAN_4x, R-ESRGAN 4x+ and its Anime6B), in BasicSR's
    key layout (`conv_first`, `body.0.rdb1.conv1`) or the original ESRGAN's (`model.0`, `model.1.sub.0.RDB1.conv1.0`);
  - SRVGGNetCompact, Real-ESRGAN's small network (R-ESRGAN General 4xV3, AnimeVideo).
The shape of each network (channels, blocks, scale) is read from its weights, so no settings are needed. A file of
another kind (SwinIR, DAT, a checkpoint) is refused with a message naming what this server reads.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


class UpscalerFileError(ValueError):
    """A file that is no upscaler network this server can build."""


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        # conv k reads the block's input and every earlier conv's output
        self.conv1, self.conv2, self.conv3, self.conv4 = (
            nn.Conv2d(features + k * growth, growth, 3, padding=1) for k in range(4))
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            seen.append(F.leaky_relu(conv(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN: RRDB blocks at the input size, then `upsamples` doublings. Real-ESRGAN's 2x and 1x models first fold
    the picture into channels (`unfold` 2 or 4: pixel unshuffle), which the doublings undo."""

    def __init__(self, in_channels: int, out_channels: int, features: int, blocks: int, growth: int,
                 upsamples: int, unfold: int):
        super().__init__()
        self.unfold = unfold
        self.scale = 2 ** upsamples // unfold
        self.conv_first = nn.Conv2d(in_channels * unfold * unfold, features, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, padding=1)
        self.ups = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1) for _ in range(upsamples))
        self.conv_hr = nn.Conv2d(features, features, 3, padding=1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.unfold > 1:  # the fold needs sides that divide; mirror the edge out to them, cut off after
            pad = (0, -width % self.unfold, 0, -height % self.unfold)
            # (a mirror needs more pixels than it adds: a side of 1 to 3 pixels repeats its edge instead)
            x = F.pad(x, pad, mode="reflect" if pad[1] < width and pad[3] < height else "replicate")
            x = F.pixel_unshuffle(x, self.unfold)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for conv in self.ups:
            features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(features), 0.2))
        return out[..., :height * self.scale, :width * self.scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: plain convolutions with PReLU, a pixel shuffle, and the input enlarged by
    nearest neighbour added back."""

    def __init__(self, in_channels: int, out_channels: int, features: int, convs: int, scale: int):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, padding=1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale * scale, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def read_weights(path: Path, suffix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth`/`.pt` (read without running pickled code) or `.safetensors` file, unwrapped from
    BasicSR's `params_ema` / `params`. `suffix`: the kind of file, where its name does not say it (a download)."""
    try:
        if (suffix or path.suffix).lower() == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code, truncated files, text: all the same to a user
        raise UpscalerFileError(f"{path.name} could not be read as weights ({type(err).__name__}: {err})") from None
    for wrapper in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpscalerFileError(f"{path.name} holds no plain table of weights")
    return state


def build_network(state: dict[str, torch.Tensor], name: str) -> nn.Module:
    """The network these weights belong to, loaded with them, in eval mode, as float32 on the CPU."""
    if "model.0.weight" in state:
        state = _from_esrgan_layout(state)
    if "conv_first.weight" in state:
        state = {_UPSAMPLE.sub(lambda up: f"ups.{int(up.group(1)) - 1}", key): value for key, value in state.items()}
        network = _rrdbnet_for(state)
    elif "body.0.weight" in state and "body.1.weight" in state:
        network = _srvgg_for(state, name)
    else:
        raise UpscalerFileError(f"{name} is no ESRGAN or Real-ESRGAN network (this server reads RRDBNet and "
                                "SRVGGNetCompact files; SwinIR, DAT, SCUNet and others are not built here)")
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:
        raise UpscalerFileError(f"{name}: its weights do not fit the network they look like ({err})") from None
    return network.eval().requires_grad_(False)


_UPSAMPLE = re.compile(r"^conv_up(\d)")  # BasicSR's conv_up1, conv_up2 (conv_up3 for 8x)
_ESRGAN_BLOCK = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_ESRGAN_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_ESRGAN_LAYER = re.compile(r"model\.(\d+)\.(weight|bias)")


def _from_esrgan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN's `model.N` keys renamed to BasicSR's: model.0 is conv_first and model.1 the blocks and
    their trunk conv; the layers after are the doubling convolutions, then conv_hr and conv_last."""
    renamed: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if block := _ESRGAN_BLOCK.fullmatch(key):
            number, rdb, conv, kind = block.groups()
            renamed[f"body.{number}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif trunk := _ESRGAN_TRUNK.fullmatch(key):
            renamed[f"conv_body.{trunk.group(2)}"] = value
        elif layer := _ESRGAN_LAYER.fullmatch(key):
            layers.setdefault(int(layer.group(1)), {})[layer.group(2)] = value
        else:
            renamed[key] = value  # unknown: load_state_dict will name it
    after_blocks = sorted(index for index in layers if index > 1)
    names = {0: "conv_first"} | {index: f"ups.{n}" for n, index in enumerate(after_blocks[:-2])}
    if len(after_blocks) >= 2:
        names |= {after_blocks[-2]: "conv_hr", after_blocks[-1]: "conv_last"}
    for index, kinds in layers.items():
        for kind, value in kinds.items():
            renamed[f"{names.get(index, f'model.{index}')}.{kind}"] = value
    return renamed


def _rrdbnet_for(state: dict[str, torch.Tensor]) -> RRDBNet:
    if "conv_last.weight" not in state or "body.0.rdb1.conv1.weight" not in state:
        raise UpscalerFileError("an RRDBNet without its last layer or its first block: the file is incomplete")
    features, folded_in = state["conv_first.weight"].shape[:2]
    channels = state["conv_last.weight"].shape[0]  # a picture's channels; the fold multiplies those going in
    unfold = {1: 1, 4: 2, 16: 4}.get(folded_in // channels) if folded_in % channels == 0 else None
    if unfold is None:
        raise UpscalerFileError(f"an RRDBNet taking {folded_in} channels to give {channels}: not a layout this "
                                "server knows")
    blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("body."))
    upsamples = sum(1 for key in state if key.startswith("ups.") and key.endswith(".weight"))
    growth = state["body.0.rdb1.conv1.weight"].shape[0]
    if 2 ** upsamples < unfold:
        raise UpscalerFileError(f"an RRDBNet that folds the picture {unfold}x but doubles it {upsamples} times: it "
                                "would shrink it")
    return RRDBNet(channels, channels, features, blocks, growth, upsamples, unfold)


def _srvgg_for(state: dict[str, torch.Tensor], name: str) -> SRVGGNetCompact:
    conv_keys = sorted((int(k.split(".")[1]) for k in state if k.endswith(".weight") and state[k].ndim == 4))
    activations = [state.get(f"body.{i}.weight") for i in range(1, conv_keys[-1], 2)]
    if any(weight is None or weight.ndim != 1 for weight in activations):
        raise UpscalerFileError(f"{name}: a compact network without PReLU activations is not built here")
    features, in_channels = state["body.0.weight"].shape[:2]
    out_channels = in_channels
    scale = round((state[f"body.{conv_keys[-1]}.weight"].shape[0] / out_channels) ** 0.5)
    return SRVGGNetCompact(in_channels, out_channels, features, len(conv_keys) - 2, scale)


def upscale_tensor(network: nn.Module, picture: torch.Tensor, tile: int = 192, margin: int = 16) -> torch.Tensor:
    """The picture (1, C, H, W, values 0..1, on the network's device and dtype) enlarged by the network's scale,
    `tile` pixels square at a time so memory stays bounded on large pictures. Each tile is run with `margin` pixels
    of the picture around it and only its own part of the result is kept, so tiles meet without seams."""
    height, width = picture.shape[-2:]
    scale = network.scale
    out = picture.new_empty((*picture.shape[:-2], height * scale, width * scale))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - margin, 0), max(left - margin, 0)
            y1, x1 = min(bottom + margin, height), min(right + margin, width)
            result = network(picture[..., y0:y1, x0:x1])
            out[..., top * scale:bottom * scale, left * scale:right * scale] = result[
                ..., (top - y0) * scale:(bottom - y0) * scale, (left - x0) * scale:(right - x0) * scale]
    return out.clamp_(0, 1)


def weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], shown: int = 4) -> str:
    """A short account of how a weights table differs from a network's (missing, unexpected and wrong-shaped keys,
    a few of each), or '' where it matches: what a refused weight file's message says."""
    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} is {list(found[key].shape)}, expected {list(expected[key].shape)}"
                for key in expected if key in found and found[key].shape != expected[key].shape]
    parts = [f"{what} {listed(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape:", reshaped)) if keys]
    return "; ".join(parts)


def load_network(path: Path, build, what: str, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The network `build()` makes, with the weights table `state` read from `path`, in eval mode on `device` as
    `dtype`. It is built on the meta device (the weights come from the file: no memory spent twice). BatchNorm's step
    counters, which inference never reads and files saved by old PyTorch lack, are filled in. A table that does not
    fit raises ValueError: "<file> is not <what> of this layout: <the differences>"."""
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, torch.zeros((), dtype=torch.long))
    problems = weights_mismatch(expected, state)
    if problems:
        raise ValueError(f"{path.name} is not {what} of this layout: {problems}")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
