"""Contiguous KV cache for incremental decoding of a batch that advances in lockstep.

The serving engine has its own paged cache with the same two methods (`attend`, `advance`).
"""
from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.layers import causal_attention


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def attend(self, layer: int, q, k, v):
        start, end = self.length, self.length + q.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], q_offset=start)

    def advance(self, n: int) -> None:
        self.length += n
