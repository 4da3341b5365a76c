"""CodeFormer, the face restoration network behind A1111's "CodeFormer" face restorer (codeformer-v0.1.0.pth).

A 512x512 aligned face goes through a VQGAN-style encoder down to a 16x16 grid of features; a transformer reads
that grid and predicts, for every cell, an entry of a learned codebook of clean face parts; the VQGAN generator
decodes the chosen entries back to a face. The fidelity weight `w` blends in the encoder's own features at the
middle resolutions (32 to 256): w=0 trusts the codebook alone (the most "restored" look), w=1 stays closest to the
input face.

Module and attribute names follow the published weight file's keys (`encoder.blocks.N`, `quantize.embedding`,
`ft_layers.N.self_attn`, `fuse_convs_dict.32.encode_enc`, ...), so the file loads as it is.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from webui.engine.upscaler_nets import load_network, read_weights


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection only where the skip path has to change width
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, added back to it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        normed = self.norm(x)
        # (N, C, H, W) -> (N, 1 head, HW, C)
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(attended.squeeze(1).transpose(1, 2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # padding only right and bottom keeps the halved grid aligned with the top-left pixel, as trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """The VQGAN encoder. `taps` maps each resolution (as a string, "256") to the index of the block whose output
    is that resolution's feature for the fidelity fusion: the level's last ResBlock."""

    def __init__(self, nf: int, emb_dim: int, ch_mult: tuple[int, ...], res_blocks: int, img_size: int,
                 attn_resolutions: tuple[int, ...]):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, padding=1)]
        self.taps: dict[str, int] = {}
        resolution, channels = img_size, nf
        for level, mult in enumerate(ch_mult):
            for _ in range(res_blocks):
                blocks.append(ResBlock(channels, nf * mult))
                channels = nf * mult
                self.taps[str(resolution)] = len(blocks) - 1
                if resolution in attn_resolutions:
                    blocks.append(SpatialAttention(channels))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(channels))
                resolution //= 2
        blocks += [ResBlock(channels, channels), SpatialAttention(channels), ResBlock(channels, channels),
                   _group_norm(channels), nn.Conv2d(channels, emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)


class Generator(nn.Module):
    """The VQGAN decoder. `fuse_points` maps each resolution to the index of the block after which the encoder's
    feature of that resolution is fused in: the level's first ResBlock, except at the coarsest level (16), where
    it is the level's last ResBlock (the published network's layout)."""

    def __init__(self, nf: int, emb_dim: int, ch_mult: tuple[int, ...], res_blocks: int, img_size: int,
                 attn_resolutions: tuple[int, ...]):
        super().__init__()
        channels = nf * ch_mult[-1]
        resolution = img_size // 2 ** (len(ch_mult) - 1)
        blocks: list[nn.Module] = [nn.Conv2d(emb_dim, channels, 3, padding=1), ResBlock(channels, channels),
                                   SpatialAttention(channels), ResBlock(channels, channels)]
        self.fuse_points: dict[str, int] = {}
        for level in reversed(range(len(ch_mult))):
            coarsest = level == len(ch_mult) - 1
            for index in range(res_blocks):
                blocks.append(ResBlock(channels, nf * ch_mult[level]))
                channels = nf * ch_mult[level]
                if index == 0 or coarsest:
                    self.fuse_points[str(resolution)] = len(blocks) - 1
                if resolution in attn_resolutions:
                    blocks.append(SpatialAttention(channels))
            if level != 0:
                blocks.append(Upsample(channels))
                resolution *= 2
        blocks += [_group_norm(channels), nn.Conv2d(channels, 3, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)


class Codebook(nn.Module):
    """The VQGAN's learned dictionary of latent face parts ("nearest" quantizer)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    def lookup(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, H*W) codebook indices -> (N, dim, H, W) latent features."""
        features = self.embedding(codes)
        return features.transpose(1, 2).reshape(codes.shape[0], -1, height, width)


class TransformerLayer(nn.Module):
    """A pre-norm transformer encoder layer whose queries and keys carry the position embedding."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        query = normed + position
        tokens = tokens + self.self_attn(query, query, normed, need_weights=False)[0]
        return tokens + self.linear2(F.gelu(self.linear1(self.norm2(tokens))))


class FidelityFusion(nn.Module):
    """Controllable feature transformation: a scale and shift computed from the encoder's and the generator's
    features, applied to the generator's features in proportion to the fidelity weight w."""

    def __init__(self, channels: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels)
        self.scale = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2, True),
                                   nn.Conv2d(channels, channels, 3, padding=1))
        self.shift = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2, True),
                                   nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, encoded: torch.Tensor, decoded: torch.Tensor, w: float) -> torch.Tensor:
        both = self.encode_enc(torch.cat([encoded, decoded], dim=1))
        return decoded + w * (decoded * self.scale(both) + self.shift(both))


def match_mean_std(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation: `content` re-scaled so each channel has `style`'s mean and standard
    deviation (unbiased variance plus eps), carrying the input face's colour and lighting into the codebook
    features."""
    def mean_std(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = features.flatten(2)
        return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]

    content_mean, content_std = mean_std(content)
    style_mean, style_std = mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


class CodeFormer(nn.Module):
    """CodeFormer at the published configuration by default (the arguments A1111 and the CodeFormer release use);
    smaller ones are for tests. `connect_list`: the resolutions where the fidelity fusion acts."""

    def __init__(self, dim_embd: int = 512, n_head: int = 8, n_layers: int = 9, codebook_size: int = 1024,
                 latent_size: int | None = 256, connect_list=("32", "64", "128", "256"), img_size: int = 512,
                 nf: int = 64, ch_mult=(1, 2, 2, 4, 4, 8), quantizer: str = "nearest", res_blocks: int = 2,
                 attn_resolutions=(16,), emb_dim: int = 256):
        super().__init__()
        if quantizer != "nearest":
            raise ValueError(f"CodeFormer's quantizer is 'nearest'; {quantizer!r} is not built here")
        self.img_size = img_size
        self.latent_side = img_size // 2 ** (len(ch_mult) - 1)
        if latent_size is not None and latent_size != self.latent_side ** 2:
            raise ValueError(f"latent_size {latent_size} does not fit img_size {img_size} and ch_mult {list(ch_mult)}: "
                             f"the latent grid is {self.latent_side}x{self.latent_side} = {self.latent_side ** 2}")
        levels = {str(img_size // 2 ** level): nf * mult for level, mult in enumerate(ch_mult)}
        unknown = [size for size in connect_list if size not in levels]
        if unknown:
            raise ValueError(f"connect_list {unknown} names no resolution of this network ({', '.join(levels)})")
        self.connect_list = [str(size) for size in connect_list]
        attn_resolutions = tuple(attn_resolutions)

        self.encoder = Encoder(nf, emb_dim, tuple(ch_mult), res_blocks, img_size, attn_resolutions)
        self.quantize = Codebook(codebook_size, emb_dim)
        self.generator = Generator(nf, emb_dim, tuple(ch_mult), res_blocks, img_size, attn_resolutions)

        self.position_emb = nn.Parameter(torch.zeros(self.latent_side ** 2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*(TransformerLayer(dim_embd, n_head, dim_embd * 2) for _ in range(n_layers)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        self.fuse_convs_dict = nn.ModuleDict({size: FidelityFusion(levels[size]) for size in self.connect_list})

        self._encoder_taps = {self.encoder.taps[size]: size for size in self.connect_list}
        self._fuse_points = {self.generator.fuse_points[size]: size for size in self.connect_list}

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, img_size, img_size) RGB faces in [-1, 1]. Returns (restored faces in about [-1, 1], the
        codebook logits (N, tokens, codebook_size), the encoder's latent features), the reference network's
        tuple, so A1111's `net(face, w=weight, adain=True)[0]` reads the same here."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CodeFormer takes (N, 3, {self.img_size}, {self.img_size}) faces, not {tuple(x.shape)}")
        encoded: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.encoder.blocks):
            x = block(x)
            if index in self._encoder_taps:
                encoded[self._encoder_taps[index]] = x
        latent = x

        tokens = self.feat_emb(latent.flatten(2).transpose(1, 2))  # (N, H*W, dim_embd)
        for layer in self.ft_layers:
            tokens = layer(tokens, self.position_emb)
        logits = self.idx_pred_layer(tokens)

        x = self.quantize.lookup(logits.argmax(dim=2), self.latent_side, self.latent_side)
        if adain:
            x = match_mean_std(x, latent)
        for index, block in enumerate(self.generator.blocks):
            x = block(x)
            if w > 0 and index in self._fuse_points:  # w=0: the codebook's face alone, no fusion work at all
                size = self._fuse_points[index]
                x = self.fuse_convs_dict[size](encoded[size], x, w)
        return x, logits, latent


def load_codeformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **architecture) -> CodeFormer:
    """CodeFormer with the weights of a `.pth` ({"params_ema": ...} or {"params": ...}, read without running
    pickled code) or `.safetensors` file, in eval mode on `device` as `dtype`. `architecture`: CodeFormer
    arguments where they differ from the published configuration (tests' tiny networks). A file whose keys or
    shapes do not fit raises ValueError naming the file and the first differences."""
    path = Path(path)
    return load_network(path, lambda: CodeFormer(**architecture), "a CodeFormer weights file", read_weights(path),
                        device, dtype)
