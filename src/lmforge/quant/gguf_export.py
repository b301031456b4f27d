"""Export a Llama model and its tokenizer to a GGUF file (llama.cpp's format): F16, Q8_0, Q4_0 or Q4_K.

The inverse of lmforge.model.gguf: our names -> llama.cpp's, q/k rows re-interleaved per head for
llama.cpp's RoPE, matrix shapes written innermost-first by the writer. Norm weights stay F32 (as
llama.cpp's converter does); a matrix whose rows are not a whole number of 32-value blocks is
written F16. Q4_K needs rows of whole 256-value super-blocks; other matrices go Q4_0 (SmolLM2's
576-wide rows: everything but ffn_down), where llama.cpp's quantiser would use Q5_0. The tokenizer goes in as tokenizer.ggml.* (byte-level BPE: tokens, types, merges,
special ids, pre-tokenizer name) with the chat template, so llama.cpp, transformers' GGUF loader
and lmforge read the model back without any other file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.model.gguf import BLOCK_NAMES, GLOBAL_NAMES
from lmforge.model.hf import require_llama_layout
from lmforge.quant.gguf_blocks import QK, QK_K, quantize_q4_0, quantize_q4_k, quantize_q8_0

TYPES = ("f16", "q8_0", "q4_0", "q4_k")


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Our half-split RoPE rows -> llama.cpp's interleaved pairs: [(h, 2, half), in] -> [(h, half, 2), in]."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    inverse_global = {ours: theirs for theirs, ours in GLOBAL_NAMES.items()}
    if name in inverse_global:
        return inverse_global[name]
    _, index, rest = name.split(".", 2)
    inverse_block = {ours: theirs for theirs, ours in BLOCK_NAMES.items()}
    return f"blk.{index}.{inverse_block[rest.removesuffix('.weight')]}.weight"


def _tensor(writer, name: str, w: np.ndarray, kind: str) -> None:
    from gguf import GGMLQuantizationType as T
    if w.ndim == 1:
        writer.add_tensor(name, w.astype(np.float32))
    elif kind == "f16" or w.shape[-1] % QK:
        writer.add_tensor(name, w.astype(np.float16))
    elif kind == "q8_0":
        writer.add_tensor(name, quantize_q8_0(w), raw_dtype=T.Q8_0)
    elif kind == "q4_k" and w.shape[-1] % QK_K == 0:
        writer.add_tensor(name, quantize_q4_k(w), raw_dtype=T.Q4_K)
    else:
        writer.add_tensor(name, quantize_q4_0(w), raw_dtype=T.Q4_0)


def _tokenizer_fields(writer, tok) -> None:
    if not tok.byte_level and not _is_smollm_pre(tok):
        raise LmforgeError("GGUF export supports byte-level BPE tokenizers only")
    spec = json.loads(tok.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise LmforgeError(f"GGUF export supports BPE tokenizers only, not {model.get('type')}")
    vocab = model["vocab"] | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [1] * size                            # 1 normal, 3 control, 4 user-defined
    for t in spec.get("added_tokens", []):
        types[t["id"]] = 3 if t.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if _is_smollm_pre(tok) else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
        writer.add_pad_token_id(tok.eos_id)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _is_smollm_pre(tok) -> bool:
    """SmolLM's pre-tokenizer: single digits, then GPT-2 byte level (llama.cpp calls it 'smollm')."""
    pre = json.loads(tok.hf.to_str()).get("pre_tokenizer") or {}
    parts = [p.get("type") for p in pre.get("pretokenizers", [])]
    return parts == ["Digits", "ByteLevel"]


def export_gguf(model, tokenizer, path: str | os.PathLike, kind: str = "f16", name: str = "lmforge") -> Path:
    """Write `model` (a float lmforge Transformer) and `tokenizer` to a GGUF file, atomically."""
    from gguf import GGUFWriter, LlamaFileType
    if kind not in TYPES:
        raise LmforgeError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    if getattr(model, "quantization", None):
        raise LmforgeError("export the float model: GGUF blocks are quantised from float weights")
    cfg = model.cfg
    require_llama_layout(cfg, "GGUF")
    scaling = cfg.rope_scaling or {}
    scaling_type = scaling.get("type") or scaling.get("rope_type") or "default"
    if scaling_type not in ("default", "linear"):
        raise LmforgeError(f"GGUF export: rope scaling {scaling_type!r} is not supported")
    path = Path(path)
    if path.is_dir():
        raise LmforgeError(f"{path} is a directory; give a .gguf file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_S}[kind])
        writer.add_block_count(cfg.n_layers)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_feed_forward_length(cfg.hidden_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if scaling_type == "linear":
            from gguf import RopeScalingType
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        _tokenizer_fields(writer, tokenizer)
        state = model.state_dict()
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        for key, t in state.items():
            w = t.detach().float().cpu().numpy()
            if key.endswith("q_proj.weight"):
                w = permute_rope_rows(w, cfg.n_heads)
            elif key.endswith("k_proj.weight"):
                w = permute_rope_rows(w, cfg.n_kv_heads)
            _tensor(writer, gguf_name(key), w, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
