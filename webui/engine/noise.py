"""The starting noise of a run with a variation seed (A1111's "Variation seed" and "Variation strength").

Each image's noise is drawn from its seed exactly as diffusers draws it (one CPU generator per image, so the
generator is left where the pipeline would leave it for the ancestral samplers' later draws), then moved
towards the noise of its variation seed along the sphere: strength 0 is the seed's picture, 1 the variation
seed's noise, and a small strength a small change of the same picture.
"""
from __future__ import annotations

import torch


def variation_noise(generators: list[torch.Generator], subseeds: list[int], strength: float,
                    shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(images, *shape) noise: image i from generators[i], moved `strength` of the way to subseeds[i]'s."""
    images = []
    for generator, subseed in zip(generators, subseeds):
        own = torch.randn((1, *shape), generator=generator, dtype=dtype)  # as diffusers' randn_tensor draws it
        variation = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(subseed), dtype=dtype)
        images.append(slerp(strength, own, variation))  # (1, channels, height, width): angles per channel, column
    return torch.cat(images)


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
