"""Positions and attention masks for packed documents and padded batches.

Packing several documents into one row must not let a token attend across a document boundary,
and each document's rotary positions must restart at 0, so a packed row computes exactly what
each document would alone. Padding works the same way: padded keys are never attended to and
real tokens are numbered from 0 (cumsum of the mask - 1), so a left-padded row equals its
unpadded self.
"""
from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


def _check_shape(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if t.shape != shape:
        raise LmforgeError(f"{name} must have the tokens' shape {tuple(shape)}, got {tuple(t.shape)}")


def doc_ids_from_lengths(lengths: list[int], device=None) -> torch.Tensor:
    """Document lengths [n1, n2, ...] packed into one row -> doc_ids [1, sum] (0, 0, 1, 1, 1, ...)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))[None]


def packed_layout(shape: torch.Size, doc_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (positions [B, T], attention mask [B, 1, T, T], True = may attend), or (None, None) when
    plain causal attention over the whole row is already right (the fast is_causal path)."""
    real = None
    if attention_mask is not None:
        _check_shape("attention_mask", attention_mask, shape)
        real = attention_mask.to(device=device, dtype=torch.bool)
        if doc_ids is None and bool(real.all()):
            return None, None
    if doc_ids is None and real is None:
        return None, None
    B, T = shape
    idx = torch.arange(T, device=device)
    allowed = (idx[None, :] <= idx[:, None]).expand(B, T, T)  # causal: key <= query
    if doc_ids is not None:
        _check_shape("doc_ids", doc_ids, shape)
        doc_ids = doc_ids.to(device)
        # A new run starts where the document id changes (or padding starts/ends): runs, not raw
        # ids, decide who sees whom, so a reused id further along the row is still a new document.
        starts = torch.ones(B, T, dtype=torch.bool, device=device)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        if real is not None:
            starts[:, 1:] |= real[:, 1:] != real[:, :-1]
        run = starts.cumsum(1)
        allowed = allowed & (run[:, :, None] == run[:, None, :])
        positions = idx - torch.where(starts, idx, 0).cummax(1).values
    else:
        positions = (real.long().cumsum(1) - 1).clamp_min(0)
    if real is not None:
        allowed = allowed & real[:, None, :]
    # A padded query that may see nothing is a 0/0 softmax: today's CPU SDPA returns zeros, but
    # other kernels and exports have returned NaN (pytorch#103749, #109517). Let it see itself.
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
    return positions, allowed[:, None]
