"""GPTQ (Frantar et al. 2022): quantise a weight column by column, each column's rounding error
spread over the not-yet-quantised columns through the inverse Hessian of the layer's output loss.

    loss(W') = ||X W^T - X W'^T||^2,   H = 2 X^T X / n  (+ damping * mean(diag H) on the diagonal)
    for column j: q_j = Q(w_j);  e = (w_j - q_j) / [H^-1]_jj;  W[:, j+1:] -= e [H^-1]_{j, j+1:}

using the upper Cholesky factor of H^-1, in blocks of columns (lazy batch updates). Groups take
their scale and zero point from the (already error-updated) weights when their first column comes
up. With act-order, columns go in order of decreasing diag(H) (most active inputs first); the group
grid is then fixed from the original weights before the loop ("static groups"), so a group's codes
still share one scale whatever order its columns are visited in (what the checkpoint stores).
"""
from __future__ import annotations

import torch

from lmforge.quant.groupwise import group_params

DAMP = 0.01
BLOCK = 128


def hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    h.diagonal().add_(DAMP * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128, asym: bool = False,
         act_order: bool = False):
    """-> (codes [out, in], scale, zero [out, n_groups]) of weight w [out, in] given H [in, in]."""
    w = w.detach().double().clone()
    out, n = w.shape
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    levels = 2 ** bits - 1
    n_groups = -(-n // group_size)
    scale = torch.zeros(out, n_groups, dtype=torch.float64)
    zero = torch.zeros(out, n_groups, dtype=torch.float64)
    if act_order:
        scale[:], zero[:] = group_params(w, bits, group_size, asym)
        perm = torch.argsort(h.diagonal(), descending=True)
    else:
        perm = torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)
    codes = torch.zeros(out, n, dtype=torch.float64)
    block = max(BLOCK, group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:   # block is a multiple of the group: all in w1
                scale[:, g:g + 1], zero[:, g:g + 1] = group_params(w1[:, i:i + group_size], bits, group_size, asym)
            q = torch.clamp(torch.round(w1[:, i] / scale[:, g]) + zero[:, g], 0, levels)
            codes[:, i1 + i] = q
            e = (w1[:, i] - scale[:, g] * (q - zero[:, g])) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scale.float(), zero.float()
