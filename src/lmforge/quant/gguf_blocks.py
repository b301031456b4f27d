"""llama.cpp's Q8_0 and Q4_0 blocks, written here (and checked byte for byte against
`gguf.quants.quantize`). Both cut each row into blocks of 32 values with one float16 scale d:

    Q8_0: d = max|x| / 127,  q = round_half_away(x / d)  (int8)            -> 2 + 32 bytes
    Q4_0: m = the value of largest |x| (sign kept), d = m / -8,
          q = min(15, trunc(x / d + 8.5))  (4 bits; x ~= d (q - 8))      -> 2 + 16 bytes,
          byte i holds q[i] (low nibble) and q[i + 16] (high nibble)
All arithmetic is float32, with 1/d multiplied (as ggml does), so the bytes match exactly.
"""
from __future__ import annotations

import numpy as np
import torch

QK = 32


def _blocks(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, QK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def _with_scale(d: torch.Tensor, payload: torch.Tensor, rows: int) -> np.ndarray:
    d16 = d.to(torch.float16).view(torch.uint8).view(-1, 2)
    return torch.cat([d16, payload], dim=1).reshape(rows, -1).numpy()


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float (cols a multiple of 32) -> uint8 [rows, cols / 32 * 34]."""
    b = _blocks(x)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return _with_scale(d, q, x.shape[0])


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float (cols a multiple of 32) -> uint8 [rows, cols / 32 * 18]."""
    b = _blocks(x)
    m = b.gather(1, b.abs().argmax(dim=1, keepdim=True))
    d = m / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[:, :QK // 2] | (q[:, QK // 2:] << 4)
    return _with_scale(d, packed, x.shape[0])
