"""Inference memory (weights at a precision, the KV cache, a prefill workspace) and the decode
roofline.

The KV cache holds K and V for every layer and token: 2 * layers * kv_heads * head_dim * bytes,
so grouped-query attention divides it by n_heads / n_kv_heads.

A decode step reads every weight it uses and every sequence's K/V once, and does ~2 FLOPs per
weight per sequence plus attention's 4 * layers * context * heads * head_dim per sequence: it can
take no less than the larger of bytes / bandwidth and FLOPs / peak. At small batches the bytes win
(decode is memory-bound), which is why fewer bytes per weight decode faster.
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


@dataclass
class DecodeBound:
    """The floor under one decode step of `batch` sequences with `context` tokens each, per GPU."""
    weight_bytes: float   # weights the step reads
    kv_bytes: float       # K/V the step reads
    flops: float
    bandwidth: float      # bytes/s
    peak_flops: float
    batch: int

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def memory_bound(self) -> bool:
        return self.bytes / self.bandwidth >= self.flops / self.peak_flops

    @property
    def seconds(self) -> float:
        return max(self.bytes / self.bandwidth, self.flops / self.peak_flops)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate: every sequence of the batch gains one token per step."""
        return self.batch / self.seconds


def decode_bound(cfg: ModelConfig, batch: int, context: int, bandwidth: float, peak_flops: float,
                 weights: str = "bf16", kv: str = "bf16", tp: int = 1) -> DecodeBound:
    """The roofline of one decode step. The LM head is read whether or not it is tied to the
    embedding table (whose few looked-up rows are not counted). An MoE layer reads the experts its
    batch routes to: under uniform routing E * (1 - (1 - k/E)^batch) of them on average."""
    if batch < 1 or context < 1 or tp < 1:
        raise LmforgeError("batch, context and tp must be at least 1")
    if bandwidth <= 0 or peak_flops <= 0:
        raise LmforgeError("bandwidth and peak FLOP/s must be positive")
    head = cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0   # num_params(embeddings=False) has an untied one
    read = cfg.num_params(embeddings=False) + head
    if cfg.n_experts:
        expert = 3 * cfg.dim * cfg.hidden_dim
        touched = cfg.n_experts * (1 - (1 - cfg.n_experts_per_token / cfg.n_experts) ** batch)
        read -= cfg.n_layers * (cfg.n_experts - touched) * expert
    used = cfg.num_params(active=True, embeddings=False) + head
    attention = 4 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim
    kv_per_token = kv_cache_bytes_per_token(cfg, _lookup(KV_BYTES, kv, "KV cache"))
    return DecodeBound(weight_bytes=read * _lookup(WEIGHT_BYTES, weights, "weight") / tp,
                       kv_bytes=batch * context * kv_per_token / min(tp, cfg.n_kv_heads),
                       flops=batch * (2 * used + attention) / tp, bandwidth=bandwidth, peak_flops=peak_flops,
                       batch=batch)
