"""INT8 weight-only quantisation: symmetric, one scale per output channel.

    w ~= q * s,  s[o] = max_i |w[o, i]| / 127,  q = round(w / s) in [-127, 127]  (int8)

Weights take a quarter of their float32 memory and decoding reads a quarter of the bytes; the
layer that multiplies them (CPU int8 kernel) is lmforge.model.quantized.Int8Linear. The quality
cost is measured as perplexity on held-out text (`lmforge int8-report`, benchmarks/quant_quality.py).
"""
from __future__ import annotations

import torch
from torch import nn

from lmforge.model.quantized import Int8Linear


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] -> (int8 [out, in], float32 scale [out])."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(linear: nn.Linear) -> Int8Linear:
    q, s = quantize_per_channel(linear.weight)
    device = linear.weight.device
    return Int8Linear(q.to(device), s.to(device), linear.bias)


def linear_targets(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not name.startswith(skip)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (projections, MLP, LM head) with Int8Linear, in place, and record
    it in `model.quantization` (what a checkpoint saves).

    The token embedding stays in float (a lookup, not a matmul); a tied LM head gets its own
    int8 copy. Modules whose name starts with one of `skip` are left alone."""
    layers = {}
    for name, mod in linear_targets(model, skip):
        replace_module(model, name, int8_linear(mod))
        layers[name] = {"format": "int8"}
    model.quantization = {"method": "int8", "layers": {**getattr(model, "quantization", {}).get("layers", {}),
                                                        **layers}}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
