"""What the UNet hooks share (composed prompts, Skip Early CFG and NGMS, instruct-pix2pix's image guidance,
ControlNet, the extra input channels): the prediction taken out of the UNet's output and put back, and hooks that
come off again however a pass ends."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def with_prediction(output, change: Callable[[torch.Tensor], torch.Tensor]):
    """The UNet's output (a tuple, or diffusers' output dataclass) with its prediction, the first field, changed."""
    if isinstance(output, tuple):
        return (change(output[0]), *output[1:])
    key = next(iter(output.keys()))
    output[key] = change(output[key])
    return output


@contextlib.contextmanager
def removed_after(handles: list) -> Iterator[None]:
    """Inside, the hooks whose handles these are stay on; they come off when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
