"""The starting noise of a run: with a variation seed (A1111's "Variation seed" and "Variation strength"), and with
A1111's "Resize seed from width/height".

Each image's noise is drawn from its seed exactly as diffusers draws it (one CPU generator per image, so the
generator is left where the pipeline would leave it for the ancestral samplers' later draws), then moved
towards the noise of its variation seed along the sphere: strength 0 is the seed's picture, 1 the variation
seed's noise, and a small strength a small change of the same picture.

Resize seed from: the seed's noise is drawn at that other size, as a run of that size would draw it, and put in
the middle of the noise at the run's size (cut to fit when it is larger), so a seed keeps its composition when the
size changes. The variation seed's noise is drawn at that size too, as A1111 draws it.
"""
from __future__ import annotations

import torch

from webui.engine.philox import draw, make_generator


def start_noise(generators: list, shape: tuple[int, ...], dtype: torch.dtype,
                subseeds: list[int] | None = None, strength: float = 0.0,
                from_shape: tuple[int, ...] | None = None, source: str = "CPU") -> torch.Tensor:
    """(images, *shape) noise: image i from generators[i] (of the random number `source`, philox.make_generator's);
    drawn at from_shape and put in the middle when it is given; moved `strength` of the way to subseeds[i]'s noise
    when they are given."""
    images = []
    for index, generator in enumerate(generators):
        own = draw(generator, (1, *shape), dtype)  # as diffusers' randn_tensor draws it
        seed = own if from_shape is None else _noise(generator.initial_seed(), from_shape, dtype, source)
        if subseeds is not None:  # (1, channels, height, width): angles per channel, column
            seed = slerp(strength, seed, _noise(subseeds[index], seed.shape[1:], dtype, source))
        images.append(seed if from_shape is None else paste_middle(seed, own))
    return torch.cat(images)


def _noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype, source: str) -> torch.Tensor:
    """A seed's first draw, from a generator of its own."""
    return draw(make_generator(source, seed), (1, *shape), dtype)


def paste_middle(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """`large` with `small` put in its middle (the middle of `small` where it sticks out), by A1111's arithmetic: an
    odd overhang is cut one more on the left (top) and, with its rounding down, one more from the right (bottom)."""
    result = large.clone()
    (small_h, small_w), (large_h, large_w) = small.shape[-2:], large.shape[-2:]
    top, rows, from_top = _placement(small_h, large_h)
    left, cols, from_left = _placement(small_w, large_w)
    result[..., top:top + rows, left:left + cols] = small[..., from_top:from_top + rows, from_left:from_left + cols]
    return result


def _placement(small: int, large: int) -> tuple[int, int, int]:
    """(where in the large side the pasted run starts, its length, where in the small side it starts)."""
    offset = (large - small) // 2  # negative when the small side sticks out; rounded down, as A1111 does
    if offset >= 0:
        return offset, small, 0
    return 0, small + 2 * offset, -offset


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t=0) to `high` (t=1), for (..., channels, height, width) noise. A
    straight blend of two noises has a smaller norm than either, which washes the picture out; along the
    sphere the norm stays that of noise. The angles are taken per channel and column, as A1111 takes them."""
    a, b = low.double(), high.double()
    a_unit, b_unit = a / a.norm(dim=-2, keepdim=True), b / b.norm(dim=-2, keepdim=True)
    cosine = (a_unit * b_unit).sum(-2, keepdim=True).clamp(-1.0, 1.0)
    if cosine.mean() > 0.9995:  # (nearly) the same direction: the blend is as good
        return ((1 - t) * a + t * b).to(low.dtype)
    omega = torch.acos(cosine)
    mixed = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return mixed.to(low.dtype)
