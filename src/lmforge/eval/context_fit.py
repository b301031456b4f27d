"""The longest context an in-process model can be evaluated at within a memory budget.

Memory to generate from one prompt of L tokens through the serving engine (chunked prefill of c
tokens per step), in the model's own element size e:

    weights                                    (the loaded parameters' bytes)
  + KV cache     2 * layers * kv_heads * head_dim * e * L        (plan.arithmetic's per-token size)
  + workspace    c * (dim + 2*kv_heads*head_dim + heads*head_dim + 3*hidden) * e
                                               (one layer's transient activations, as plan.inference)
               + 2 * kv_heads * head_dim * e * L   (one layer's K/V gathered from the cache for the chunk)
               + c * L * heads * 4                 (the chunk's fp32 attention scores over the context)
               + vocab * 4                         (the last position's fp32 logits)

On a GPU the engine's KV pool (kv_cache_mb) is allocated whole up front, so the KV cache term is
at least the pool's size there; on CPU the pool's zeroed pages become resident only as tokens are
stored. The estimate grows with L, so the longest fitting length is found by bisection, then
capped by the model's positions (max_seq_len, which a RoPE-scaled model raises) and the pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.plan.arithmetic import kv_cache_bytes_per_token

MARGIN = 0.9  # of the memory found free, when no budget is given


@dataclass
class ContextFit:
    length: int
    limited_by: str          # "max position", "memory budget" or "engine KV cache"
    budget_bytes: float
    budget_source: str
    estimate_bytes: float    # the estimate at `length`
    max_position: int

    def reason(self) -> str:
        return (f"context {self.length} tokens, limited by the {self.limited_by}: estimated "
                f"{size(self.estimate_bytes)} of a {size(self.budget_bytes)} budget "
                f"({self.budget_source}); the model has {self.max_position} positions")

    def as_dict(self) -> dict:
        return {"length": self.length, "limited_by": self.limited_by, "budget_bytes": self.budget_bytes,
                "budget_source": self.budget_source, "estimate_bytes": self.estimate_bytes,
                "max_position": self.max_position, "reason": self.reason()}


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def generation_memory(cfg, length: int, weight_bytes: float, elem: int, chunk: int, pool_bytes: float = 0) -> float:
    """Bytes to prefill and decode one prompt of `length` tokens (the module docstring's formula);
    pool_bytes: a KV pool allocated whole, whatever the length."""
    c = min(chunk, length)
    kv_layer = 2 * cfg.n_kv_heads * cfg.head_dim * elem
    act = c * (cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim + cfg.n_heads * cfg.head_dim + 3 * cfg.hidden_dim) * elem
    workspace = act + kv_layer * length + c * length * cfg.n_heads * 4 + cfg.vocab_size * 4
    return weight_bytes + max(kv_cache_bytes_per_token(cfg, elem) * length, pool_bytes) + workspace


def available_memory(device: torch.device, held_bytes: float) -> tuple[float, str]:
    """Free memory now (GPU: the driver's free bytes; CPU: MemAvailable) plus what the estimate
    counts that is already allocated (the weights; on a GPU the KV pool); MARGIN of it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free memory on {device}"
    else:
        try:
            with open("/proc/meminfo") as f:
                line = next(l for l in f if l.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            raise LmforgeError("cannot read the available memory here: give needle.memory_gb") from None
        free, where = int(line.split()[1]) * 1024, "MemAvailable"
    held = "the loaded weights and KV pool" if device.type == "cuda" else "the loaded weights"
    return MARGIN * (free + held_bytes), f"{MARGIN:.0%} of {where} + {held}"


def fit_context(backend, memory_gb: float = 0.0, minimum: int = 1) -> ContextFit:
    """The longest context >= minimum for `backend` (an in-process model) within memory_gb GiB
    (0: derived from the memory available now)."""
    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "cfg"):
        raise LmforgeError("needle.max_length=auto needs an in-process model (its size and memory are unknown "
                           "behind an endpoint): give needle.context_lengths instead")
    if memory_gb < 0:
        raise LmforgeError(f"needle.memory_gb must be positive (0: from the available memory), got {memory_gb}")
    cfg, param = model.cfg, next(model.parameters())
    weight_bytes = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    engine = backend.engine() if hasattr(backend, "engine") else None  # what generation will run on
    chunk = engine.config.max_batched_tokens if engine is not None else cfg.max_seq_len
    pool = engine.max_model_len if engine is not None else cfg.max_seq_len  # min(positions, KV pool)
    resident = 0.0
    if engine is not None and param.device.type == "cuda":
        resident = float(sum(t.numel() * t.element_size() for t in vars(engine.cache).values()
                             if isinstance(t, torch.Tensor)))
    if memory_gb:
        budget, source = memory_gb * 2.0 ** 30, "needle.memory_gb"
    else:
        budget, source = available_memory(param.device, weight_bytes + resident)

    def estimate(n: int) -> float:
        return generation_memory(cfg, n, weight_bytes, param.element_size(), chunk, resident)

    ceiling = min(cfg.max_seq_len, pool)
    if estimate(minimum) > budget:
        raise LmforgeError(f"even {minimum} tokens need an estimated {size(estimate(minimum))}, over the "
                           f"{size(budget)} budget ({source})")
    if estimate(ceiling) <= budget:
        length = ceiling
        limited_by = "max position" if ceiling == cfg.max_seq_len else "engine KV cache"
    else:
        lo, hi = minimum, ceiling  # estimate(lo) fits, estimate(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if estimate(mid) <= budget else (lo, mid)
        length, limited_by = lo, "memory budget"
    return ContextFit(length, limited_by, budget, source, estimate(length), cfg.max_seq_len)
