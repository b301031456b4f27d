"""SmoothQuant (Xiao et al. 2023): int8 weights and int8 activations (W8A8).

Activations of a few input channels are far larger than the rest; quantised per token, those
outliers leave the other channels a handful of levels. SmoothQuant divides each input channel j by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (max over calibration tokens / output rows)

and multiplies the weight's column j by s_j (the product is unchanged), which moves part of the
range from the activations into the weights; alpha = 0.5 splits it evenly. The weights are then
int8 per output row, the activations int8 per token at run time (lmforge.model.w8a8.W8A8Linear,
which holds 1/s and applies it before quantising, so no other layer has to absorb s).

Every linear layer is converted, LM head included. The statistics come from the float model on
calibration text (the stdlib train split), never on the text perplexity is measured on.
"""
from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.w8a8 import W8A8Linear
from lmforge.quant.int8 import linear_targets, quantize_per_channel, replace_module

DEFAULT_ALPHA = 0.5


@torch.no_grad()
def input_absmax(model: nn.Module, calibration: torch.Tensor, rows_per_pass: int = 4) -> dict[str, torch.Tensor]:
    """Per input channel max|x| of every nn.Linear over the calibration tokens [n, T]."""
    stats: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            amax = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return hook

    hooks = [mod.register_forward_pre_hook(record(name)) for name, mod in linear_targets(model)]
    try:
        device = next(model.parameters()).device
        for chunk in calibration.split(rows_per_pass):
            model(chunk.to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth_factors(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_absmax = weight.detach().float().abs().amax(0)
    return (x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)


def w8a8_linear(linear: nn.Linear, x_absmax: torch.Tensor, alpha: float) -> W8A8Linear:
    s = smooth_factors(x_absmax, linear.weight, alpha)
    q, scale = quantize_per_channel(linear.weight.detach().float() * s)
    return W8A8Linear(q, scale, 1.0 / s).to(linear.weight.device)


@torch.no_grad()
def quantize_smoothquant(model: nn.Module, calibration: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """Replace every nn.Linear with a W8A8Linear smoothed on `calibration` [n, T] token ids."""
    if not 0.0 <= alpha <= 1.0:
        raise LmforgeError(f"--alpha must lie in [0, 1], got {alpha}")
    targets = linear_targets(model)
    if any(mod.bias is not None for _, mod in targets):
        raise LmforgeError("smoothquant supports bias-free linear layers (Llama-family models)")
    stats = input_absmax(model, calibration)
    missing = [name for name, _ in targets if name not in stats]
    if missing:   # checked before any layer is replaced: the model is left as it was
        raise LmforgeError(f"calibration never reached {missing[0]!r} (an expert no token was routed to?)")
    layers = {}
    for name, mod in targets:
        replace_module(model, name, w8a8_linear(mod, stats[name], alpha))
        layers[name] = {"format": "w8a8"}
    model.quantization = {"method": "smoothquant", "alpha": alpha, "layers": layers}
    return model
