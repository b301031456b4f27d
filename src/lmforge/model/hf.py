"""Hugging Face Llama interop: config.json <-> ModelConfig, safetensors (single or sharded).

A model with QK-norm maps to Qwen3, which is Llama plus exactly that (an RMSNorm with a learned
[head_dim] weight over each head's q and k before RoPE, named self_attn.q_norm / k_norm as ours)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig

SUPPORTED_TYPES = ("llama", "qwen3")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") not in SUPPORTED_TYPES:
        raise LmforgeError(f"unsupported model_type {hf.get('model_type')!r}; supported: {SUPPORTED_TYPES}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LmforgeError("Llama variants with attention/MLP biases are not supported")
    if hf.get("use_sliding_window"):
        raise LmforgeError("sliding-window attention (use_sliding_window) is not implemented")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"config.json hidden_act {act!r} is not implemented; lmforge's Llama MLP is SwiGLU (silu)")
    missing = [k for k in REQUIRED_KEYS if k not in hf]
    if missing:
        raise LmforgeError(f"config.json lacks {', '.join(missing)}")
    rope = hf.get("rope_parameters") or {}   # transformers >= 5 nests theta and scaling here
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim_override=head_dim if head_dim != dim // heads else None,
        qk_norm=hf["model_type"] == "qwen3",
    )


def require_llama_layout(cfg: ModelConfig, target: str, qk_norm_ok: bool = False) -> None:
    """Refuse to export what the target format cannot express: it would load without the feature
    and silently compute something else."""
    extras = [name for name, on in (("mixture-of-experts MLPs", cfg.n_experts),
                                    ("QK-norm", cfg.qk_norm and not qk_norm_ok),
                                    ("logit soft-capping", cfg.logit_softcap is not None)) if on]
    if extras:
        raise LmforgeError(f"{target} export: the model uses {' and '.join(extras)}, which the format has "
                           "no field for; save it as an lmforge checkpoint instead")


def config_to_hf(cfg: ModelConfig, extra: dict | None = None) -> dict:
    require_llama_layout(cfg, "Hugging Face", qk_norm_ok=True)
    arch = ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")
    hf = {
        "architectures": [arch[0]], "model_type": arch[1],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        **({"use_sliding_window": False} if cfg.qk_norm else {}),
    }
    return {**hf, **(extra or {})}


def to_hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def from_hf_key(name: str) -> str:
    return name.removeprefix("model.")


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    try:
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for f in files:
                tensors.update(load_file(path / f))
            return tensors
        single = path / "model.safetensors"
        if not single.exists():
            raise LmforgeError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return load_file(single)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: corrupt or unreadable weights ({e})") from e


def write_safetensors_dir(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None):
    """Write one file, or shards plus an index when max_shard_bytes is exceeded (the HF layout)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t, size + nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
