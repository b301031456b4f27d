"""Paged KV storage and the per-step view that plugs it into the model's cache protocol.

The model calls `cache.attend(layer, q, k, v)` in every attention layer and `cache.advance(T)` at
the end. A step's ragged batch (many sequences, each contributing one or more new tokens) is packed
into a single row: q is [1, H, T, D] and k/v are [1, Hkv, T, D], RoPE-rotated at explicit
positions. `StepBatch.attend` writes the new K/V into their slots and computes each sequence's
attention over its own blocks only:
- single-token items (decode steps) are gathered into one padded batch and done in one SDPA call;
- multi-token items (prompt chunks) are done one by one with a causal mask, reading any earlier
  part of the sequence (prefix-cache hits, earlier chunks) from the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.layers import causal_attention
from lmforge.serve.sequence import Sequence


KV_DTYPES = ("auto", "int8")
# Items of up to this many tokens can run as one attention row per token (decode_view): decoding
# and speculative verification; longer prompt chunks run chunk by chunk.
ROW_TOKENS = 16


class PagedKVCache:
    """K and V of each layer as [num_blocks * block_size, n_kv_heads, head_dim] (one tensor per layer).

    kv_dtype "auto" stores them in the model's dtype. "int8" stores each token's K and V per head
    as int8 codes with one float32 scale (absmax / 127) per (layer, slot, head): head_dim + 4
    bytes instead of head_dim * itemsize, so the same memory holds ~2x the tokens of a 16-bit
    cache (~3.8x of fp32 at head_dim 64). Attention always reads the dequantised values, the
    current step's tokens included, so results do not depend on how a prompt is chunked.

    One tensor per layer, written with index_put_ on the whole tensor, because that is the write
    `torch.compile` keeps in place; a write into a view of one [n_layers, ...] tensor is
    compiled as a copy of the whole layer on every step."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None,
                 dtype=torch.float32, kv_dtype: str = "auto"):
        if kv_dtype not in KV_DTYPES:
            raise LmforgeError(f"kv dtype must be one of {', '.join(KV_DTYPES)} (got {kv_dtype!r})")
        shape = (num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.dtype, self.quantized = dtype, kv_dtype == "int8"
        store = torch.int8 if self.quantized else dtype
        # Zeros, not empty: padded gathers read unused slots, and 0 * NaN garbage would be NaN.
        layers = lambda dt, shp: [torch.zeros(shp, device=device, dtype=dt) for _ in range(cfg.n_layers)]  # noqa: E731
        self.k, self.v = layers(store, shape), layers(store, shape)
        if self.quantized:
            self.k_scale, self.v_scale = layers(torch.float32, shape[:-1]), layers(torch.float32, shape[:-1])
        self.num_blocks, self.block_size = num_blocks, block_size
        self.gqa = cfg.n_heads != cfg.n_kv_heads   # a Python bool: shapes are symbolic when compiled

    def tensors(self) -> list[torch.Tensor]:
        """Every storage tensor (their shapes never change)."""
        scales = self.k_scale + self.v_scale if self.quantized else []
        return self.k + self.v + scales

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        if kv_dtype == "int8":
            per_head = cfg.head_dim + 4                     # int8 codes + a float32 scale
        else:
            per_head = cfg.head_dim * torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * per_head

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [T, Hkv, D] at `slots`; -> the k/v attention must use for these tokens (the
        stored values: dequantised when the cache is int8)."""
        if not self.quantized:
            self.k[layer].index_put_((slots,), k)
            self.v[layer].index_put_((slots,), v)
            return k, v
        out = []
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, scale = quantize_per_head(x)
            codes[layer].index_put_((slots,), q)
            scales[layer].index_put_((slots,), scale)
            out.append(dequantize_per_head(q, scale, x.dtype))
        return out[0], out[1]

    def read(self, layer: int, index: torch.Tensor | slice):
        """K and V [N, Hkv, D] (in the compute dtype) of the given slots: an index tensor, or a slice
        of consecutive slots (read as a view, no copy)."""
        take = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        k, v = take(self.k[layer]), take(self.v[layer])
        if self.quantized:
            k = dequantize_per_head(k, take(self.k_scale[layer]), self.dtype)
            v = dequantize_per_head(v, take(self.v_scale[layer]), self.dtype)
        return k, v

    def decode_attention(self, layer: int, q: torch.Tensor, index, batch: int, width: int, mask) -> torch.Tensor:
        """Attention of the first `batch` queries of q [1, H, T, D] (one row per query) over
        their keys: `index` holds each sequence's `width` key slots in a row (padded; `mask`
        [batch, 1, 1, width] hides the padding, or None) -> [H, batch, D]."""
        qs = q[0, :, :batch].transpose(0, 1)[:, :, None]                   # [batch, H, 1, D]
        ks, vs = self.read(layer, index)
        ks = ks.view(batch, width, *ks.shape[1:]).transpose(1, 2)
        vs = vs.view(batch, width, *vs.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=self.gqa)
        return out[:, :, 0].transpose(0, 1)


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and scales [...] (symmetric, absmax / 127 per vector)."""
    scale = (x.float().abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_head(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


@dataclass
class Chunk:
    """A multi-token item: tokens [start, start + n) of the packed row."""
    start: int
    n: int
    cached: int                         # tokens of this sequence already in the cache before it
    gather: torch.Tensor | None         # slots of positions 0..cached+n-1 (None when cached == 0)


@dataclass
class StepItem:
    """One sequence's part of a step: `tokens` at positions start.., logits for the last `num_logits`."""
    seq: Sequence
    start: int
    tokens: list[int]
    num_logits: int

    @classmethod
    def scheduled(cls, seq: Sequence, n: int) -> "StepItem":
        """The scheduler's (seq, n): its next n tokens from num_computed on. Speculative draft
        tokens (seq.spec.draft) follow the real ones; every position from the last real token on
        gets logits, so one forward verifies the whole draft."""
        start = seq.num_computed
        draft = seq.spec.draft if seq.spec is not None else []
        tokens = (seq.token_ids + draft)[start:start + n] if draft else seq.token_ids[start:start + n]
        end = start + n
        return cls(seq, start, tokens, end - seq.num_tokens + 1 if end >= seq.num_tokens else 0)


class StepBatch:
    """One engine step: packed inputs, slot mapping and attention metadata (the cache protocol)."""

    def __init__(self, cache: PagedKVCache, items: list[tuple[Sequence, int] | StepItem], device=None):
        self.cache = cache
        bs = cache.block_size
        items = [it if isinstance(it, StepItem) else StepItem.scheduled(*it) for it in items]
        # Decode-like items first: they share one batched attention call.
        self.items = sorted(items, key=lambda it: len(it.tokens) != 1)
        tokens, positions, slots, logits_rows = [], [], [], []
        self.sampled: list[Sequence] = []   # sequences that get logits, in row order
        self.num_logits: list[int] = []     # rows of each (1, or 1 + draft length when verifying)
        for it in self.items:
            seq, start, n = it.seq, it.start, len(it.tokens)
            tokens += it.tokens
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if it.num_logits:
                logits_rows += range(len(tokens) - it.num_logits, len(tokens))
                self.sampled.append(seq)
                self.num_logits.append(it.num_logits)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self.tokens = as_long(tokens)[None]
        self.positions = as_long(positions)[None]
        self.slots = as_long(slots)
        self.logits_index = as_long(logits_rows)
        self.length = 0  # protocol attribute; positions are always explicit here

        singles = [it for it in self.items if len(it.tokens) == 1]
        self.n_single = len(singles)
        self.single_gather = self.single_mask = self.single_slots = None
        if singles:
            lengths = [it.start + 1 for it in singles]
            width = max(lengths)
            n_blocks = -(-width // bs)
            tables = as_long([it.seq.block_table[:n_blocks] + [0] * (n_blocks - len(it.seq.block_table[:n_blocks]))
                              for it in singles])
            offsets = torch.arange(bs, device=device)
            self.single_gather = (tables[:, :, None] * bs + offsets).reshape(len(singles), -1)[:, :width]
            first = singles[0].seq.block_table[0]
            if len(singles) == 1 and singles[0].seq.block_table[:n_blocks] == list(range(first, first + n_blocks)):
                self.single_slots = slice(first * bs, first * bs + width)   # one sequence in consecutive blocks
            else:
                self.single_slots = self.single_gather.reshape(-1)
            if min(lengths) != width:  # ragged: mask the padding
                lens = as_long(lengths)
                self.single_mask = (torch.arange(width, device=device)[None] < lens[:, None])[:, None, None]

        self.chunks: list[Chunk] = []
        start = self.n_single
        for it in self.items[self.n_single:]:
            cached, n, table = it.start, len(it.tokens), it.seq.block_table
            gather = None
            if cached:
                gather = as_long([table[p // bs] * bs + p % bs for p in range(cached + n)])
            self.chunks.append(Chunk(start, n, cached, gather))
            start += n

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    # --- the cache protocol --------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kt, vt = self.cache.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        k, v = kt.transpose(0, 1)[None], vt.transpose(0, 1)[None]
        outs = []
        if self.n_single:
            b, width = self.single_gather.shape
            outs.append(self.cache.decode_attention(layer, q, self.single_slots, b, width, self.single_mask))
        for c in self.chunks:
            qc = q[:, :, c.start:c.start + c.n]
            if c.gather is None:
                out = causal_attention(qc, k[:, :, c.start:c.start + c.n], v[:, :, c.start:c.start + c.n])
            else:
                kc, vc = self.cache.read(layer, c.gather)
                out = causal_attention(qc, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], q_offset=c.cached)
            outs.append(out[0])
        return torch.cat(outs, dim=1)[None] if len(outs) > 1 else outs[0][None]

    def advance(self, n: int) -> None:
        """Sequence lengths are advanced by the engine after the step, per sequence."""

    @property
    def is_decode(self) -> bool:
        """Every sequence adds at most ROW_TOKENS tokens (decoding, or verifying a speculative draft):
        the step can run as decode_view's rows."""
        return all(len(it.tokens) <= ROW_TOKENS for it in self.items)

    def decode_view(self) -> "DecodeView":
        """This step as tensors only (see DecodeView): each new token is one attention row over its
        sequence's key slots up to its own position."""
        bs, device = self.cache.block_size, self.slots.device
        width = max(it.start + len(it.tokens) for it in self.items)
        n_blocks = -(-width // bs)
        tables = torch.tensor([it.seq.block_table[:n_blocks] + [0] * (n_blocks - len(it.seq.block_table[:n_blocks]))
                               for it in self.items], dtype=torch.long, device=device)
        keys = (tables[:, :, None] * bs + torch.arange(bs, device=device)).reshape(len(self.items), -1)[:, :width]
        counts = torch.tensor([len(it.tokens) for it in self.items], device=device)
        keys = keys.repeat_interleave(counts, dim=0)                        # [rows, width]
        mask = None
        if keys.shape[0] > 1:   # always a mask with several rows (even when none is padded): one graph for them
            mask = (torch.arange(width, device=device)[None] <= self.positions[0][:, None])[:, None, None]
        return DecodeView(self.cache, self.slots, keys.reshape(-1), mask)


class DecodeView:
    """The cache protocol for a step of short items (decoding, speculative verification), held as
    tensors only: each of the step's r new tokens is one attention row. Write slots [r], each row's
    key slots flattened [r * width] (flat, because a [1, width] tensor's stride would be guarded as
    a constant), and the mask [r, 1, 1, width] of the keys each row sees (its sequence's, up to its
    own position; None for a lone row). No Python number changes from step to step, so
    `torch.compile` traces it once for every batch size and length (one graph for one row, one for
    several), where StepBatch's per-step ints would recompile."""
    length = 0

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None):
        self.cache, self.slots, self.keys, self.mask = cache, slots, keys, mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        b = self.slots.shape[0]
        return self.cache.decode_attention(layer, q, self.keys, b, self.keys.shape[0] // b, self.mask)[None]

    def advance(self, n: int) -> None:
        pass
