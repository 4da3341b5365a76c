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


@contextlib.contextmanager
def stoppable_inside_calls(unet, check: Callable[[], None]) -> Iterator[None]:
    """Inside, `check` runs before each of the UNet's blocks and each residual and transformer layer in them, so that
    an Interrupt or a Skip (which it raises) is heard within a model call too: on a CPU one call at a large size takes
    minutes, and one of its blocks a minute or more at 2048x2048. Not on a compiled UNet, whose graph the hooks would
    break and whose calls are quick."""
    if getattr(unet, "_compiled_call_impl", None) is not None:
        yield
        return
    blocks = [block for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if block is not None]
    layers = [layer for block in blocks for layer in block.modules() if type(layer).__name__ in _CHECKED_LAYERS]
    handles = [module.register_forward_pre_hook(lambda module, args: check()) for module in (*blocks, *layers)]
    with removed_after(handles):
        yield


_CHECKED_LAYERS = ("ResnetBlock2D", "BasicTransformerBlock")  # diffusers' own, by class name (SD and SDXL UNets)
