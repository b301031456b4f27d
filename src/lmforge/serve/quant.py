"""INT8 weight-only quantisation: symmetric, one scale per output channel.

    w ~= q * s,  s[o] = max_i |w[o, i]| / 127,  q = round(w / s) in [-127, 127]  (int8)

Activations stay in the model's dtype. The matmul runs on the int8 weights converted to the
activation dtype with the scale applied to the output (x @ q^T) * s, which equals x @ (q * s)^T.
Weights take a quarter of their float32 memory. On a GPU `torch.compile` fuses the conversion
into the matmul; on CPU the conversion costs time (there is no fast weight-only int8 CPU kernel in
stock PyTorch), so INT8 there is a memory saving, not a speed-up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] -> (int8 [out, in], float32 scale [out])."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """Drop-in replacement for a bias-free nn.Linear holding int8 weights and per-row scales."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_per_channel(linear.weight)
        return cls(q.to(linear.weight.device), s.to(linear.weight.device), linear.bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (projections, MLP, LM head) with Int8Linear, in place.

    The token embedding stays in float (a lookup, not a matmul); a tied LM head gets its own
    int8 copy. Modules whose name starts with one of `skip` are left alone."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not name.startswith(skip)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(mod))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
