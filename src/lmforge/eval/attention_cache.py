"""Two KV caches for evaluation, speaking the model's cache protocol (`attend`, `advance`, `length`).

`Transformer.forward(tokens, positions, cache)` hands each layer's q/k/v to `cache.attend`, so
a cache decides what every query may see. That is all batched evaluation needs:

- `PaddedCache`: rows of different lengths, left-padded, prefilled as one batch. Pad slots are
  invisible to every real query.
- `SharedPrefixCache`: many continuations per context. The contexts were prefilled once into a
  `PaddedCache`; each continuation row attends to its own context's keys (picked per layer, never
  copied for the whole model) and causally to its own tokens. A 4-choice question costs one
  context pass instead of four.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class PaddedCache:
    def __init__(self, cfg, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.mask = None

    def prepare(self, valid: torch.Tensor) -> None:
        """Declare which of the next forward's tokens [B, T] are real; builds the attention mask."""
        B, T = valid.shape
        start, end = self.length, self.length + T
        if end > self.k.shape[3]:
            raise ValueError(f"cache full: {end} > {self.k.shape[3]} positions")
        self.key_valid[:, start:end] = valid
        slots = torch.arange(end, device=valid.device)
        query_slots = torch.arange(start, end, device=valid.device)
        causal = slots[None, :] <= query_slots[:, None]                       # [T, end]
        mask = causal[None] & self.key_valid[:, None, :end]                  # [B, T, end]
        mask = mask | (slots[None, :] == query_slots[:, None])[None]         # pads see themselves: no NaN
        self.mask = mask[:, None]

    def attend(self, layer: int, q, k, v):
        start, end = self.length, self.length + q.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return _sdpa(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.mask)

    def advance(self, n: int) -> None:
        self.length += n


class SharedPrefixCache:
    def __init__(self, prefix: PaddedCache, group_of_row: torch.Tensor, n_tokens: int):
        self.prefix, self.rows = prefix, group_of_row
        self.length = prefix.length
        P, T = prefix.length, n_tokens
        device = group_of_row.device
        own = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
        context = prefix.key_valid[group_of_row, :P][:, None, :].expand(-1, T, -1)
        self.mask = torch.cat([context, own[None].expand(len(group_of_row), -1, -1)], dim=-1)[:, None]

    def attend(self, layer: int, q, k, v):
        P = self.prefix.length
        pk = self.prefix.k[layer, :, :, :P].index_select(0, self.rows)
        pv = self.prefix.v[layer, :, :, :P].index_select(0, self.rows)
        return _sdpa(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), self.mask)

    def advance(self, n: int) -> None:
        self.length += n
