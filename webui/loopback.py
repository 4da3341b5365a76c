"""A1111's "Loopback" img2img script: each picture made is the next run's picture to start from, `loops` times,
the denoising strength moving from the run's own to a final one along a curve. Pure: the img2img tab runs the
loops through the worker, one job after another.

As in A1111, loop i of a chain uses seed + i (a random seed is picked once), and each Batch count is a chain of
its own that goes on counting seeds from where the last one ended.
"""
from __future__ import annotations

import math
import random

from webui.schemas import MAX_SEED, InvalidRequest

CURVES = ("Aggressive", "Linear", "Lazy")  # A1111's "Denoising strength curve"
MAX_LOOPS = 32  # A1111's slider


def loop_strengths(initial: float, final: float, loops: int, curve: str) -> list[float]:
    """The denoising strength of each loop: `initial` first, `final` last, in between as the curve goes
    (Aggressive moves early, Lazy late, Linear evenly)."""
    if loops == 1:
        return [initial]
    strengths = []
    for loop in range(loops):
        progress = loop / (loops - 1)
        if curve == "Aggressive":
            progress = math.sin(progress * math.pi / 2)
        elif curve == "Lazy":
            progress = 1 - math.cos(progress * math.pi / 2)
        strengths.append(initial + (final - initial) * progress)
    return strengths


def loop_requests(request: dict, loops: int, final_strength: float, curve: str) -> list[list[dict]]:
    """The requests of each chain (one a batch count), loop by loop; InvalidRequest saying what to change."""
    if not 1 <= loops <= MAX_LOOPS:
        raise InvalidRequest(f"Loops: {loops}; use 1 to {MAX_LOOPS}")
    if not 0 <= final_strength <= 1:
        raise InvalidRequest(f"Final denoising strength: {final_strength}; use 0 to 1")
    if curve not in CURVES:
        raise InvalidRequest(f"Denoising strength curve: {curve!r}; choose one of {', '.join(CURVES)}")
    if request.get("batch_size", 1) != 1:
        raise InvalidRequest("Loopback goes on from one picture at a time: set Batch size to 1 (Batch count makes "
                             "several chains)")
    seed = request.get("seed", -1)
    seed = random.randint(0, MAX_SEED) if seed is None or seed < 0 else seed
    strengths = loop_strengths(request.get("denoising_strength", 0.75), final_strength, loops, curve)
    chains = []
    for chain in range(request.get("n_iter", 1)):
        chains.append([request | {"n_iter": 1, "denoising_strength": strength,
                                  "seed": (seed + chain * loops + loop) % (MAX_SEED + 1)}
                       for loop, strength in enumerate(strengths)])
    return chains
