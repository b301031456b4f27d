"""Model arithmetic: which model is meant, how many parameters it has, and what a token costs.

The counting itself lives on `ModelConfig` (`num_params`, `flops_per_token`); this module finds
the config (a preset name, an HF `config.json`, an lmforge checkpoint, a dict) and summarises it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.hf import config_from_hf

# HF architectures whose parameter shapes are a Llama's (sliding windows and routing aside).
LLAMA_SHAPED = ("llama", "mistral", "mixtral")


def config_from_hf_any(hf: dict) -> ModelConfig:
    """`config_from_hf`, widened to Mistral (Llama shapes) and Mixtral (Llama + routed experts)."""
    kind = hf.get("model_type")
    if kind not in LLAMA_SHAPED:
        raise LmforgeError(f"cannot plan model_type {kind!r}; supported: {', '.join(LLAMA_SHAPED)}")
    cfg = config_from_hf({**hf, "model_type": "llama"})
    if kind == "mixtral":
        cfg.n_experts = int(hf.get("num_local_experts", 8))
        cfg.n_experts_per_token = int(hf.get("num_experts_per_tok", 2))
        cfg.validate()
    return cfg


def resolve_model(spec) -> ModelConfig:
    """A ModelConfig from a preset name, a path (config.json, lmforge_model.json or a directory
    holding one), an HF config dict, an lmforge config dict, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        if "hidden_size" in spec or "model_type" in spec:
            return config_from_hf_any(spec)
        return ModelConfig.from_dict(spec)
    name = str(spec)
    if name in PRESETS:
        return preset(name)
    path = Path(name)
    if path.is_dir():
        for candidate in ("lmforge_model.json", "config.json"):
            if (path / candidate).exists():
                path = path / candidate
                break
        else:
            raise LmforgeError(f"{path}: no config.json or lmforge_model.json inside")
    if not path.is_file():
        raise LmforgeError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    try:
        return resolve_model(data)
    except (KeyError, TypeError) as e:
        raise LmforgeError(f"{path}: incomplete model config (missing {e})") from e


@dataclass
class ModelSummary:
    total_params: int          # every parameter stored (all experts)
    active_params: int         # parameters a token passes through (top-k experts only)
    embedding_params: int      # input embedding (and the untied head)
    non_embedding_params: int
    flops_per_token: float     # training FLOPs (forward + backward) per token, attention included
    dense_flops_per_token: float   # the 6N part alone
    attention_flops_per_token: float
    kv_bytes_per_token: float  # K and V of every layer, at kv_bytes per element
    seq_len: int


def summarize(cfg: ModelConfig, seq_len: int | None = None, kv_bytes: float = 2) -> ModelSummary:
    t = seq_len or cfg.max_seq_len
    total = cfg.num_params()
    non_embedding = cfg.num_params(embeddings=False) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    flops = cfg.flops_per_token(t)
    attention = 6 * cfg.n_layers * t * cfg.n_heads * cfg.head_dim  # the term flops_per_token adds to 6N
    return ModelSummary(
        total_params=total, active_params=cfg.num_params(active=True), embedding_params=total - non_embedding,
        non_embedding_params=non_embedding, flops_per_token=flops, dense_flops_per_token=flops - attention,
        attention_flops_per_token=attention, kv_bytes_per_token=kv_cache_bytes_per_token(cfg, kv_bytes), seq_len=t)


def kv_cache_bytes_per_token(cfg: ModelConfig, kv_bytes: float = 2) -> float:
    """K and V for one token across all layers; GQA shrinks it by n_heads / n_kv_heads."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_bytes


def per_layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (all experts), from the config's own count."""
    return (cfg.num_params(embeddings=False) - cfg.dim
            - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)) // cfg.n_layers
