"""Tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator per layer.

The residual stream after block l is mapped to h + W_l h + b_l before the model's final norm and LM
head; W_l and b_l start at zero (so an untrained tuned lens is the logit lens) and are fit to
minimise KL(final-layer distribution || lens distribution) on some text, the model frozen. The last
layer has no translator: its lens is the model's logits exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.safety.interp import residual_stream


class TunedLens(nn.Module):
    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        if n_layers < 1:
            raise LmforgeError("a tuned lens needs a model with at least one layer")
        self.translators = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers - 1))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    def decode(self, model, cache: list[torch.Tensor]) -> torch.Tensor:
        """[L, B, T, V] logits from the residual streams after each block (cache[1:] of residual_stream)."""
        streams = cache[1:]
        if len(streams) != len(self.translators) + 1:
            raise LmforgeError(f"this tuned lens was fit for {len(self.translators) + 1} layers, "
                               f"the model has {len(streams)}")
        out = [model.lm_head(model.norm(x + t(x))) for x, t in zip(streams, self.translators)]
        return torch.stack(out + [model.lm_head(model.norm(streams[-1]))])

    def forward(self, model, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(model, residual_stream(model, tokens)[1])


def lens_kl(lens_logits: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
    """[L]: mean over tokens of KL(final || lens) for each layer's lens."""
    p_log = final_logits.log_softmax(-1)
    q_log = lens_logits.log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).flatten(1).mean(-1)


def fit_tuned_lens(model, batches, steps: int = 200, lr: float = 1e-3, seed: int = 0) -> TunedLens:
    """Fit the translators on `batches` (a list of [B, T] token tensors, cycled), the model frozen."""
    if not batches:
        raise LmforgeError("fitting a tuned lens needs at least one batch of tokens")
    torch.manual_seed(seed)
    ref = next(model.parameters())
    lens = TunedLens(model.cfg.dim, model.cfg.n_layers).to(device=ref.device, dtype=ref.dtype)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for step in range(steps):
            with torch.no_grad():
                final, cache = residual_stream(model, batches[step % len(batches)])
            loss = lens_kl(lens.decode(model, cache)[:-1], final).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)
    return lens.eval()
