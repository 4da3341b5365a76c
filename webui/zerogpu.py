"""ZeroGPU support on Hugging Face Spaces, active only where it exists.

On a ZeroGPU Space (the runtime sets SPACES_ZERO_GPU=true and ships the `spaces` package) the process has
no GPU of its own: a GPU is lent for the length of each call to a function decorated with `spaces.GPU`,
and that call runs in a forked child process. Everywhere else this module changes nothing and `spaces`
is never imported, so it is no dependency.

What that means here:
- `Engine.generate` is the GPU call. Its arguments and results cross a process boundary by pickling, so
  the per-step callback (a closure over the job, with its cancel/skip events) cannot go along: on ZeroGPU
  progress moves per batch, and Interrupt/Skip act between batches instead of between steps.
- `spaces` patches torch so that `.to("cuda")` outside a GPU call is recorded and replayed in the child.
  Its patch is thread-local, and models are loaded on the worker thread, so that thread enters it too.
- The child is forked from the process as it was when the GPU was lent and may be kept for the next call,
  so the model is chosen when the Space starts (WEBUI_CKPT); switching models later is refused with a
  message rather than silently generating with the old one.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from webui.engine.hires import hires_size

log = logging.getLogger(__name__)


def zerogpu_requested(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def load_spaces() -> Any | None:
    """The `spaces` module on a ZeroGPU Space, else None (and nothing imported)."""
    if not zerogpu_requested():
        return None
    try:
        import spaces  # noqa: PLC0415 -- optional; must come before anything initialises CUDA
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is missing; running without ZeroGPU")
        return None
    return spaces


def gpu_seconds(request, seeds, subseeds=None, init_image=None, inpainting=None, control=None,
                color_reference=None) -> int:
    """ZeroGPU's duration estimate for one batch (it is a budget, so keep it close): an SD 1.5 step at
    512x512 takes well under 0.1 s on the lent GPU; moving the weights in takes a few seconds."""
    width, height = request.width or 512, request.height or 512
    step_seconds = request.denoising_steps * _megapixels(width, height)
    if request.enable_hr:  # the second pass runs at the larger size
        size = hires_size(width, height, request.hr_scale, request.hr_resize_x, request.hr_resize_y)
        step_seconds += request.hires_steps * _megapixels(*size.final)
    return int(min(120, max(20, 10 + 0.15 * step_seconds * len(seeds))))


def _megapixels(width: int, height: int) -> float:
    """The size in units of 512x512 (at least one)."""
    return max(1.0, width * height / (512 * 512))


def wrap_engine(engine):
    """On ZeroGPU, run engine.generate on a lent GPU and pin the model chosen at start; else return as is.

    Called once in build_services, right after the Engine is made and before any model is loaded.
    """
    spaces = load_spaces()
    if spaces is None:
        return engine
    from webui.engine.loader import ModelLoadError

    run_batch = engine.generate  # the bound method; the forked child runs its own copy of the engine

    @spaces.GPU(duration=gpu_seconds)
    def generate_on_gpu(request, seeds, subseeds, init_image, inpainting, control, color_reference):
        return run_batch(request, seeds, None, subseeds, init_image, inpainting, control, color_reference)

    def generate(request, seeds, on_step=None, subseeds=None, init_image=None, inpainting=None, control=None,
                 color_reference=None):
        # on_step stays behind: it closes over thread events that cannot cross into the GPU process.
        return generate_on_gpu(request, seeds, subseeds, init_image, inpainting, control, color_reference)

    load_model = engine.load
    entered: set[int] = set()

    def load(name: str):
        _enter_torch_mode(spaces, entered)
        if engine.model is not None and engine.registry.find(name) != engine.model.entry:
            raise ModelLoadError(
                f"on ZeroGPU the model is chosen when the Space starts ({engine.model.entry.name} now); set the "
                f"Space variable WEBUI_CKPT={name} and restart the Space to use {name!r}."
            )
        return load_model(name)

    engine.generate = generate
    engine.load = load
    # SD upscale's and Extras' model upscalers and Interrogate run outside the GPU call, where no GPU is lent: on
    # the CPU.
    engine.tool_device_name = "cpu"
    # The GPU is lent per call to a forked process, and given back after it: there is nothing to release.
    engine.release_device = lambda: False
    log.info("ZeroGPU: generation runs on a lent GPU (spaces.GPU); progress is reported per batch")
    return engine


def _enter_torch_mode(spaces, entered: set[int]) -> None:
    """Enter ZeroGPU's torch emulation on this thread once (it is thread-local)."""
    ident = threading.get_ident()
    if ident in entered:
        return
    entered.add(ident)
    try:
        from spaces.zero import torch as zero_torch  # noqa: PLC0415
    except ImportError:
        return
    if threading.current_thread() is not threading.main_thread():  # the main thread entered it on import
        zero_torch.enter_mode()
