"""Context parallel in the training loop: the cp ranks of a data-parallel group read the same rows,
and each runs the model on its zigzag share of every sequence (input tokens, targets and their RoPE
positions; ring_attention.shard_positions), with attention as ring attention over the cp mesh
dimension, so no rank holds a whole sequence's activations. The model class stays plain: each
block's causal attention call is swapped from outside (layers.causal_attention_override), and only
while a sharded forward runs.

Why the numbers match one process: every rank's loss is the mean over its own T/cp positions (the
same count on each), so the mean over cp ranks is the sequence's mean; ring attention's backward
sends every key/value chunk's gradient home to its owner, so a rank's weight gradient is its part
of d(sum of the cp losses)/dW, and averaging over cp (FSDP's reduction over the flattened
dp_shard x cp mesh, as torchtitan does) gives the whole sequence's gradient.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.model import layers
from lmforge.model.ring_attention import ring_attention, shard_positions


@contextmanager
def ring_attention_dispatch(positions: torch.Tensor, group, block: int = 128):
    """Within the block, every plain causal attention call of the model attends this rank's
    queries at global `positions` over the keys of all ranks in `group` (ring attention)."""
    def attend(q, k, v):
        return ring_attention(q, k, v, positions, positions, group, True, block)[0]

    previous = layers.causal_attention_override
    layers.causal_attention_override = attend
    try:
        yield
    finally:
        layers.causal_attention_override = previous


class ContextParallelForward:
    """Called as the pretraining objective calls the model, model(tokens, targets=targets) on whole
    [B, T] rows; runs the model on this rank's zigzag chunks -> the mean loss over them."""

    def __init__(self, model, group, block: int = 128):
        self.model, self.group, self.block = model, group, block
        self.rank, self.cp = dist.get_rank(group), dist.get_world_size(group)

    def __call__(self, tokens: torch.Tensor, *, targets: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        pos = shard_positions(T, self.rank, self.cp).to(tokens.device)
        with ring_attention_dispatch(pos, self.group, self.block):
            return self.model(tokens[:, pos], positions=pos.expand(B, -1), targets=targets[:, pos])


def prefill_logits(model, tokens: torch.Tensor, group, block: int = 128) -> torch.Tensor:
    """One forward of whole rows tokens [B, T] split over the ranks of `group`: each rank runs its
    zigzag share with ring attention, and every rank gets the logits back in sequence order
    [B, T, vocab]. T must be a multiple of 2 * the group's size."""
    B, T = tokens.shape
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    if T % (2 * cp):
        raise LmforgeError(f"context-parallel prefill needs the length {T} to be a multiple of 2*cp={2 * cp}")
    pos = shard_positions(T, rank, cp).to(tokens.device)
    with ring_attention_dispatch(pos, group, block):
        local = model(tokens[:, pos], positions=pos.expand(B, -1)).contiguous()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local, group=group)
    out = local.new_empty(B, T, local.shape[-1])
    for r, part in enumerate(parts):
        out[:, shard_positions(T, r, cp).to(out.device)] = part
    return out
