"""A1111's Token merging (ToMe for SD, Bolya and Hoffman 2023): self-attention at the full latent resolution runs on
fewer tokens.

In each transformer block whose tokens are the latent's pixels (no downsampling: tomesd's max_downsample=1, which
A1111 uses), the tokens going into self-attention are split into destinations, the top-left token of each 2x2 cell of
the latent grid, and sources, the rest. The r = ratio x N sources most like some destination (cosine similarity of the
block's input tokens) are averaged into that destination; attention runs on the N - r tokens left; then each merged
source takes its destination's result again, so the block adds N tokens to its residual as before. Cross-attention and
the feed-forward layer are left alone, as A1111 leaves them.

The destinations are fixed, never drawn at random (A1111's use_rand=False), so a seed gives the same picture every
time. A model with no attention at the full latent resolution (SDXL, this project's embedded model) merges nothing,
as in A1111. Written for this project from the method's description: tomesd patches diffusers' classes for good, this
hooks one UNet for one pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

MAX_RATIO = 0.9  # where A1111's sliders end
STRIDE = 2  # one destination per 2x2 cell of the latent grid (tomesd's sx = sy = 2)
SCORED_AT_ONCE = 4096  # sources scored against all destinations at a time: the whole table at 2048x2048 takes GBs


@dataclass(frozen=True)
class TokenMerge:
    """How one block's N tokens per batch row become N - r, and back. Positions count the tokens row by row."""

    destinations: torch.Tensor  # (D,) the destinations' positions, the same in every row
    kept: torch.Tensor  # (B, N - D - r) the positions of the sources that stay as they are
    merged: torch.Tensor  # (B, r) the positions of the sources merged away
    into: torch.Tensor  # (B, r) which destination (0 to D - 1) each merged source is averaged into

    @property
    def tokens(self) -> int:
        return len(self.destinations) + self.kept.shape[1] + self.merged.shape[1]

    def merge(self, states: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then each destination averaged with the sources merged
        into it."""
        channels = states.shape[-1]
        kept = states.gather(1, _spread(self.kept, channels))
        merged = states.gather(1, _spread(self.merged, channels))
        sums = states[:, self.destinations].scatter_add(1, _spread(self.into, channels), merged)
        counts = torch.ones_like(sums[..., :1]).scatter_add(1, self.into[..., None], torch.ones_like(merged[..., :1]))
        return torch.cat([kept, sums / counts], dim=1)

    def unmerge(self, states: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): each token back in its place, a merged source with its destination's value."""
        channels = states.shape[-1]
        kept, destinations = states.split([self.kept.shape[1], len(self.destinations)], dim=1)
        unmerged = states.new_empty(states.shape[0], self.tokens, channels)
        unmerged[:, self.destinations] = destinations
        unmerged.scatter_(1, _spread(self.kept, channels), kept)
        unmerged.scatter_(1, _spread(self.merged, channels), destinations.gather(1, _spread(self.into, channels)))
        return unmerged


def _spread(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, K) positions as the (B, K, C) index that gather and scatter take."""
    return positions[..., None].expand(-1, -1, channels)


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio <= MAX_RATIO:
        raise ValueError(f"the token merging ratio must be from 0 (off) to {MAX_RATIO}, got {ratio:g}")


def plan_merge(metric: torch.Tensor, height: int, width: int, ratio: float) -> TokenMerge | None:
    """The merge of a block whose tokens (B, N, C) lie on a height x width grid, row by row, judged by how alike
    `metric`'s tokens are; None when nothing merges (r = int(ratio x N) comes to 0)."""
    check_ratio(ratio)
    tokens = metric.shape[1]
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens do not lie on a {height}x{width} grid")
    grid = torch.zeros(height, width, dtype=torch.bool, device=metric.device)
    # Rows and columns past the last whole 2x2 cell hold sources only.
    grid[:height - height % STRIDE:STRIDE, :width - width % STRIDE:STRIDE] = True
    is_destination = grid.flatten()
    destinations, sources = is_destination.nonzero().squeeze(1), (~is_destination).nonzero().squeeze(1)
    count = min(int(tokens * ratio), len(sources))
    if count <= 0:
        return None
    unit = F.normalize(metric, dim=-1)
    targets = unit[:, destinations].transpose(1, 2)
    best = [(chunk @ targets).max(dim=-1) for chunk in unit[:, sources].split(SCORED_AT_ONCE, dim=1)]
    likeness, nearest = torch.cat([b.values for b in best], dim=1), torch.cat([b.indices for b in best], dim=1)
    # Stable: sources equally alike keep their order, so ties never depend on the sort's whims.
    order = likeness.argsort(dim=-1, descending=True, stable=True)
    merged, kept = order[:, :count], order[:, count:]
    return TokenMerge(destinations, sources[kept], sources[merged], nearest.gather(1, merged))


@dataclass
class MergedCalls:
    """How many self-attention calls ran on merged tokens while merged_tokens was on."""

    count: int = 0


def transformer_blocks(unet) -> list[torch.nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]


@contextlib.contextmanager
def merged_tokens(unet, ratio: float) -> Iterator[MergedCalls]:
    """While inside, the UNet's self-attention at the full latent resolution runs on merged tokens (ratio 0: the
    calls are left alone). Hooks on the UNet (to learn each call's latent size), on each transformer block (to plan
    its merge from its input) and on each block's attn1 (merge before, unmerge after); all gone on the way out."""
    calls = MergedCalls()
    if not ratio:
        yield calls
        return
    check_ratio(ratio)
    latent_size = {}  # the (height, width) of the UNet call running now
    plans: dict[torch.nn.Module, TokenMerge | None] = {}  # each attn1's merge in the block running now

    def note_size(_unet, args, kwargs):
        latent_size["now"] = tuple((args[0] if args else kwargs["sample"]).shape[-2:])

    def plan(block, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        height, width = latent_size.get("now", (0, 0))
        at_full_size = states.ndim == 3 and states.shape[1] == height * width
        plans[block.attn1] = plan_merge(states, height, width, ratio) if at_full_size else None

    def merge(attn, args, kwargs):
        merge_plan = plans.get(attn)
        if merge_plan is None or kwargs.get("attention_mask") is not None:  # a mask would have N tokens
            plans.pop(attn, None)
            return None
        calls.count += 1
        if args:
            return (merge_plan.merge(args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": merge_plan.merge(kwargs["hidden_states"])}

    def unmerge(attn, _args, output):
        merge_plan = plans.pop(attn, None)
        return None if merge_plan is None else merge_plan.unmerge(output)

    handles = [unet.register_forward_pre_hook(note_size, with_kwargs=True)]
    for block in transformer_blocks(unet):
        handles += [block.register_forward_pre_hook(plan, with_kwargs=True),
                    block.attn1.register_forward_pre_hook(merge, with_kwargs=True),
                    block.attn1.register_forward_hook(unmerge)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
