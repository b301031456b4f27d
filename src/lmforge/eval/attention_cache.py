"""A KV cache for evaluation that speaks the model's cache protocol (`attend`, `advance`, `length`).

`Transformer.forward(tokens, positions, cache)` hands each layer's q/k/v to `cache.attend`, so
the cache decides what every query may see. Log-likelihood scoring runs a batch in up to three
forwards, each attending to the segments stored by the earlier ones:

    shared prefix  [1 row]   the few-shot examples every context in the batch starts with
    context tails  [G rows]  the rest of each distinct context (left-padded)
    continuations  [R rows]  every choice of every context (right-padded)

A row picks its rows of earlier segments through `row_maps`; a one-row segment is broadcast, not
copied. So a 5-shot prompt is computed once per batch, each question once, each choice once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Segment:
    """Keys/values (per layer) of one earlier forward, and which of its slots are real tokens."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid                          # [rows, S] bool
        self.k: list[torch.Tensor] = []             # per layer [rows, Hkv, S, D]
        self.v: list[torch.Tensor] = []


class SegmentCache:
    def __init__(self, segments: list[Segment], row_maps: list[torch.Tensor], valid: torch.Tensor,
                 store: bool = True):
        """valid [B, T]: which tokens of this forward are real; store=True keeps this forward's
        keys/values as `self.segment` for later forwards."""
        self.segments, self.row_maps = segments, row_maps
        self.segment = Segment(valid) if store else None
        self.length = 0  # positions are always passed explicitly
        B, T = valid.shape
        slots = torch.arange(T, device=valid.device)
        own = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]      # causal, real keys only
        own = own | torch.eye(T, dtype=torch.bool, device=valid.device)[None]  # pads see themselves: no NaN
        earlier = [self._pick(seg.valid, rows, B)[:, None, :].expand(B, T, -1) for seg, rows in zip(segments, row_maps)]
        self.mask = torch.cat(earlier + [own], dim=-1)[:, None]                # [B, 1, T, S_total]

    @staticmethod
    def _pick(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
        return x.expand(B, *x.shape[1:]) if x.shape[0] == 1 else x.index_select(0, rows)

    def attend(self, layer: int, q, k, v):
        B = q.shape[0]
        if self.segment is not None:
            self.segment.k.append(k)
            self.segment.v.append(v)
        keys = [self._pick(s.k[layer], r, B) for s, r in zip(self.segments, self.row_maps)] + [k]
        values = [self._pick(s.v[layer], r, B) for s, r in zip(self.segments, self.row_maps)] + [v]
        k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self.mask,
                                              enable_gqa=q.shape[1] != k_all.shape[1])

    def advance(self, n: int) -> None:
        self.length += n
