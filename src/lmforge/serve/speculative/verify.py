"""Accepting draft tokens: exact argmax matching for greedy requests, rejection sampling otherwise.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x, proposed with
probability q(x), is accepted with probability min(1, p(x) / q(x)) where p is the target's
distribution at that position; at the first rejection the replacement is drawn from the residual
max(p - q, 0) (normalised) and the round ends; if every draft token is accepted, one more token is
drawn from the target's next distribution. Each emitted token is then distributed exactly as p.
A prompt-lookup draft is a point mass (q(x) = 1), so its residual is p with x removed.
"""
from __future__ import annotations

import torch

from lmforge.model.sampling import filter_logits
from lmforge.serve.sequence import SamplingParams


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Rows [m, V] -> the distributions the engine's sampler draws from (temperature, top-k,
    top-p), or None when the request decodes greedily (including the sampler's greedy limits)."""
    if params.greedy or torch.tensor(params.top_p, dtype=logits.dtype) == 0:
        return None
    scaled = logits.float() / params.temperature
    if not bool(torch.isfinite(scaled.max(-1).values).all()):
        return None
    return filter_logits(scaled, params.top_k, params.top_p).softmax(-1)


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """logits [k+1, V] at the last real token and each draft token -> the tokens to emit."""
    best = logits.argmax(-1).tolist()
    out = []
    for token, target in zip(draft, best):
        if token != target:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


def verify_sampled(probs: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> list[int]:
    """probs [k+1, V] target distributions, draft_probs [k, V] the proposal (None: point masses)
    -> the tokens to emit (1..k+1), distributed as the target."""
    uniforms = torch.rand(len(draft), generator=generator, device=probs.device).tolist() if draft else []
    out = []
    for i, token in enumerate(draft):
        p = float(probs[i, token])
        q = float(draft_probs[i, token]) if draft_probs is not None else 1.0
        if uniforms[i] * q < p:         # accept with probability min(1, p / q)
            out.append(token)
            continue
        if draft_probs is not None:
            residual = (probs[i] - draft_probs[i]).clamp_min(0)
        else:
            residual = probs[i].clone()
            residual[token] = 0
        if not float(residual.sum()) > 0:  # only reachable through rounding when q == p
            residual = probs[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out
