"""GFPGAN v1 "clean", the face restoration network behind A1111's "GFPGAN" face restorer (GFPGANv1.4.pth).

An aligned 512x512 face goes down a U-Net encoder to a 4x4 feature map, which a linear layer turns into StyleGAN2
style latents (one per decoder layer). On the way back up, the U-Net's features at every resolution are turned
into per-pixel scales and shifts (spatial feature transform, SFT) that steer a pretrained StyleGAN2 generator, so
the generator's face prior is bent towards the person in the input.

"Clean" is the variant built from plain PyTorch ops (no compiled upfirdn2d / fused leaky ReLU): upsampling is
bilinear interpolation. Module and attribute names follow the published weight file's keys (`conv_body_down.N`,
`condition_scale.N`, `stylegan_decoder.style_convs.N.modulated_conv`, `stylegan_decoder.noises.noiseN`, ...), so
the file loads as it is.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from webui.engine.upscaler_nets import load_network, read_weights


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class NormStyleCode(nn.Module):
    """Scales each style code to unit root-mean-square along dim 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dim 1 as the reference has it: for the (N, layers, features) codes of different_w with input_is_latent
        # False that is the layer axis, not the features; the published configuration never runs this
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's convolution: the style scales the weight per input channel (per sample), and demodulation
    rescales each output channel's weight to unit norm. No bias; `upsample` doubles the input (bilinear) first."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.demodulate = demodulate
        self.upsample = upsample
        self.modulation = nn.Linear(num_style_feat, in_channels)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
                                   / math.sqrt(in_channels * kernel_size ** 2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        n, in_channels = x.shape[:2]
        _, out_channels, _, k, _ = self.weight.shape
        weight = self.weight * self.modulation(style).view(n, 1, in_channels, 1, 1)  # (N, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4)) + 1e-8).view(n, out_channels, 1, 1, 1)
        if self.upsample:
            x = _upsample(x)
        # every sample has its own weights: fold the batch into channels and convolve in N groups
        height, width = x.shape[-2:]
        out = F.conv2d(x.reshape(1, n * in_channels, height, width),
                       weight.reshape(n * out_channels, in_channels, k, k), padding=k // 2, groups=n)
        return out.view(n, out_channels, *out.shape[-2:])


class StyleConv(nn.Module):
    """A modulated 3x3 convolution, then scaled noise, a bias and leaky ReLU. `weight` is the noise strength."""

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2 ** 0.5  # the sqrt(2) gain of StyleGAN2's fused leaky ReLU
        return F.leaky_relu(out + self.weight * noise + self.bias, 0.2)


class ToRGB(nn.Module):
    """A modulated 1x1 convolution to RGB (no demodulation), added to the upsampled picture so far."""

    def __init__(self, in_channels: int, num_style_feat: int):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, picture: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        return out if picture is None else out + _upsample(picture)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))


class StyleGAN2GeneratorCSFT(nn.Module):
    """The StyleGAN2 generator (4x4 up to out_size, two style convs and a to-RGB per doubling), with the SFT
    scale and shift applied after each level's first (upsampling) conv: to the second half of the channels with
    `sft_half`, to all of them otherwise. `noises` holds one fixed noise map per style conv (buffers)."""

    def __init__(self, out_size: int, num_style_feat: int, num_mlp: int, channel_multiplier: int, narrow: float,
                 sft_half: bool):
        super().__init__()
        self.sft_half = sft_half
        log_size = out_size.bit_length() - 1
        # style latents: 2 at 4x4 (conv, to-RGB), then 2 per doubling (a doubling's first conv shares its latent
        # with the to-RGB before it)
        self.num_latent = log_size * 2 - 2
        channels = _channels(channel_multiplier, narrow)

        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)

        self.constant_input = ConstantInput(channels[4], 4)
        self.style_conv1 = StyleConv(channels[4], channels[4], num_style_feat)
        self.to_rgb1 = ToRGB(channels[4], num_style_feat)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = channels[4]
        for level in range(3, log_size + 1):
            out_channels = channels[2 ** level]
            self.style_convs.append(StyleConv(in_channels, out_channels, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_channels, out_channels, num_style_feat))
            self.to_rgbs.append(ToRGB(out_channels, num_style_feat))
            in_channels = out_channels

        # noise0 is 4x4 (style_conv1), then two maps per doubling: noise1, noise2 at 8x8, noise3, noise4 at 16x16...
        self.noises = nn.Module()
        for index in range(len(self.style_convs) + 1):
            side = 2 ** ((index + 5) // 2)
            self.noises.register_buffer(f"noise{index}", torch.randn(1, 1, side, side))

    def forward(self, latent: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """latent: (N, num_latent, num_style_feat); conditions: one (scale, shift) per doubling. The stored noise
        maps are used, so the same face always gives the same output (see GFPGANv1Clean.forward)."""
        noise = [getattr(self.noises, f"noise{index}") for index in range(len(self.style_convs) + 1)]
        out = self.constant_input.weight.expand(latent.shape[0], -1, -1, -1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        picture = self.to_rgb1(out, latent[:, 1])
        for level, (scale, shift) in enumerate(conditions):
            first, i = 2 * level, 2 * level + 1  # index of the level's first conv; of its first latent
            out = self.style_convs[first](out, latent[:, i], noise[first + 1])
            if self.sft_half:
                half = out.shape[1] // 2
                out = torch.cat([out[:, :half], out[:, half:] * scale + shift], dim=1)
            else:
                out = out * scale + shift
            out = self.style_convs[first + 1](out, latent[:, i + 1], noise[first + 2])
            picture = self.to_rgbs[level](out, latent[:, i + 2], picture)
        return picture


class ResBlock(nn.Module):
    """The U-Net's residual block: conv, bilinear resize (`scale` 0.5 or 2), conv; a 1x1 conv on the resized skip."""

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._resize(F.leaky_relu(self.conv1(x), 0.2))
        out = F.leaky_relu(self.conv2(out), 0.2)
        return out + self.skip(self._resize(x))


def _channels(channel_multiplier: float, narrow: float) -> dict[int, int]:
    """Feature channels at each resolution (the reference's table, with its float products truncated alike)."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512}
    wide.update({64: 256 * channel_multiplier, 128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
                 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier})
    return {side: int(base * narrow) for side, base in wide.items()}


def _sft_block(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(channels, out_channels, 3, padding=1))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1 clean. The defaults are the published GFPGANv1.3/1.4 configuration (the arguments gfpgan's
    GFPGANer and A1111 build it with); gfpgan's own class defaults differ. Smaller configurations are for tests.
    The reference's decoder_load_path and fix_decoder only matter for training and are left out.

    out_size: face side (a power of two, 8 to 1024); different_w: one style latent per decoder layer (else one
    shared); input_is_latent: the encoder's codes go to the decoder as they are (else through its style MLP);
    narrow: channel width factor (the U-Net has half the decoder's); sft_half: SFT on half the channels."""

    def __init__(self, out_size: int = 512, num_style_feat: int = 512, channel_multiplier: int = 2,
                 num_mlp: int = 8, input_is_latent: bool = True, different_w: bool = True, narrow: float = 1,
                 sft_half: bool = True):
        super().__init__()
        if out_size not in {2 ** power for power in range(3, 11)}:
            raise ValueError(f"GFPGAN's out_size is a power of two from 8 to 1024, not {out_size}")
        self.out_size = out_size
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        log_size = out_size.bit_length() - 1
        # narrow * 0.5 first, as the reference multiplies, so int() truncates the same products
        channels = _channels(channel_multiplier, narrow * 0.5)

        self.conv_body_first = nn.Conv2d(3, channels[out_size], 1)
        self.conv_body_down = nn.ModuleList(
            ResBlock(channels[2 ** level], channels[2 ** (level - 1)], 0.5) for level in range(log_size, 2, -1))
        self.final_conv = nn.Conv2d(channels[4], channels[4], 3, padding=1)
        self.conv_body_up = nn.ModuleList(
            ResBlock(channels[2 ** (level - 1)], channels[2 ** level], 2) for level in range(3, log_size + 1))
        # the U-Net's own RGB outputs: trained as an auxiliary loss, in the file, unused at inference
        self.toRGB = nn.ModuleList(nn.Conv2d(channels[2 ** level], 3, 1) for level in range(3, log_size + 1))
        latents = log_size * 2 - 2 if different_w else 1
        self.final_linear = nn.Linear(channels[4] * 4 * 4, latents * num_style_feat)

        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size, num_style_feat, num_mlp, channel_multiplier,
                                                       narrow, sft_half)
        sft_channels = {2 ** level: channels[2 ** level] * (1 if sft_half else 2) for level in range(3, log_size + 1)}
        self.condition_scale = nn.ModuleList(_sft_block(channels[side], out) for side, out in sft_channels.items())
        self.condition_shift = nn.ModuleList(_sft_block(channels[side], out) for side, out in sft_channels.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, out_size, out_size) RGB faces in [-1, 1]. Returns the restored faces, same shape, clamped to
        [-1, 1] (A1111 clamps there when it turns the output into a picture).

        Noise: A1111 calls `net(face, return_rgb=False)[0]`, which leaves the reference's randomize_noise=True, so
        each call there draws fresh Gaussian noise maps and the same face comes out slightly different each time.
        Here the stored maps (`stylegan_decoder.noises`, the reference's randomize_noise=False) are used instead:
        the same face always gives the same output."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.out_size, self.out_size):
            raise ValueError(f"GFPGAN takes (N, 3, {self.out_size}, {self.out_size}) faces, not {tuple(x.shape)}")
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)

        latent = self.final_linear(feat.flatten(1))
        if self.different_w:
            latent = latent.view(x.shape[0], -1, self.num_style_feat)
        if not self.input_is_latent:
            latent = self.stylegan_decoder.style_mlp(latent)
        if not self.different_w:
            latent = latent.unsqueeze(1).expand(-1, self.stylegan_decoder.num_latent, -1)

        conditions = []
        for skip, up, scale, shift in zip(reversed(skips), self.conv_body_up, self.condition_scale,
                                          self.condition_shift):
            feat = up(feat + skip)
            conditions.append((scale(feat), shift(feat)))
        return self.stylegan_decoder(latent, conditions).clamp(-1, 1)


def load_gfpgan(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                **architecture) -> GFPGANv1Clean:
    """GFPGANv1Clean with the weights of a `.pth` ({"params_ema": ...} or {"params": ...}, read without running
    pickled code) or `.safetensors` file, in eval mode on `device` as `dtype`. `architecture`: GFPGANv1Clean
    arguments where they differ from the published configuration (tests' tiny networks). A file whose keys or
    shapes do not fit raises ValueError naming the file and the first differences.

    float16 is risky: the demodulation sums squared modulated weights, which can pass float16's range (spandrel,
    A1111's loader, marks GFPGAN as not float16-safe, bfloat16-safe)."""
    path = Path(path)
    return load_network(path, lambda: GFPGANv1Clean(**architecture), "a GFPGANv1 clean weights file",
                        read_weights(path), device, dtype)
