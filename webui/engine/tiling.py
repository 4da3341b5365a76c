"""Tiling (A1111's option): pictures whose right edge runs on into their left and their bottom into their top, so
they tile without a seam (textures, patterns). Every convolution of the UNet and the VAE pads by wrapping around
the picture instead of with zeros, for the one run that asks for it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from webui.engine.fast_path import uncompiled


@contextmanager
def seamless(pipe, on: bool) -> Iterator[None]:
    """A block in which the pipeline's UNet and VAE pad circularly when `on`; their padding is put back after it.
    Compiled models run eagerly in it: their graphs were traced with zero padding."""
    if not on:
        yield
        return
    convolutions = [module for part in (pipe.unet, pipe.vae) for module in part.modules()
                    if isinstance(module, nn.Conv2d)]
    before = [conv.padding_mode for conv in convolutions]
    for conv in convolutions:
        conv.padding_mode = "circular"
    try:
        with uncompiled():
            yield
    finally:
        for conv, mode in zip(convolutions, before):
            conv.padding_mode = mode
