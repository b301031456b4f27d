"""Paged KV storage and the per-step view that plugs it into the model's cache protocol.

The model calls `cache.attend(layer, q, k, v)` in every attention layer and `cache.advance(T)` at
the end. A step's ragged batch (many sequences, each contributing one or more new tokens) is packed
into a single row: q is [1, H, T, D] and k/v are [1, Hkv, T, D], RoPE-rotated at explicit
positions. `StepBatch.attend` writes the new K/V into their slots and computes each sequence's
attention over its own blocks only:
- each token of a short item (a decode step, a speculative draft being verified: up to ROW_TOKENS
  tokens) is one attention row over its own keys, all rows in one call (DecodeView); on CPU through
  a kernel that gives a row the same bits however the step is batched, so speculative and batched
  decoding reproduce plain single-stream decoding exactly, quantised models included;
- longer items (prompt chunks) are done one by one with a causal mask, reading any earlier part of
  the sequence (prefix-cache hits, earlier chunks) from the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels
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
        self.row_kernel = torch.device(device or "cpu").type == "cpu" and dtype == torch.float32 and cpu_kernels.load()

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

    def row_attention(self, layer: int, q: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Attention of q [rows, H, D], one query per row, over its sequence's keys: `keys` holds each
        row's key slots, `width` per row (padded, flattened), `lengths` [rows] how many of them it
        sees -> [rows, H, D]. On CPU in float32 through lmforge's row kernel, which gives each row the
        same bits whatever it is batched with (see row_attention.cpp); elsewhere SDPA over the padded
        batch, whose last bits depend on the padding."""
        rows = q.shape[0]
        if self.row_kernel:
            keys = keys.view(rows, -1)
            if self.quantized:   # the kernel reads float K/V: dequantise this step's keys first
                k, v = self.read(layer, keys.reshape(-1))
                keys = torch.arange(keys.numel(), device=keys.device).view(rows, -1)
            else:
                k, v = self.k[layer], self.v[layer]
            return torch.ops.lmforge_rows.attention(q.contiguous(), k, v, keys, lengths)
        width = keys.shape[0] // rows
        ks, vs = self.read(layer, keys)
        ks = ks.view(rows, width, *ks.shape[1:]).transpose(1, 2)
        vs = vs.view(rows, width, *vs.shape[1:]).transpose(1, 2)
        mask = None if rows == 1 else (torch.arange(width, device=q.device) < lengths[:, None])[:, None, None]
        out = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, enable_gqa=self.gqa)
        return out[:, :, 0]


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
        # Short items first: their tokens are attention rows, done in one call (see DecodeView).
        self.items = sorted(items, key=lambda it: len(it.tokens) > ROW_TOKENS)
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

        short = [it for it in self.items if len(it.tokens) <= ROW_TOKENS]
        self.n_rows = sum(len(it.tokens) for it in short)
        self.rows = None
        if short:
            width = max(it.start + len(it.tokens) for it in short)
            n_blocks = -(-width // bs)
            tables = as_long([it.seq.block_table[:n_blocks] + [0] * (n_blocks - len(it.seq.block_table[:n_blocks]))
                              for it in short])
            keys = (tables[:, :, None] * bs + torch.arange(bs, device=device)).reshape(len(short), -1)[:, :width]
            keys = keys.repeat_interleave(as_long([len(it.tokens) for it in short]), dim=0)     # [rows, width]
            lengths = self.positions[0, :self.n_rows] + 1
            self.rows = DecodeView(cache, self.slots[:self.n_rows], keys.reshape(-1), lengths)

        self.chunks: list[Chunk] = []
        start = self.n_rows
        for it in self.items[len(short):]:
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
        if self.rows is not None:
            outs.append(self.rows.attention(layer, q[:, :, :self.n_rows]))
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
        the whole step is rows (decode_view)."""
        return not self.chunks

    def decode_view(self) -> "DecodeView":
        """This step as tensors only (see DecodeView)."""
        assert self.is_decode, "a step with long prompt chunks has no decode view"
        return self.rows


class DecodeView:
    """The attention rows of a step: each new token of its short items (decoding, speculative
    verification, short prompt chunks) is one query over its sequence's key slots up to its own
    position, so a token's attention is the same computation whether it is decoded alone, batched with
    other streams, or verified with a draft. Held as tensors only: write slots [r], each row's key
    slots flattened [r * width] (flat, because a [1, width] tensor's stride would be guarded as a
    constant) and each row's number of keys [r]. No Python number changes from step to step, so
    `torch.compile` traces a whole-rows step once for every batch size and length (one graph for
    one row, one for several), where StepBatch's per-step ints would recompile; it is also the cache
    protocol for such a step."""
    length = 0

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor):
        self.cache, self.slots, self.keys, self.lengths = cache, slots, keys, lengths

    def attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, r, D] (the rows' queries; their K/V already written) -> [H, r, D]."""
        return self.cache.row_attention(layer, q[0].transpose(0, 1), self.keys, self.lengths).transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        return self.attention(layer, q)[None]

    def advance(self, n: int) -> None:
        pass
