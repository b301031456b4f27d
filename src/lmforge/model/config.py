"""ModelConfig: one dataclass for every Llama-family shape, with named presets."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 768                      # hidden size
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None       # None -> n_heads (plain multi-head attention)
    hidden_dim: int | None = None       # SwiGLU intermediate size; None -> ~8/3 * dim rounded up
    multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"type": "linear", "factor": f} or {"type": "llama3", ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    n_experts: int = 0                  # 0 -> dense SwiGLU MLP; >0 -> MoE with top-k routing
    n_experts_per_token: int = 2
    moe_aux_loss_coef: float = 0.01
    init_std: float = 0.02
    qk_norm: bool = False               # RMSNorm over each head's q and k before RoPE (OLMo2, Gemma 3, Qwen3)
    logit_softcap: float | None = None  # c: logits become c * tanh(logits / c) everywhere (Gemma 2)
    head_dim_override: int | None = field(default=None, repr=False)  # for HF configs with explicit head_dim
    attention: str = "sdpa"             # causal attention without a cache/mask: sdpa | blockwise (attention.py)
    attention_block: int = 128          # blockwise: query and key block size

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            h = int(8 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    def validate(self) -> None:
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if not problems:
            if self.head_dim_override is None and self.dim % self.n_heads:
                problems.append(f"n_heads={self.n_heads} does not divide dim={self.dim}")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
            if self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for RoPE")
            if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts):
                problems.append(f"n_experts_per_token={self.n_experts_per_token} must be in 1..n_experts={self.n_experts}")
        for name in ("multiple_of", "rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.moe_aux_loss_coef < 0:
            problems.append(f"moe_aux_loss_coef must be >= 0 (got {self.moe_aux_loss_coef})")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            problems.append(f"logit_softcap must be positive or null (got {self.logit_softcap})")
        if self.head_dim_override is not None and self.head_dim_override <= 0:
            problems.append(f"head_dim_override must be positive (got {self.head_dim_override})")
        if self.attention not in ATTENTIONS:
            problems.append(f"attention must be one of {', '.join(ATTENTIONS)} (got {self.attention!r})")
        if not self.attention_block > 0:
            problems.append(f"attention_block must be positive (got {self.attention_block})")
        problems += rope_scaling_problems(self.rope_scaling)
        if problems:
            raise LmforgeError("invalid model config: " + "; ".join(problems))

    # --- arithmetic -------------------------------------------------------------------------
    def num_params(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count. active=True counts only the experts a token uses (MoE)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        expert = 3 * d * self.hidden_dim
        if self.n_experts:
            used = self.n_experts_per_token if active else self.n_experts
            mlp = used * expert + d * self.n_experts
        else:
            mlp = expert
        per_layer = attn + mlp + 2 * d + (2 * hd if self.qk_norm else 0)
        total = self.n_layers * per_layer + d
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        else:
            total += 0 if self.tie_embeddings else self.vocab_size * d  # the output head still computes
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * (non-embedding active params incl. LM head) + attention term.

        The attention term is 6 * 2 * n_layers * seq_len * n_heads * head_dim / 2 for causal
        attention (QK^T and AV, half the matrix is masked), following the PaLM/Chinchilla accounting.
        """
        t = seq_len or self.max_seq_len
        n = self.num_params(active=True, embeddings=False)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim  # tied head still costs a matmul
        attn = 6 * self.n_layers * t * self.n_heads * self.head_dim
        return 6 * n + attn

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LmforgeError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


ROPE_SCALING_TYPES = ("default", "linear", "llama3")  # what layers.rope_inv_freq implements
ATTENTIONS = ("sdpa", "blockwise")


def rope_scaling_problems(scaling: dict | None) -> list[str]:
    """Refuse a rope_scaling lmforge cannot honour, rather than silently running plain RoPE."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be a mapping, got {scaling!r}"]
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind not in ROPE_SCALING_TYPES:
        return [f"rope_scaling type {kind!r} is not implemented; supported: {', '.join(ROPE_SCALING_TYPES)}"]
    problems = []
    if kind != "default" and not _number(scaling.get("factor")) > 0:
        problems.append(f"rope_scaling.factor must be a positive number (got {scaling.get('factor')!r})")
    if kind == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        if not 0 < _number(low) < _number(high):
            problems.append(f"rope_scaling needs 0 < low_freq_factor < high_freq_factor (got {low!r}, {high!r})")
        if not _number(old_len) > 0:
            problems.append(f"rope_scaling.original_max_position_embeddings must be positive (got {old_len!r})")
    return problems


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


PRESETS: dict[str, dict] = {
    # ~4M params: trains on 2 CPU cores inside the speedrun's 15-minute budget.
    "tiny": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=704,
                 max_seq_len=256, tie_embeddings=True),
    "tiny-moe": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352,
                     max_seq_len=256, tie_embeddings=True, n_experts=4, n_experts_per_token=2),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                 max_seq_len=2048, tie_embeddings=True),
    # The seed checklist's 1B layout: 40 layers, hidden 2048, intermediate 5504.
    "1b": dict(vocab_size=32000, dim=2048, n_layers=40, n_heads=16, n_kv_heads=16, hidden_dim=5504,
               max_seq_len=2048),
    # Llama-2-7B shapes.
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
               max_seq_len=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# One dial (nanochat's --depth): depth N sets the shape, keeping 64 channels per layer and per head.
# depth=4 is the `tiny` preset's shape.
DEPTH_CHANNELS = 64


def depth_shape(depth: int) -> dict:
    """Width, heads, KV heads (GQA 2:1 when the head count is even) and SwiGLU size for `depth` layers."""
    if depth < 1:
        raise LmforgeError(f"model.depth must be a positive integer, got {depth}")
    dim = DEPTH_CHANNELS * depth
    return dict(n_layers=depth, dim=dim, n_heads=depth, n_kv_heads=depth // 2 if depth % 2 == 0 else depth,
                hidden_dim=None)


def _spec_fields() -> list[tuple]:
    hints = typing.get_type_hints(ModelConfig)
    return [("preset", str | None, field(default="tiny")), ("depth", int | None, field(default=None))] + [
        (f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(ModelConfig)]


# The recipe's `model` section: a preset name, the depth dial, plus any ModelConfig field (None: the
# depth's or the preset's value, or ModelConfig's default when preset is null). Typed, so unknown keys and wrong types are refused.
ModelSpec = dataclasses.make_dataclass("ModelSpec", _spec_fields())
ModelSpec.__module__ = __name__


def spec_to_config(spec, vocab_size: int | None = None) -> ModelConfig:
    values = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    name = values.pop("preset", None)
    depth = values.pop("depth", None)
    if depth is not None:  # the dial sets the shape; fields given beside it still win
        values = {**depth_shape(depth), **values}
    if vocab_size is not None and "vocab_size" not in values:
        values["vocab_size"] = vocab_size
    return preset(name, **values) if name else ModelConfig(**values)
