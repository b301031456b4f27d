"""Building blocks of a Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, MoE.

Module names follow the Hugging Face Llama layout (q_proj, gate_proj, input_layernorm, ...) so
that converting checkpoints is a rename of the top-level prefix, nothing more.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import blockwise_attention
from lmforge.model.config import ModelConfig
from lmforge.model.quantized import project


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (or wider: fp64 stays fp64 for exact tests) for stability under bf16
        # autocast (one fused kernel), then cast back.
        acc = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(acc), self.weight.shape, self.weight.to(acc), self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the optional long-context scaling hook."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r}")
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for integer positions of shape [B, T] -> each [B, 1, T, head_dim]."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_attention(q, k, v, q_offset: int = 0) -> torch.Tensor:
    """SDPA over [B, H, T, D] queries and [B, Hkv, S, D] keys, the queries sitting at positions
    q_offset..q_offset+T-1 of the key sequence. GQA heads are expanded inside SDPA."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    q_pos = torch.arange(q_offset, q_offset + T, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# Context-parallel dispatch: lmforge.train.distributed.context_parallel sets this, while a sharded
# forward runs, to a function (q, k, v) -> out that replaces the plain causal call below (ring
# attention over the cp ranks); None (always, outside that forward) is the plain path.
causal_attention_override = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.block = cfg.attention_block if cfg.attention == "blockwise" else 0
        if cfg.qk_norm:  # one learned [head_dim] weight each for q and k, shared by the heads
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, layer: int = 0, mask=None):
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # A cache object owns where K/V live (contiguous, paged, ...) and how attention reads them.
        if cache is not None:
            out = cache.attend(layer, q, k, v)
        elif mask is not None:  # packed documents or padding: a [B, 1, T, T] boolean mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        elif causal_attention_override is not None:  # e.g. ring attention under context parallel
            out = causal_attention_override(q, k, v)
        elif self.block:
            out = blockwise_attention(q, k, v, True, self.block, self.block)
        else:
            out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts with the Switch-Transformer load-balancing loss.

    aux = E * sum_e f_e * P_e, where f_e is the fraction of routed (token, slot) pairs sent to
    expert e and P_e the mean router probability of e; it is 1 when routing is balanced.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_experts_per_token
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.hidden_dim) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())
        self.register_buffer("expert_counts", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        self.expert_counts += counts.detach()
        frac = counts.float() / chosen.numel()
        self.aux_loss = len(self.experts) * (frac * probs.mean(0)).sum()
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, weights[rows, slot, None] * expert(flat[rows]))
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts else SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, cache=None, layer: int = 0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
