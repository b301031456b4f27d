"""Inference memory: weights at a precision, the KV cache, and a prefill workspace.

The KV cache holds K and V for every layer and token: 2 * layers * kv_heads * head_dim * bytes,
so grouped-query attention divides it by n_heads / n_kv_heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.plan.arithmetic import kv_cache_bytes_per_token

# bytes per weight; int4 includes one fp16 scale per group of 128 weights, q4_0 one per 32
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1 + 2 / 128,
                "int4": 0.5 + 2 / 128, "q4_0": 0.5 + 2 / 32}
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


@dataclass
class InferenceEstimate:
    weights: float
    kv_cache: float
    workspace: float
    kv_per_token: float
    tp: int

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.workspace

    @property
    def parts(self) -> dict[str, float]:
        return {"weights": self.weights, "kv cache": self.kv_cache, "workspace": self.workspace}


def _lookup(table: dict, key: str, what: str) -> float:
    if key not in table:
        raise LmforgeError(f"unknown {what} precision {key!r}; choose one of: {', '.join(table)}")
    return table[key]


def inference_memory(cfg: ModelConfig, batch: int = 1, seq_len: int | None = None, weights: str = "bf16",
                     kv: str = "bf16", tp: int = 1, prefill_chunk: int | None = None) -> InferenceEstimate:
    """Per-GPU bytes to serve `batch` sequences of `seq_len` tokens (prompt + generation).

    The workspace is one layer's transient activations during a prefill chunk (default: the
    whole prompt) in bf16 plus the fp32 logits of the last position of every sequence.
    """
    seq_len = seq_len or cfg.max_seq_len
    if batch < 1 or seq_len < 1 or tp < 1:
        raise LmforgeError("batch, seq_len and tp must be at least 1")
    if cfg.n_heads % tp:
        raise LmforgeError(f"tp={tp} does not divide the {cfg.n_heads} attention heads")
    w = _lookup(WEIGHT_BYTES, weights, "weight")
    kv_per_token = kv_cache_bytes_per_token(cfg, _lookup(KV_BYTES, kv, "KV cache"))
    # With more ranks than K/V heads the heads are replicated, so the cache stops shrinking.
    kv_shards = min(tp, cfg.n_kv_heads)
    chunk = min(prefill_chunk or seq_len, seq_len)
    layer_tokens = batch * chunk
    act = layer_tokens * (cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim / kv_shards
                          + (cfg.n_heads * cfg.head_dim + 3 * cfg.hidden_dim) / tp) * 2
    logits = batch * cfg.vocab_size * 4 / tp
    return InferenceEstimate(weights=cfg.num_params() * w / tp, kv_cache=kv_per_token * batch * seq_len / kv_shards,
                             workspace=act + logits, kv_per_token=kv_per_token / kv_shards, tp=tp)


def max_batch(cfg: ModelConfig, memory_bytes: float, seq_len: int | None = None, **kwargs) -> int:
    """Largest batch of seq_len-token sequences whose inference memory stays under memory_bytes."""
    lo, hi = 0, 1
    while inference_memory(cfg, hi, seq_len, **kwargs).total <= memory_bytes:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inference_memory(cfg, mid, seq_len, **kwargs).total <= memory_bytes:
            lo = mid
        else:
            hi = mid
    return lo
