"""AWQ (Lin et al. 2023): activation-aware weight quantisation.

A few input channels carry much larger activations than the rest, and their weights matter more.
AWQ scales each such weight column up by s (and the input down by s, folded into the operation
that produces the input), so that rounding error lands relatively less on the salient channels:

    y = (x / s) Q(W diag(s)),   s = mean|x|^alpha (normalised),  alpha searched on a 0..1 grid

per group of linears that read the same input, minimising ||X W^T - X (Q(W s) / s)^T||^2 on the
calibration activations. Where the input comes from:
    q/k/v  <- input_layernorm   (its weight divided by s)
    gate/up <- post_attention_layernorm
    down   <- up_proj (its rows divided by s: act = silu(gate) * up is linear in up)
    o      <- v_proj, only when every head has its own v (no GQA sharing), else not scaled
Then each group's clipping range is searched (max shrunk by 1.0..0.5) on the same loss.
"""
from __future__ import annotations

import torch

from lmforge.quant.groupwise import fake_quantize, grouped

N_GRID = 20
CLIP_RATIOS = torch.linspace(1.0, 0.5, 11).tolist()
SEARCH_TOKENS = 512   # calibration rows the scale search evaluates its loss on


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return ((x @ (wq - w).t()) ** 2).sum()


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits, group_size, asym) -> torch.Tensor:
    """The per-input-channel scale s (alpha grid search) for linears sharing the input x."""
    sample = x[torch.linspace(0, x.shape[0] - 1, min(SEARCH_TOKENS, x.shape[0])).long()]
    x_mean = x.abs().mean(0)
    best, best_s = None, torch.ones_like(x_mean)
    for alpha in (i / N_GRID for i in range(N_GRID)):
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(sample, w, fake_quantize(w * s, bits, group_size, asym) / s) for w in weights)
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def search_clip(x: torch.Tensor, w: torch.Tensor, bits, group_size, asym) -> torch.Tensor:
    """Per (row, group) shrink factor of the quantisation range that minimises that group's
    output error d^T (X_g^T X_g) d, d = w_g - Q(w_g) (the Gram form: cheap in the token count)."""
    xg = grouped(x, group_size)                          # [tokens, G, g]
    gram = torch.einsum("ngk,ngl->gkl", xg, xg)          # [G, g, g]
    best_err, best_clip = None, None
    for c in CLIP_RATIOS:
        d = grouped(w - fake_quantize(w, bits, group_size, asym, clip=c), group_size)   # [out, G, g]
        err = torch.einsum("ogk,gkl,ogl->og", d, gram, d)
        if best_err is None:
            best_err, best_clip = err, torch.full_like(err, c)
        else:
            better = err < best_err
            best_err, best_clip = torch.where(better, err, best_err), torch.where(better, c, best_clip)
    return best_clip


def _fold(prev_weight: torch.Tensor, linears, s: torch.Tensor) -> None:
    """prev output / s (a norm's weight or a linear's rows), next linears' columns * s."""
    if prev_weight.dim() == 1:
        prev_weight.div_(s)
    else:
        prev_weight.div_(s[:, None])
    for lin in linears:
        lin.weight.mul_(s)


def awq_block(block, inputs: dict, cfg, bits: int, group_size: int, asym: bool) -> dict[str, torch.Tensor]:
    """Scale (folded into the block, in place) and clip search for one decoder block; returns the
    clip ratios per linear name (the caller quantises with them)."""
    attn, mlp = block.self_attn, block.mlp
    groups = [(block.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
              (block.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"),
              (mlp.up_proj.weight, [mlp.down_proj], "mlp.down_proj")]
    if cfg.n_heads == cfg.n_kv_heads:
        groups.append((attn.v_proj.weight, [attn.o_proj], "self_attn.o_proj"))
    for prev, linears, input_name in groups:
        x = inputs[input_name].float()
        s = search_scale(x, [lin.weight.float() for lin in linears], bits, group_size, asym)
        _fold(prev.data, linears, s.to(prev.dtype))
        inputs[input_name] = x / s    # later searches in this block see the scaled input
        for name, lin in block.named_modules():
            if lin in linears:
                inputs[name] = inputs[input_name]
    return {name: search_clip(inputs[name].float(), lin.weight.float(), bits, group_size, asym)
            for name, lin in block.named_modules() if name in inputs}
