"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

A gradient averaged over B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measuring |G_B|^2 at
two batch sizes gives unbiased estimates of both unknowns:
    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
Single-step estimates are noisy (and can be negative); the paper averages each over many steps
before taking the ratio, which `NoiseScaleTracker` does with exponential moving averages.
B_simple is roughly the batch size beyond which larger batches stop paying for themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError


@dataclass
class NoiseScale:
    grad_sq: float       # |G|^2 estimate (true-gradient squared norm)
    trace_sigma: float   # tr(Sigma) estimate (per-example gradient variance)

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else math.inf


def noise_scale(b_small: float, g2_small: float, b_big: float, g2_big: float) -> NoiseScale:
    """Estimate |G|^2 and tr(Sigma) from squared gradient norms measured at two batch sizes."""
    if not 0 < b_small < b_big:
        raise LmforgeError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
    if g2_small < 0 or g2_big < 0:
        raise LmforgeError("squared gradient norms cannot be negative")
    grad_sq = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return NoiseScale(grad_sq, trace)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).float() for p in model.parameters() if p.grad is not None])


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The language-modelling loss of an lmforge Transformer on [B, T+1] token windows."""
    from lmforge.model import lm_loss
    return lm_loss(model(tokens[:, :-1]), tokens[:, 1:])


def measure_noise_scale(model: torch.nn.Module, batch: torch.Tensor, small: int,
                        loss_fn=next_token_loss) -> NoiseScale:
    """Gradient noise scale of `model` on one batch (examples along dim 0).

    The batch is cut into chunks of `small` examples; |G_small|^2 is the mean squared norm of the
    chunk gradients and |G_big|^2 the squared norm of their mean (the full-batch gradient), so one
    big batch yields both measurements. `loss_fn(model, examples)` returns the mean loss.
    Gradients already on the model are restored afterwards.
    """
    n_chunks = batch.shape[0] // small
    if small < 1 or n_chunks < 2:
        raise LmforgeError(f"a batch of {batch.shape[0]} holds fewer than two chunks of {small}")
    saved = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    total, sq_norms = None, []
    for i in range(n_chunks):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch[i * small:(i + 1) * small]).backward()
        g = _flat_grad(model)
        sq_norms.append(float(g.pow(2).sum()))
        total = g if total is None else total + g
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    g2_small = sum(sq_norms) / n_chunks
    g2_big = float((total / n_chunks).pow(2).sum())
    return noise_scale(small, g2_small, small * n_chunks, g2_big)


class NoiseScaleTracker:
    """Exponential moving averages of |G|^2 and tr(Sigma); B_simple is the ratio of the averages."""

    def __init__(self, decay: float = 0.95):
        self.decay, self.grad_sq, self.trace_sigma, self.steps = decay, 0.0, 0.0, 0

    def update(self, estimate: NoiseScale) -> float:
        d = self.decay
        self.grad_sq = d * self.grad_sq + (1 - d) * estimate.grad_sq
        self.trace_sigma = d * self.trace_sigma + (1 - d) * estimate.trace_sigma
        self.steps += 1
        return self.b_simple

    @property
    def b_simple(self) -> float:
        # The two averages share the same bias correction, so their ratio needs none.
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else math.inf
