"""Float8 matmuls for a UNet's linear layers: Hopper's tensor cores multiply e4m3 numbers at twice the
fp16 rate. An experiment measured by `bench/gpu_speed.py --tune fp8_linear`, not on in the engine: unlike
the fast path it changes the maths (8-bit mantissas of 3 bits), so a seed's picture moves a little.

Each weight is stored in e4m3 with one scale for the whole tensor. Each input is scaled by its own largest
magnitude on every call (dynamic scaling, no calibration run needed), or, after `calibrated()`, by the largest
magnitude a calibration run saw (static scaling): no reduction over the input per call.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# cuBLASLt's fp8 matmul wants both matrix dimensions it reads along in multiples of 16.
ALIGNMENT = 16


def _scale(t: torch.Tensor) -> torch.Tensor:
    """The fp32 scale that maps t's largest magnitude onto e4m3's largest number (1 for an all-zero t)."""
    amax = t.detach().abs().amax().float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _to_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W rounded to e4m3, accumulated in fp32, returned in the layer's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = weight.dtype
        scale = _scale(weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_fp8", _to_fp8(weight, scale))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.input_scale: torch.Tensor | None = None  # static scaling's, once calibrated
        self.seen_amax: torch.Tensor | None = None  # the largest input magnitude while calibrating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.seen_amax is not None:  # calibrating: remember the largest input, and run dynamically
            self.seen_amax = torch.maximum(self.seen_amax, rows.detach().abs().amax().float())
        scale = _scale(rows) if self.input_scale is None else self.input_scale
        y = scaled_product(_to_fp8(rows, scale), scale, self.weight_fp8, self.weight_scale, self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def scaled_product(rows: torch.Tensor, rows_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   out_dtype: torch.dtype, tensor_cores: bool | None = None) -> torch.Tensor:
    """(rows * rows_scale) @ (weight * weight_scale)^T of e4m3 operands, accumulated in fp32. tensor_cores (default:
    on a CUDA device) multiplies in float8 with torch._scaled_mm; otherwise the same operands are multiplied in fp32,
    the same numbers to fp32's rounding, since torch's CPU _scaled_mm is a reference loop some 700 times slower."""
    if rows.is_cuda if tensor_cores is None else tensor_cores:
        # The second operand must be column-major: the transpose of the row-major (out, in) weight is.
        return torch._scaled_mm(rows, weight.t(), scale_a=rows_scale, scale_b=weight_scale, out_dtype=out_dtype)
    return ((rows.float() * rows_scale) @ (weight.float() * weight_scale).t()).to(out_dtype)


@contextlib.contextmanager
def calibrated(model: nn.Module, margin: float = 1.0):
    """Run what needs calibrating inside: afterwards every Fp8Linear of `model` scales its inputs by the largest
    magnitude it saw there (times `margin`), never measuring them again. A layer that saw no input stays dynamic."""
    layers = [module for module in model.modules() if isinstance(module, Fp8Linear)]
    for layer in layers:
        layer.seen_amax = torch.zeros((), device=layer.weight_scale.device)
    try:
        yield
    finally:
        for layer in layers:
            if layer.seen_amax is not None and float(layer.seen_amax) > 0:
                layer.input_scale = (layer.seen_amax * margin / FP8_MAX).clone()  # a plain tensor, not an inference one
            layer.seen_amax = None


def fits(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def use_fp8_linears(model: nn.Module) -> int:
    """Replace, in place, every nn.Linear of `model` whose sizes the fp8 matmul takes; return how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and fits(child):
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    return replaced
