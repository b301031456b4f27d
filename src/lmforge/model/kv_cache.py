"""The KV-cache seam of the model, and the contiguous cache for a batch that advances in lockstep.

`Transformer.forward(tokens, positions, cache)` hands every attention layer's q/k/v to
`cache.attend` and calls `cache.advance(T)` at the end, so the cache decides where keys and values
live and what each query sees. Implementations: `KVCache` here, the serving engine's paged
`serve.paged_cache.StepBatch` and the evaluator's `eval.attention_cache.SegmentCache`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.layers import causal_attention


@runtime_checkable
class AttentionCache(Protocol):
    """What the model asks of a KV cache."""

    length: int  # positions already stored; the model's default positions continue from it

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v [B, Hkv, T, D] for `layer` and return attention of q [B, H, T, D]
        over everything the query may see: [B, H, T, D]."""
        ...

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has attended: n new positions are stored."""
        ...


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self.length, self.length + q.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], q_offset=start)

    def advance(self, n: int) -> None:
        self.length += n
