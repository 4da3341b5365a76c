"""A1111's "Loopback" img2img script: each picture made is the next run's picture to start from, `loops` times,
the denoising strength moving from the run's own to a final one along a curve. Pure: the img2img tab runs the
loops through the worker, one job after another.

As in A1111, loop i of a chain uses seed + i (a random seed, and variation seed, is picked once), each Batch
count is a chain of its own that goes on counting seeds from where the last one ended, and inpainting's loops
after the first start the masked part from the picture the loop before made (masked content "original").
"""
from __future__ import annotations

import math

from PIL import Image

from webui.engine.img2img import fit_image, size_from_image
from webui.engine.inpaint import MASK_RESAMPLE, read_mask
from webui.schemas import MASKED_CONTENT, InvalidRequest, random_seed, seed_after

CURVES = ("Aggressive", "Linear", "Lazy")  # A1111's "Denoising strength curve"
# A1111's "Append interrogated prompt at each iteration": its DeepBooru tagger is not offered here
INTERROGATIONS = ("None", "CLIP")
MAX_LOOPS = 32  # A1111's slider
ORIGINAL = MASKED_CONTENT.index("original")


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
    seed, subseed = (_fixed(request.get(field)) for field in ("seed", "subseed"))
    strengths = loop_strengths(request.get("denoising_strength", 0.75), final_strength, loops, curve)
    chains = []
    for chain in range(request.get("n_iter", 1)):
        chains.append([request | {"n_iter": 1, "denoising_strength": strength, "subseed": subseed,
                                  "script_params": {"Final denoising strength": final_strength,
                                                    "Denoising curve": curve},
                                  "seed": seed_after(seed, chain * loops + loop)}
                       # As A1111, a loop after the first inpaints from the picture the loop before made.
                       | ({"inpainting_fill": ORIGINAL} if loop and "inpainting_fill" in request else {})
                       for loop, strength in enumerate(strengths)])
    return chains


def with_interrogation(prompt: str, described: str) -> str:
    """A loop's prompt under "Append interrogated prompt": the run's prompt, then what Interrogate CLIP says of the
    loop's start picture, as A1111 joins them."""
    return f"{prompt}, {described}" if prompt else described


def loop_mask(mask: Image.Image | None, picture: Image.Image, request: dict) -> Image.Image | None:
    """The mask for the loops after the first, which start from a picture of the run's size: the first loop's
    mask as its resize mode fitted it ("Only masked" keeps the picture's size, and the mask as it is)."""
    if mask is None or request.get("inpaint_full_res"):
        return mask
    width, height = size_from_image(picture, request.get("width"), request.get("height"))
    return fit_image(read_mask(mask, picture.size), width, height, request.get("resize_mode", 0), MASK_RESAMPLE)


def _fixed(seed: int | None) -> int:
    """A seed picked once for all loops where it is random (-1)."""
    return random_seed() if seed is None or seed < 0 else seed
