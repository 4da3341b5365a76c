"""The GPU fast path: channels-last memory, SDPA attention, and torch.compile of the UNet and VAE decoder.

Every change keeps the maths of the pipeline the same, so a seed gives the same picture (up to
floating-point reordering) with and without it; bench/gpu_speed.py measures the gain and checks that.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def use_compile_cache(folder: Path) -> None:
    """Keep torch.compile's artefacts in a folder that survives restarts, so the second start
    reuses the compiled kernels instead of compiling again. Set before the first compile."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def apply_fast_path(pipe, *, compile: bool, channels_last: bool = True, backend: str = "inductor"):
    """Make `pipe` (a diffusers SD pipeline) faster in place and return it.

    compile: wrap the UNet and the VAE decoder with torch.compile. The first generation at each new
        size or batch size then pays a compile (tens of seconds on a GPU) before it runs faster.
    backend: torch.compile's backend; tests on a CPU pass "eager" to check the wiring cheaply.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        # SDPA picks flash / memory-efficient kernels on CUDA; this also undoes an earlier xformers
        # or sliced-attention choice, which torch.compile cannot trace as well.
        model.set_attn_processor(AttnProcessor2_0())
        if channels_last:
            # cuDNN's convolutions run natively in NHWC; NCHW weights cost a layout transpose per conv.
            model.to(memory_format=torch.channels_last)
    if compile:
        # reduce-overhead: CUDA graphs replay the ~1000 kernel launches of a UNet step as one, which is
        #   where batch-1 time goes. max-autotune is never used: it benchmarks kernel variants for
        #   minutes at every new shape, too slow for a UI that switches models and sizes on demand.
        # fullgraph=False: a graph break (a LoRA hook, a callback) falls back to eager instead of failing.
        # dynamic=False: SD shapes are fixed per size and batch, and static shapes give the fastest kernels;
        #   a new size recompiles once.
        # Module.compile (not torch.compile(module)) keeps the class and state_dict keys, so LoRA loading,
        #   from_pipe and model switching see the same modules as before.
        options = dict(fullgraph=False, dynamic=False, backend=backend)
        if backend == "inductor":  # the modes are inductor's; other backends warn about them
            options["mode"] = "reduce-overhead"
        pipe.unet.compile(**options)
        pipe.vae.decoder.compile(**options)
    return pipe
