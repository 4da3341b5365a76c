"""A1111's "NV" random number source: the normal numbers torch.randn draws on an NVIDIA card (CUDA's Philox 4x32-10
counter-based generator and its Box-Muller transform), drawn here on the CPU with numpy.

Most pictures shared from A1111 were made with its default "GPU" source on an NVIDIA card. Their start noise is what
PhiloxGenerator(seed).randn draws first, on any device, so their seeds make the same pictures here. A sampler's later
noise (Euler a, DDIM with eta) comes from one more counter step per draw, as A1111's NV source does it (the card
itself moves on differently, so those samplers match A1111's NV pictures, not its GPU ones).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

_MASK = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Philox 4x32's round multipliers
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # and the key's increments between rounds (the golden ratio, sqrt(3) - 1)
_ROUNDS = 10
# curand's Box-Muller constants, float32 as CUDA holds them; the arithmetic is float64, as A1111's NV source does it
_TO_UNIT = float(np.float32(2.3283064e-10))  # 2 ** -32
_TO_ANGLE = float(np.float32(2.3283064e-10 * 6.2831855))  # 2 ** -32 * 2 pi


def philox_4x32(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox 4x32-10 of each column of the four counter words (uint64 arrays holding 32-bit values) under `key`
    (two 32-bit words): four words of random bits per column."""
    words = [np.asarray(word, dtype=np.uint64) for word in counter]
    key0, key1 = key
    for _ in range(_ROUNDS):
        product0, product1 = words[0] * _MULTIPLIERS[0], words[2] * _MULTIPLIERS[1]
        words = [(product1 >> 32) ^ words[1] ^ key0, product1 & _MASK,
                 (product0 >> 32) ^ words[3] ^ key1, product0 & _MASK]
        key0, key1 = (key0 + _KEY_STEPS[0]) & _MASK, (key1 + _KEY_STEPS[1]) & _MASK
    return words


def box_muller(bits_u: np.ndarray, bits_v: np.ndarray) -> np.ndarray:
    """One normal number from two words of random bits (the first of Box-Muller's pair, as torch.randn keeps)."""
    u = bits_u.astype(np.float64) * _TO_UNIT + _TO_UNIT / 2
    angle = bits_v.astype(np.float64) * _TO_ANGLE + _TO_ANGLE / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(angle)).astype(np.float32)


class PhiloxGenerator:
    """A seed's stream of normal numbers as CUDA draws them (see the module's note). Each draw moves the counter on by
    one; get_state and set_state save and restore that, as a torch.Generator's do."""

    device = torch.device("cpu")  # where its numbers are made (diffusers' randn_tensor reads it)

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def initial_seed(self) -> int:
        return self.seed

    def get_state(self) -> int:
        return self.offset

    def set_state(self, offset: int) -> None:
        self.offset = offset

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        count = math.prod(shape)
        zeros = np.zeros(count, dtype=np.uint64)
        counter = [np.full(count, self.offset, dtype=np.uint64), zeros, np.arange(count, dtype=np.uint64), zeros]
        self.offset += 1
        bits = philox_4x32(counter, (self.seed & _MASK, (self.seed >> 32) & _MASK))
        return torch.from_numpy(box_muller(bits[0], bits[1]).reshape(shape)).to(dtype)


def make_generator(source: str, seed: int) -> torch.Generator | PhiloxGenerator:
    """An image's generator for a random number source: "NV" (PhiloxGenerator), else torch's CPU generator."""
    return PhiloxGenerator(seed) if source == "NV" else torch.Generator("cpu").manual_seed(int(seed))


def draw(generator: torch.Generator | PhiloxGenerator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One draw of `shape` normal numbers from either kind of generator (on the CPU)."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape, dtype)
    return torch.randn(shape, generator=generator, dtype=dtype)


def uses_philox(generator) -> bool:
    """Whether a generator, or a list of them, is PhiloxGenerator's."""
    first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
    return isinstance(first, PhiloxGenerator)


def philox_noise(shape: tuple[int, ...], generator, device=None, dtype=None) -> torch.Tensor:
    """diffusers' randn_tensor for PhiloxGenerators: a list of them gives one row each, a single one all of it."""
    if isinstance(generator, (list, tuple)):
        noise = torch.cat([draw(one, (1, *shape[1:]), torch.float32) for one in generator])
    else:
        noise = draw(generator, tuple(shape), torch.float32)
    return noise.to(device=device, dtype=dtype)


def drawing_from_philox(scheduler) -> None:
    """Let the scheduler's modules draw its step noise (diffusers' randn_tensor, which each imports by name) from
    PhiloxGenerators; other generators still go to diffusers' own function. Every module along its class's bases is
    patched: a scheduler of ours may draw in the diffusers step it inherits (DPM2 a). Installed once per module, and
    harmless to other runs."""
    for module in {sys.modules[cls.__module__] for cls in type(scheduler).__mro__}:
        _drawing_from_philox_in(module)


def _drawing_from_philox_in(module) -> None:
    original = getattr(module, "randn_tensor", None)
    if original is None or getattr(original, "draws_from_philox", False):
        return

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        if uses_philox(generator):
            return philox_noise(shape, generator, device, dtype)
        return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    randn_tensor.draws_from_philox = True
    module.randn_tensor = randn_tensor
