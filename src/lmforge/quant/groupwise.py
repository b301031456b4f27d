"""Group-wise low-bit quantisation with round-to-nearest (RTN): the grid every int4 method uses.

Each row of a weight [out, in] is cut into groups of g inputs; each group gets a scale S and a
zero point Z, and each value an integer code q in 0..2^b - 1:

    asymmetric: S = (max - min) / (2^b - 1), Z = round(-min / S),   q = clamp(round(w / S) + Z)
    symmetric:  S = max|w| / (2^(b-1) - 1),  Z = 2^(b-1),           q = clamp(round(w / S) + Z)
    reconstruction: r = S (q - Z)

Symmetric grids put 0 exactly on a code and need no per-group zero point; asymmetric ones use all
2^b codes on the group's actual range. A last group shorter than g (in not a multiple of g) is
padded with zeros, which only widens an asymmetric range to include 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.quantized import Int4Linear

BITS = (2, 3, 4)           # what the 4-bit container holds
GROUP_SIZES = (32, 64, 128, 256)


def check_grid(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise LmforgeError(f"--bits must be one of {BITS} for group-wise methods, got {bits}")
    if group_size not in GROUP_SIZES:
        raise LmforgeError(f"--group-size must be one of {GROUP_SIZES}, got {group_size}")


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g], zero-padded."""
    out, n = w.shape
    return F.pad(w, (0, (-n) % group_size)).view(out, -1, group_size)


def group_params(w: torch.Tensor, bits: int, group_size: int, asym: bool,
                 clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out, n_groups] for each group; `clip` shrinks the range (AWQ's search)."""
    g = grouped(w.float(), group_size)
    levels = 2 ** bits - 1
    if asym:
        hi, lo = g.amax(-1) * clip, g.amin(-1) * clip
        scale = ((hi - lo) / levels).clamp_min(1e-10)
        zero = torch.round(-lo / scale).clamp(0, levels)
    else:
        scale = (g.abs().amax(-1) * clip / (2 ** (bits - 1) - 1)).clamp_min(1e-10)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group_size: int) -> torch.Tensor:
    """Codes [out, in] of w on the given grid (round to nearest, clamped)."""
    g = grouped(w.float(), group_size)
    q = torch.round(g / scale[..., None]) + zero[..., None]
    return q.clamp(0, 2 ** bits - 1).view(w.shape[0], -1)[:, :w.shape[1]]


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """r = S (q - Z), [out, in]."""
    g = grouped(q.float(), group_size)
    return (scale[..., None] * (g - zero[..., None])).view(q.shape[0], -1)[:, :q.shape[1]]


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, asym: bool = False):
    """-> (codes, scale, zero) of w by round-to-nearest."""
    scale, zero = group_params(w, bits, group_size, asym)
    return quantize_with(w, scale, zero, bits, group_size), scale, zero


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, asym: bool, clip=1.0) -> torch.Tensor:
    """w after a quantise-dequantise round trip (what the model will compute with)."""
    scale, zero = group_params(w, bits, group_size, asym, clip)
    return dequantize(quantize_with(w, scale, zero, bits, group_size), scale, zero, group_size)


def int4_linear(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                device=None) -> Int4Linear:
    layer = Int4Linear.from_codes(q.to(torch.uint8).cpu(), scale.cpu(), zero.cpu(), group_size)
    return layer.to(device) if device is not None else layer


def rtn_linear(linear: nn.Linear, bits: int = 4, group_size: int = 128, asym: bool = False) -> Int4Linear:
    return int4_linear(*rtn(linear.weight.detach(), bits, group_size, asym), group_size, linear.weight.device)
