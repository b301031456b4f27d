"""llama.cpp's Q8_0, Q4_0 and Q4_K blocks, written here. Q8_0 and Q4_0 cut each row into blocks of
32 values with one float16 scale d, and are checked byte for byte against `gguf.quants.quantize`:

    Q8_0: d = max|x| / 127,  q = round_half_away(x / d)  (int8)            -> 2 + 32 bytes
    Q4_0: m = the value of largest |x| (sign kept), d = m / -8,
          q = min(15, trunc(x / d + 8.5))  (4 bits; x ~= d (q - 8))      -> 2 + 16 bytes,
          byte i holds q[i] (low nibble) and q[i + 16] (high nibble)
All arithmetic is float32, with 1/d multiplied (as ggml does), so the bytes match exactly.

Q4_K ("k-quant") cuts a row into super-blocks of 256 values = 8 sub-blocks of 32, each with its own
scale and minimum: x ~= d * sc_j * q - dmin * m_j, q 4 bits, sc_j and m_j 6-bit codes of the
sub-block's scale and (negated) minimum against two float16 super-block scales d and dmin
-> 2 + 2 + 12 + 128 = 144 bytes per 256 values (4.5 bits each, as Q4_0). gguf-py has no Q4_K
quantiser to compare bytes with, so the test checks its dequantiser reads back exactly the values
meant here. Each sub-block's scale and minimum are fitted by a small search (the idea of
llama.cpp's make_qkx2_quants, weights |x| + rms(x)): rounding grids around the min-max one, each
followed by a weighted least-squares fit of scale and minimum to the codes it gives; the best fit wins.
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


QK_K = 256           # values per Q4_K super-block
_FIT_STEPS = 20      # grids tried per sub-block: scale 15 + (-1 + 0.1 i) steps over the range, i = 0..20


def _fit_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-blocks b [n, 32] -> (scale >= 0, low <= 0) [n, 1] with b ~= scale * q + low, q in 0..15."""
    w = b.pow(2).mean(1, keepdim=True).sqrt() + b.abs()          # larger values matter more
    low = b.amin(1, keepdim=True).clamp(max=0)
    span = b.amax(1, keepdim=True) - low
    best_s, best_low = span / 15, low

    def error(s, lo):
        q = _round_half_away((b - lo) * _inverse(s)).clamp(0, 15)
        return (w * (s * q + lo - b).pow(2)).sum(1, keepdim=True)
    best = error(best_s, best_low)
    for i in range(_FIT_STEPS + 1):
        q = _round_half_away((b - low) * ((15 - 1 + 0.1 * i) * _inverse(span))).clamp(0, 15)
        sw, sq, sqq = w.sum(1, keepdim=True), (w * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)
        sx, sqx = (w * b).sum(1, keepdim=True), (w * q * b).sum(1, keepdim=True)
        det = sw * sqq - sq * sq
        ok = det > 0
        s = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1), 0)
        lo = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1), 0)
        positive = lo > 0                                          # the minimum is kept <= 0
        lo = torch.where(positive, 0, lo)
        s = torch.where(positive, sqx * _inverse(sqq), s).clamp(min=0)
        err = (w * (s * q + lo - b).pow(2)).sum(1, keepdim=True)   # with these codes, not re-rounded
        better = ok & (err < best)
        best_s, best_low, best = torch.where(better, s, best_s), torch.where(better, lo, best_low), torch.where(better, err, best)
    return best_s, best_low


def _pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """6-bit codes [n, 8] -> llama.cpp's 12 bytes: bytes 0-3 and 4-7 hold the low 6 bits of sc / m for
    sub-blocks 0-3 plus, in their top 2 bits, bits 4-5 of sub-blocks 4-7; bytes 8-11 hold bits 0-3 of
    sc (low nibble) and m (high nibble) of sub-blocks 4-7."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6), (hi_sc & 15) | ((hi_mn & 15) << 4)], 1)


def q4_k_fields(x: np.ndarray) -> dict[str, torch.Tensor]:
    """The Q4_K encoding of [rows, cols] (cols a multiple of 256), field by field: d, dmin [n] (as
    float16 stores them), sc, m [n, 8] (6-bit), q [n, 8, 32] (4-bit), n = rows * cols / 256."""
    sub = _blocks(x)
    scale, low = _fit_scale_min(sub)
    scale, neg_low = scale.view(-1, 8), (-low).view(-1, 8)
    d = (scale.amax(1) / 63).to(torch.float16).float()
    dmin = (neg_low.amax(1) / 63).to(torch.float16).float()
    sc = _round_half_away(scale * _inverse(d)[:, None]).clamp(0, 63)
    mn = _round_half_away(neg_low * _inverse(dmin)[:, None]).clamp(0, 63)
    step, offset = (d[:, None] * sc).view(-1, 1), (dmin[:, None] * mn).view(-1, 1)
    q = _round_half_away((sub + offset) * _inverse(step)).clamp(0, 15)
    return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": mn.to(torch.uint8), "q": q.to(torch.uint8).view(-1, 8, QK)}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float (cols a multiple of 256) -> uint8 [rows, cols / 256 * 144]."""
    f = q4_k_fields(x)
    halves = lambda v: v.to(torch.float16).view(torch.uint8).view(-1, 2)  # noqa: E731
    q = f["q"].view(-1, 4, 2, QK)                  # byte l of 32-byte chunk c: sub-block 2c (low), 2c + 1 (high)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    blocks = torch.cat([halves(f["d"]), halves(f["dmin"]), _pack_scales(f["sc"], f["m"]), qs], dim=1)
    return blocks.reshape(x.shape[0], -1).numpy()
