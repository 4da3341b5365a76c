"""The GPU fast path: channels-last memory, SDPA attention, and torch.compile of the UNet and VAE decoder.

Every change keeps the maths of the pipeline the same, so a seed gives the same picture (up to
floating-point reordering) with and without it; bench/gpu_speed.py measures the gain and checks that.

Compiling is on by default on a CUDA GPU where it is safe (`compile_choice`), off elsewhere; --compile
and --no-compile decide instead. A compile that fails is undone and the model runs uncompiled.
"""
from __future__ import annotations

import functools
import importlib

import os
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

# A new size, batch size, prompt length (75-token chunks), CFG on/off or timestep dtype (samplers differ)
# compiles another variant of the UNet and keeps its CUDA graphs. torch counts variants per model class for
# the whole process: past this many, shapes it has not seen run uncompiled (for every model loaded later too),
# while the variants already compiled keep running compiled. torch's default is the same; set here so the
# bound does not move with torch.
MAX_COMPILED_VARIANTS = 8
# What torch raises when the compiler itself fails; an error in the model's own ops is not among them.
COMPILER_FAILURES = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError)


def compile_choice(wanted: bool | None, *, device: str, offloading: bool, xformers: bool,
                   zerogpu: bool, inpainting_model: bool = False) -> tuple[bool, str]:
    """Whether to compile, and why. wanted: True (--compile), False (--no-compile), None (decide here)."""
    if inpainting_model:  # its UNet's extra input comes through a hook per run, which a compiled graph would bake in
        return False, "an inpainting model runs uncompiled"
    if wanted is not None:
        return wanted, "--compile" if wanted else "--no-compile"
    if device != "cuda":
        return False, f"{device}: compiling pays only on a CUDA GPU (--compile to force)"
    if offloading:
        return False, "--medvram/--lowvram move weights during a run, which compiled CUDA graphs cannot follow"
    if xformers and xformers_works():
        return False, "--xformers attention cannot be compiled"
    if zerogpu:
        return False, "on ZeroGPU the GPU exists only inside each call's forked process, not at load time"
    if not _triton_works():
        return False, "Triton is missing or this GPU is older than compute capability 7.0"
    # --xformers without xformers (its wheel failed to install, as on Colab now and then) would otherwise
    # leave the GPU with plain attention and no compile: the slowest of the three.
    return True, "CUDA GPU with Triton" + (" (--xformers ignored: xformers does not work with this torch)"
                                           if xformers else "")


@functools.cache
def xformers_works() -> bool:
    """Whether xformers' attention works here. A wheel built for another torch either fails to import or
    imports with a warning that its C++/CUDA extensions did not load (`_has_cpp_library` is then False)."""
    try:
        importlib.import_module("xformers.ops")
    except Exception:  # ImportError, or the errors a mismatched binary raises while loading
        return False
    return bool(getattr(importlib.import_module("xformers"), "_has_cpp_library", True))


class CompiledShapes:
    """The input shapes that the compiled UNet and VAE decoder have run with. torch keeps one compiled
    variant per shape (up to MAX_COMPILED_VARIANTS), so an unseen shape means a wait for a compile first.
    torch shares variants between the models of one class, so one record serves every model loaded."""

    def __init__(self):
        self._seen: dict[str, set[tuple]] = {"UNet": set(), "VAE decoder": set()}

    def pending(self, keys: dict[str, set[tuple]]) -> list[str]:
        """The parts that will compile for these shapes (a part may run at several: prompt editing can change
        the prompt's length mid-run), in the order they run."""
        return [part for part, shapes in keys.items()
                if shapes - self._seen[part] and len(self._seen[part]) < MAX_COMPILED_VARIANTS]

    def record(self, keys: dict[str, set[tuple]]) -> None:
        for part, shapes in keys.items():
            self._seen[part] |= shapes


def _triton_works() -> bool:
    from torch.utils._triton import has_triton

    return has_triton() and torch.cuda.get_device_capability() >= (7, 0)


def use_compile_cache(folder: Path) -> None:
    """Keep torch.compile's artefacts in a folder that survives restarts (/tmp, torch's default, does not
    on Colab, Spaces or after a reboot), so the second start reuses the compiled kernels. Call it before the
    first compile; a TORCHINDUCTOR_CACHE_DIR that the user set is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder.mkdir(parents=True, exist_ok=True)
    # Importing torch._dynamo already writes torch's default into the variable, so "unset" is not enough.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    # The caches of compiled graphs and kernels are on by default in torch >= 2.4; they follow this folder.


def apply_fast_path(pipe, *, compile: bool, channels_last: bool = True, backend: str = "inductor",
                    fused_qkv: bool = False):
    """Make `pipe` (a diffusers SD pipeline) faster in place and return it.

    compile: wrap the UNet and the VAE decoder with torch.compile. The first generation at each new
        size or batch size then pays a compile (tens of seconds on a GPU) before it runs faster.
    backend: torch.compile's backend; tests on a CPU pass "eager" to check the wiring cheaply.
    fused_qkv: one matmul for the query, key and value projections (key and value in cross-attention).
        Not on in the engine: bench/gpu_speed.py --tune measures it first. diffusers keeps the unfused
        weights too, so it costs their memory again.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        # SDPA picks flash / memory-efficient kernels on CUDA; this also undoes an earlier xformers
        # or sliced-attention choice, which torch.compile cannot trace as well.
        model.set_attn_processor(AttnProcessor2_0())
        if fused_qkv:
            model.fuse_qkv_projections()  # also sets diffusers' fused SDPA processor
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
        torch._dynamo.config.recompile_limit = MAX_COMPILED_VARIANTS
        for module in (pipe.unet, pipe.vae.decoder):
            module.compile(**options)
            _hand_out_copies(module)
    return pipe


def _hand_out_copies(module) -> None:
    """CUDA graphs write every call's outputs into the same buffers, so an output kept past the next call
    would be overwritten (torch raises when it is read). PLMS keeps its last UNet outputs when CFG is off.
    A copy as the output leaves the graph costs microseconds at SD sizes."""
    compiled_call = module._compiled_call_impl

    def call(*args, **kwargs):
        return tree_map_only(torch.Tensor, torch.clone, compiled_call(*args, **kwargs))

    module._compiled_call_impl = call


def uncompiled():
    """A block in which compiled models run eagerly: for calls whose shapes vary from call to call (VAE
    tiles, whose edge tiles are smaller; the first-image preview), which would each compile a variant."""
    return torch.compiler.set_stance("force_eager")


def undo_compile(pipe) -> None:
    """Run the UNet and VAE decoder uncompiled again (after the compiler failed); the rest of the fast
    path (SDPA, channels-last) stays. nn.Module has no public way back, so reset what .compile() set."""
    for module in (pipe.unet, pipe.vae.decoder):
        module._compiled_call_impl = None


def is_compiled(pipe) -> bool:
    return getattr(pipe.unet, "_compiled_call_impl", None) is not None
