"""Exact attention in blocks: an online softmax over key/value blocks (FlashAttention's recurrence
in plain PyTorch), so no [T, S] score matrix is ever held; memory is linear in the length.

Shapes: q [B, H, T, D], k and v [B, Hkv, S, D] (grouped-query: H a multiple of Hkv, each group of
H/Hkv query heads reads one KV head without copying it). Masks come from integer positions
(q_pos [T], k_pos [S]; causal: a query sees keys at positions <= its own), so a query block can sit
anywhere in the sequence: ring attention (ring_attention.py) feeds it zigzag chunks.
Accumulation is in fp32 (fp64 stays fp64); the log-sum-exp of each row is returned with the output
so that partial results over disjoint key sets can be merged exactly (`merge_partials`).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def naive_attention(q, k, v, causal: bool = True, q_pos=None, k_pos=None):
    """Reference: the full [T, S] softmax -> (out [B, H, T, D], lse [B, H, T])."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        q_pos = torch.arange(T, device=q.device) if q_pos is None else q_pos
        k_pos = torch.arange(k.shape[2], device=q.device) if k_pos is None else k_pos
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], NEG_INF)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _grouped(q, n_kv: int):
    """[B, H, T, D] -> [B, Hkv, G, T, D] (a view): query heads grouped by the KV head they read."""
    B, H, T, D = q.shape
    return q.view(B, n_kv, H // n_kv, T, D)


def _block_scores(qb, kb, qp, kp, causal: bool, scale: float):
    s = torch.einsum("bhgtd,bhsd->bhgts", qb, kb) * scale
    if causal:
        s = s.masked_fill(kp[None, :] > qp[:, None], NEG_INF)
    return s


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _skip(qp, kp, causal: bool) -> bool:
    """A block pair every query of which is before every key does no work under a causal mask."""
    return causal and bool(kp.min() > qp.max())


def attention_forward(q, k, v, q_pos, k_pos, causal: bool = True, block_q: int = 128, block_k: int = 128):
    """-> (out [B, H, T, D] in q's dtype, lse [B, H, T] in the accumulation dtype; -inf for a row
    that sees no key, whose output is 0)."""
    B, H, T, D = q.shape
    n_kv, acc = k.shape[1], _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D)
    qg = _grouped(q, n_kv).to(acc)
    k, v = k.to(acc), v.to(acc)
    out = torch.zeros_like(qg)
    lse = torch.full(qg.shape[:-1], NEG_INF, dtype=acc, device=q.device)
    for q0, q1 in _blocks(T, block_q):
        qb, qp = qg[..., q0:q1, :], q_pos[q0:q1]
        m = torch.full(qb.shape[:-1], NEG_INF, dtype=acc, device=q.device)  # running row max
        l = torch.zeros_like(m)                                              # running sum of exp(s - m)
        o = torch.zeros_like(qb)                                             # running sum of exp(s - m) v
        for k0, k1 in _blocks(k.shape[2], block_k):
            kp = k_pos[k0:k1]
            if _skip(qp, kp, causal):
                continue
            s = _block_scores(qb, k[:, :, k0:k1], qp, kp, causal, scale)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # a row with no key yet: keep exp() finite
            p = torch.exp(s - m_safe[..., None])
            rescale = torch.exp(m - m_safe)
            l = l * rescale + p.sum(-1)
            o = o * rescale[..., None] + torch.einsum("bhgts,bhsd->bhgtd", p, v[:, :, k0:k1])
            m = m_new
        seen = l > 0
        out[..., q0:q1, :] = torch.where(seen[..., None], o / torch.where(seen, l, 1.0)[..., None], 0.0)
        lse[..., q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), NEG_INF)
    return out.view(B, H, T, D).to(q.dtype), lse.view(B, H, T)


def attention_backward(q, k, v, out, lse, dout, q_pos, k_pos, causal: bool = True,
                       block_q: int = 128, block_k: int = 128):
    """Gradients of attention_forward's output given the FINAL out and lse of each query row (which
    may come from merging several key sets): p = exp(s - lse) is then each key's true probability,
    so dq and this key set's dk, dv are exact; recomputed block by block (no [T, S] storage)."""
    B, H, T, D = q.shape
    n_kv, acc = k.shape[1], _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D)
    qg, dog = _grouped(q, n_kv).to(acc), _grouped(dout, n_kv).to(acc)
    lse_g = lse.view(B, n_kv, H // n_kv, T).to(acc)
    delta = (dog * _grouped(out, n_kv).to(acc)).sum(-1)  # rowsum(dO * O)
    k, v = k.to(acc), v.to(acc)
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1 in _blocks(T, block_q):
        qb, qp = qg[..., q0:q1, :], q_pos[q0:q1]
        lse_b = lse_g[..., q0:q1]
        lse_safe = torch.where(lse_b == NEG_INF, float("inf"), lse_b)  # no key seen: p = 0
        for k0, k1 in _blocks(k.shape[2], block_k):
            kp = k_pos[k0:k1]
            if _skip(qp, kp, causal):
                continue
            s = _block_scores(qb, k[:, :, k0:k1], qp, kp, causal, scale)
            p = torch.exp(s - lse_safe[..., None])
            dp = torch.einsum("bhgtd,bhsd->bhgts", dog[..., q0:q1, :], v[:, :, k0:k1])
            ds = p * (dp - delta[..., q0:q1, None]) * scale
            dq[..., q0:q1, :] += torch.einsum("bhgts,bhsd->bhgtd", ds, k[:, :, k0:k1])
            dk[:, :, k0:k1] += torch.einsum("bhgts,bhgtd->bhsd", ds, qb)
            dv[:, :, k0:k1] += torch.einsum("bhgts,bhgtd->bhsd", p, dog[..., q0:q1, :])
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over keys A and over disjoint keys B -> attention over A and B, exactly: each
    partial is weighted by its share of the total softmax mass, in fp32 (or wider)."""
    acc = _acc_dtype(lse_a.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    lse_safe = torch.where(lse == NEG_INF, 0.0, lse)
    wa, wb = torch.exp(lse_a - lse_safe)[..., None], torch.exp(lse_b - lse_safe)[..., None]
    return (out_a.to(acc) * wa + out_b.to(acc) * wb).to(out_a.dtype), lse


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, causal, block_q, block_k):
        out, lse = attention_forward(q, k, v, q_pos, k_pos, causal, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.settings = (causal, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout, q_pos, k_pos, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def blockwise_attention(q, k, v, causal: bool = True, block_q: int = 128, block_k: int = 128, q_offset: int = 0):
    """Drop-in for causal SDPA (queries at positions q_offset.. of the keys); only q, k, v, out and
    the row log-sum-exp are kept for the backward, so training memory is linear in T too."""
    q_pos = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)
    k_pos = torch.arange(k.shape[2], device=q.device)
    return _BlockwiseAttention.apply(q, k, v, q_pos, k_pos, causal, block_q, block_k)
