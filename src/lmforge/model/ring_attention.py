"""Ring attention: the sequence is split over the ranks of a context-parallel process group; each
rank keeps its queries and passes its key/value chunk around the ring, so every query meets every
key while no rank ever holds more than two KV chunks. The next chunk's send/receive is posted before
the current chunk's compute, so communication hides behind it. Partial results over each chunk are
merged by their log-sum-exp in fp32 (attention.merge_partials).

Causal load balance (zigzag): the sequence is cut into 2*cp chunks and rank r holds chunks r and
2cp-1-r, an early one and a late one, so every rank does the same causal work; a contiguous split
leaves the last rank with ~2x the mean (see `pair_work`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.model.attention import attention_backward, attention_forward, merge_partials


def shard_positions(T: int, rank: int, cp: int, zigzag: bool = True) -> torch.Tensor:
    """The global positions rank `rank` holds out of 0..T-1."""
    if not zigzag:
        size = T // cp
        return torch.arange(rank * size, (rank + 1) * size)
    size = T // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat([torch.arange(rank * size, (rank + 1) * size), torch.arange(late * size, (late + 1) * size)])


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 2, zigzag: bool = True) -> torch.Tensor:
    return x.index_select(dim, shard_positions(x.shape[dim], rank, cp, zigzag).to(x.device))


def pair_work(T: int, cp: int, zigzag: bool) -> list[int]:
    """Causal (query, key) pairs each rank computes over a whole ring pass: its queries against
    every rank's keys. Equal across ranks with zigzag."""
    pos = [shard_positions(T, r, cp, zigzag) for r in range(cp)]
    return [sum(int((pos[src][None, :] <= pos[r][:, None]).sum()) for src in range(cp)) for r in range(cp)]


class _Ring:
    """Sends to the next rank and receives from the previous one in `group`, asynchronously."""

    def __init__(self, group):
        self.group = group
        me, n = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (me + 1) % n)
        self.prev = dist.get_global_rank(group, (me - 1) % n)
        self.size = n

    def start(self, tensors: list[torch.Tensor]):
        """Post the transfer of `tensors` to the next rank; -> (handles, buffers being received)."""
        tensors = [t.contiguous() for t in tensors]  # (k, v may be transposed views of the projections)
        incoming = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in incoming]
        return dist.batch_isend_irecv(ops), incoming

    @staticmethod
    def finish(pending):
        handles, incoming = pending
        for h in handles:
            h.wait()
        return incoming


def ring_forward(q, k, v, q_pos, k_pos, group, causal, block):
    ring = _Ring(group)
    out = lse = None
    kv = [k, v, k_pos]
    for step in range(ring.size):
        pending = ring.start(kv) if step < ring.size - 1 else None  # next chunk in flight during compute
        part = attention_forward(q, kv[0], kv[1], q_pos, kv[2], causal, block, block)
        out, lse = part if out is None else merge_partials(out, lse, *part)
        if pending:
            kv = ring.finish(pending)
    return out, lse


def ring_backward(q, k, v, out, lse, dout, q_pos, k_pos, group, causal, block):
    """dq stays home; each chunk's dk, dv travel around the ring with it and arrive back at their
    owner after the last step."""
    ring = _Ring(group)
    dq = torch.zeros_like(q)
    kv = [k, v, k_pos]
    dkv = [torch.zeros_like(k), torch.zeros_like(v)]
    for step in range(ring.size):
        pending = ring.start(kv) if step < ring.size - 1 else None
        dq_s, dk_s, dv_s = attention_backward(q, kv[0], kv[1], out, lse, dout, q_pos, kv[2], causal, block, block)
        dq += dq_s
        dkv = [dkv[0] + dk_s, dkv[1] + dv_s]
        dkv = ring.finish(ring.start(dkv))  # the accumulators follow their chunk to the next rank
        if pending:
            kv = ring.finish(pending)
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, group, causal, block):
        out, lse = ring_forward(q, k, v, q_pos, k_pos, group, causal, block)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.settings = (group, causal, block)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv = ring_backward(q, k, v, out, lse, dout, q_pos, k_pos, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, q_pos, k_pos, group=None, causal: bool = True, block: int = 128):
    """Attention of this rank's queries q [B, H, Tl, D] (global positions q_pos [Tl]) over the
    keys of every rank in `group` (this rank's k, v [B, Hkv, Tl, D] at k_pos) -> (out, lse).
    Differentiable in q, k, v (the lse output carries no gradient)."""
    group = group or dist.group.WORLD
    return _RingAttention.apply(q, k, v, q_pos, k_pos, group, causal, block)
