"""Activation memory of one transformer layer, by the accounting of Korthikanti et al. (2022),
"Reducing Activation Recomputation in Large Transformer Models", section 4.

The paper counts, per layer, every tensor autograd keeps for the backward pass: 2 bytes per
16-bit element and 1 byte per dropout-mask element. For a GPT layer (MLP width 4h, dropout,
full multi-head attention) that gives sbh(34 + 5as/h) bytes; with tensor parallelism of degree t,
sbh(10 + 24/t + 5as/(ht)); with sequence parallelism as well, sbh(34 + 5as/h)/t.
`gpt_layer_bytes` is that formula verbatim. `layer_bytes` applies the same accounting to any
block shape, including the Llama block lmforge trains (SwiGLU of width f, grouped-query K/V,
no dropout), and reduces to the paper's formula for GPT shapes (the tests check this).
"""
from __future__ import annotations

from dataclasses import dataclass

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class LayerShape:
    hidden: int            # h
    heads: int             # a
    kv_hidden: int         # n_kv_heads * head_dim (= h without GQA)
    ffn: int               # MLP width f (4h in GPT)
    glu: bool = True       # gated MLP (SwiGLU) keeps gate, up, act(gate) and their product
    dropout: bool = False  # GPT keeps 1-byte masks after attention softmax, attention and MLP
    experts_per_token: int = 0  # MoE: each token is copied to k experts; 0 for a dense MLP
    attn_hidden: int | None = None  # n_heads * head_dim when it differs from h


def gpt_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False) -> float:
    """The paper's closed form (16-bit activations, no recomputation)."""
    if sp:
        return s * b * h * (34 + 5 * a * s / h) / t
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def layer_bytes(shape: LayerShape, s: int, b: int, t: int = 1, sp: bool = False, recompute: str = "none",
                flash: bool = False, bytes_per_element: float = 2) -> float:
    """Bytes one layer keeps for backward for a micro-batch of b sequences of length s.

    recompute: "none"; "selective" (the attention core -- QK^T, softmax, dropout, xV -- is
    recomputed, so its s^2 tensors are not stored); "full" (only the layer input is stored; the
    one layer being recomputed during backward is counted separately by the caller).
    flash: attention never materialises the s x s matrices (FlashAttention / fused SDPA).
    bytes_per_element: 2 for bf16/fp16 activations, 4 for fp32; masks stay 1 byte.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}")
    e = bytes_per_element / 2  # the paper's counts are for 2-byte elements
    h, f = shape.hidden, shape.ffn
    attn_h = shape.attn_hidden or h
    sb = s * b
    if recompute == "full":
        return sb * 2 * h * e / (t if sp else 1)
    # Replicated on every tensor-parallel rank unless sequence parallelism splits them:
    # the inputs of both norms, of the QKV projection and of the MLP, and two dropout masks.
    replicated = sb * (4 * h + 2 * h + 2 * h) * e + (sb * 2 * h if shape.dropout else 0)
    # Split across tensor-parallel ranks: Q, K, V, the output-projection input, the MLP inside.
    mlp_inner = (8 if shape.glu else 4) * f
    if shape.experts_per_token:  # per routed copy: the expert's input and its output before weighting
        mlp_inner = shape.experts_per_token * (mlp_inner + 4 * h)
    split = sb * (2 * attn_h + 4 * shape.kv_hidden + 2 * attn_h + mlp_inner) * e
    # The s x s per head tensors: softmax output (2 bytes), plus dropout mask (1) and output (2).
    quadratic = 0.0
    if recompute == "none" and not flash:
        quadratic = shape.heads * s * sb * (2 * e + ((1 + 2 * e) if shape.dropout else 0))
    if sp:
        return (replicated + split + quadratic) / t
    return replicated + (split + quadratic) / t


def output_layer_bytes(s: int, b: int, hidden: int, vocab: int, t: int = 1, sp: bool = False,
                       bytes_per_element: float = 2, fused: bool = False) -> float:
    """What the final norm, the LM head and the loss keep for backward.

    Unfused (the paper's accounting): the norm's and the head's inputs and the fp32 log-softmax
    of the logits, 4 bytes per logit. Fused (lmforge's trainer: loss computed with the head in
    row chunks, gradients formed during the forward pass): the norm's input and output, the
    gradient of the hidden states, and an fp32 gradient of the head weight; the logits of one
    chunk are a transient the caller counts separately (`fused_loss_chunk_bytes`).
    """
    if fused:
        return (s * b * 3 * hidden * bytes_per_element / (t if sp else 1)) + 4 * vocab * hidden / t
    norm_and_head_inputs = s * b * 2 * hidden * bytes_per_element / (t if sp else 1)
    return norm_and_head_inputs + 4 * s * b * vocab / t


def fused_loss_chunk_bytes(vocab: int, t: int = 1, chunk_rows: int = 1024) -> float:
    """The fp32 logits of one chunk of rows, alive while the fused loss runs."""
    return 4 * chunk_rows * vocab / t
