"""INT8 weight-only quantisation: symmetric, one scale per output channel.

    w ~= q * s,  s[o] = max_i |w[o, i]| / 127,  q = round(w / s) in [-127, 127]  (int8)

Weights take a quarter of their float32 memory, and decoding reads a quarter of the bytes:
- CPU: PyTorch's int8-weight matmul kernel (`_weight_int8pack_mm`, the one gpt-fast uses) with
  bfloat16 activations and the per-channel scale applied in float32 afterwards. Decoding is
  memory-bound, so this is about 2x faster than float32 (SmolLM2-135M: 30 vs 57 ms/token).
- elsewhere (GPU): (x @ q^T) * s with q converted to the activation dtype; `torch.compile`
  fuses the conversion into the matmul.
The quality cost is measured as perplexity on held-out text (`lmforge int8-report`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_CPU_INT8_MM = hasattr(torch, "_weight_int8pack_mm")


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
        if x.device.type == "cpu" and _CPU_INT8_MM:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            ones = torch.ones(self.out_features, dtype=torch.bfloat16)
            y = (torch._weight_int8pack_mm(flat, self.qweight, ones).float() * self.scale)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
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
