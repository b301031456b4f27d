"""NormalFloat-4 (QLoRA, Dettmers et al. 2023) with double quantisation, in plain torch.

A weight is flattened and cut into blocks of 64; each block is divided by its absolute maximum and
every value is replaced by the index (4 bits) of the nearest of the 16 NF4 levels. The 32-bit
absmax constants are themselves quantised ("double quantisation"): their mean is subtracted and
they are cut into blocks of 256, each stored as 8-bit codes plus one fp32 scale. Storage per
parameter: 4 + 8/64 + 32/(64*256) = 4.127 bits (the paper's figure), against 4.5 without it.

The second-level quantiser here is symmetric linear int8 (the paper and bitsandbytes use an 8-bit
float code); the layout and the bits per parameter are the same.

NF4Linear holds a frozen quantised weight and dequantises it on the fly in forward (QLoRA's base
layers). When the weight lives on CUDA and bitsandbytes is importable, its 4-bit kernels are used
instead. For a saved checkpoint (`lmforge quantize --method nf4`), nf4_int4_linear stores the same
codes in the model's codebook Int4Linear, with each block's absmax after double quantisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.quantized import Int4Linear

BLOCK = 64          # values per absmax constant
ABSMAX_BLOCK = 256  # absmax constants per second-level scale


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels: quantiles of N(0, 1) spaced so that 0 is exact, normalised to [-1, 1].

    8 positive quantiles at probabilities linspace(offset, 1/2, 9)[:-1], 7 negative ones at
    linspace(offset, 1/2, 8)[:-1] mirrored, and 0; offset = 1 - (1/32 + 1/30)/2 keeps the extreme
    quantiles finite (the midpoint of where a 16- and a 15-level grid put their last point).
    """
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.max()).float()


LEVELS = nf4_levels()
# Midpoints between neighbouring levels: bucketize against them gives the nearest level's index.
_BOUNDARIES = (LEVELS[1:] + LEVELS[:-1]) / 2


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-flat.numel()) % multiple
    return F.pad(flat, (0, extra)) if extra else flat


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantise a float tensor; returns the packed codes and the double-quantised absmax."""
    w = _pad_to(weight.detach().float().reshape(-1), BLOCK).view(-1, BLOCK)
    absmax = w.abs().amax(dim=1)
    normalised = w / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(normalised, _BOUNDARIES.to(w.device)).to(torch.uint8).view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]  # two 4-bit codes per byte
    mean = absmax.mean()
    centred = _pad_to(absmax - mean, ABSMAX_BLOCK).view(-1, ABSMAX_BLOCK)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    absmax_codes = torch.round(centred / scale[:, None] * 127).to(torch.int8).view(-1)
    return {"packed": packed, "absmax_codes": absmax_codes, "absmax_scale": scale, "absmax_mean": mean}


def dequantize_nf4(q: dict[str, torch.Tensor], shape: torch.Size, dtype=torch.float32) -> torch.Tensor:
    n_blocks = -(-shape.numel() // BLOCK)
    centred = q["absmax_codes"].float().view(-1, ABSMAX_BLOCK) / 127 * q["absmax_scale"][:, None]
    absmax = centred.view(-1)[:n_blocks] + q["absmax_mean"]
    packed = q["packed"]
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1).long()
    values = LEVELS.to(packed.device)[codes].view(-1, BLOCK) * absmax[:, None]
    return values.view(-1)[:shape.numel()].view(shape).to(dtype)


def storage_bytes(q: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in q.values())


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 with double quantisation."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.is_meta:
            raise LmforgeError("cannot quantise a weight that has not been materialised (meta device)")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = w.dtype
        self.weight_shape = w.shape
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        bnb = _bitsandbytes() if w.is_cuda else None
        self.bnb_state = None
        if bnb is not None:  # CUDA kernels; quant_state carries bitsandbytes' own absmax layout
            packed, self.bnb_state = bnb.functional.quantize_4bit(
                w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
            self.register_buffer("packed", packed)
            return
        for name, tensor in quantize_nf4(w).items():
            self.register_buffer(name, tensor)

    def quantized(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "absmax_codes": self.absmax_codes,
                "absmax_scale": self.absmax_scale, "absmax_mean": self.absmax_mean}

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.bnb_state is not None:
            return _bitsandbytes().functional.dequantize_4bit(self.packed, self.bnb_state).to(dtype)
        return dequantize_nf4(self.quantized(), self.weight_shape, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bnb_state is not None:
            out = _bitsandbytes().matmul_4bit(x, self.packed.t(), quant_state=self.bnb_state)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double-quant"


def nf4_int4_linear(linear: nn.Linear) -> Int4Linear:
    """The NF4 (double-quantised) weight as a codebook Int4Linear: r = absmax * LEVELS[code], one
    group per block of 64 inputs of a row (rows are padded to whole blocks so blocks never span rows)."""
    w = linear.weight.detach().float()
    padded = F.pad(w, (0, (-w.shape[1]) % BLOCK))
    q = quantize_nf4(padded)
    n_blocks = padded.numel() // BLOCK
    centred = q["absmax_codes"].float().view(-1, ABSMAX_BLOCK) / 127 * q["absmax_scale"][:, None]
    absmax = (centred.view(-1)[:n_blocks] + q["absmax_mean"]).view(w.shape[0], -1)
    codes = torch.stack([q["packed"] >> 4, q["packed"] & 0x0F], dim=1).view(padded.shape)[:, :w.shape[1]]
    layer = Int4Linear.from_codes(codes.cpu(), absmax.cpu(), None, BLOCK, codebook=LEVELS)
    return layer.to(w.device)
