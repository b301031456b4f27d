"""GGUF (llama.cpp) files: Llama-architecture weights, dequantised (the tokenizer: lmforge.tokenizer.gguf),
or, with keep_int4, the Q4_0/Q4_1 matrices kept as they are, as Int4Linear codes (see int4_from_blocks).

Two facts about llama.cpp's converter that a loader must undo:
- GGUF stores matrix shapes innermost-first ([in, out]); `gguf.quants.dequantize` returns numpy's
  [out, in], which is what nn.Linear wants.
- q_proj/k_proj rows are permuted so that each head's rotary pairs are interleaved (llama.cpp's
  RoPE rotates (x0, x1), (x2, x3), ...). Our RoPE rotates halves (x_i, x_{i+D/2}), so the rows
  are permuted back per head.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.gguf_file import gguf_field, open_gguf
from lmforge.model.config import ModelConfig

SUPPORTED_ARCHS = ("llama",)
__all__ = ["gguf_config", "gguf_state_dict", "int4_from_blocks", "read_gguf_model", "unpermute_rope_rows"]
QK = 32                                      # values per Q4_0 / Q4_1 block
INT4_BLOCKS = {"Q4_0": 18, "Q4_1": 20}       # bytes per block: fp16 d [, fp16 m], 16 bytes of nibbles

# llama.cpp tensor names -> ours (HF Llama layout without the "model." prefix).
GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_config(reader, where="gguf") -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmforgeError(f"{where}: architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
    get = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    if get("expert_count", 0):
        raise LmforgeError(f"{where}: mixture-of-experts GGUF files are not supported")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise LmforgeError(f"{where}: rope scaling {scaling_type!r} is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise LmforgeError(f"{where}: per-frequency rope factors (Llama 3.1 style) are not supported")
    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or dim // heads)
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
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
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in BLOCK_NAMES:
        return f"layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.weight"
    return None


def int4_from_blocks(raw: np.ndarray, kind: str, rows: int, cols: int):
    """A Q4_0 / Q4_1 matrix's bytes [rows, cols / 32 * block bytes] -> (codes [rows, cols] 0..15,
    scales S and zero points Z [rows, cols / 32]) with the block's value = S (q - Z) exactly as in the
    file: Q4_0 is d (q - 8), so S = d, Z = 8; Q4_1 is d q + m, so S = d, Z = -m / d (a block with
    d = 0 holds m everywhere: S = m, Z = -1, codes 0). Byte i of a block holds code i in its low
    nibble and code i + 16 in its high one."""
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(rows, cols // QK, INT4_BLOCKS[kind]))
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    nibbles = blocks[..., -QK // 2:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)                   # [rows, groups, 32]
    if kind == "Q4_0":
        scales, zeros = d, torch.full_like(d, 8.0)
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        flat = d == 0
        scales = torch.where(flat, m, d)
        zeros = torch.where(flat, -1.0, -m / torch.where(flat, 1.0, d))
        q = torch.where(flat[..., None], 0, q)
    return q.reshape(rows, cols), scales, zeros


def gguf_state_dict(reader, cfg: ModelConfig, where="gguf", keep_int4: bool = False):
    """-> (weights under our parameter names, quantisation spec or None). Everything is dequantised to
    float32, except, with keep_int4, the decoder's linear layers stored as Q4_0/Q4_1: those become
    Int4Linear state (codes, scales, zero points), listed in the spec."""
    from gguf.quants import dequantize

    from lmforge.model.quantized import Int4Linear
    state, layers = {}, {}
    for t in reader.tensors:
        name = _our_name(t.name)
        if name is None:
            raise LmforgeError(f"{where}: unexpected tensor {t.name!r}")
        expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads if name.endswith("k_proj.weight") else 0
        if keep_int4 and t.tensor_type.name in INT4_BLOCKS and name.startswith("layers."):
            q, scales, zeros = int4_from_blocks(t.data, t.tensor_type.name, *expected)
            if heads:
                q, scales, zeros = (torch.from_numpy(unpermute_rope_rows(x.numpy(), heads)) for x in (q, scales, zeros))
            prefix = name.removesuffix(".weight")
            layer = Int4Linear.from_codes(q, scales, zeros, QK)
            state.update({f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
            layers[prefix] = {"format": "int4", "group_size": QK}
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise LmforgeError(f"{where}: {t.name} uses unsupported quantisation {t.tensor_type.name}") from e
        w = np.asarray(w, dtype=np.float32).reshape(expected)
        if heads:
            w = unpermute_rope_rows(w, heads)
        state[name] = torch.from_numpy(w.copy() if not w.flags.writeable else np.ascontiguousarray(w))
    return state, ({"method": "gguf", "layers": layers} if layers else None)


def read_gguf_model(path: str | os.PathLike, keep_int4: bool = False):
    """(config, weights, quantisation spec or None) of a GGUF file; `model.load` builds the model."""
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    return (cfg, *gguf_state_dict(reader, cfg, path, keep_int4))
