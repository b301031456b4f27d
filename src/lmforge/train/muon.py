"""Muon: momentum, then each 2-D weight update replaced by its nearest semi-orthogonal matrix
(Newton–Schulz iteration), as in Keller Jordan's Muon and nanochat; AdamW for everything else.

Only the hidden matrices (attention and MLP projections) use Muon. The embedding, the LM head,
norms and biases keep AdamW: their rows are looked up or read out one token at a time, so an
orthogonalised update has no meaning there. One optimizer object holds both kinds of group, so
checkpoints and exact resume see a single state dict.
"""
from __future__ import annotations

import math

import torch

# Quintic Newton–Schulz coefficients tuned for speed, not exact convergence: five steps move every
# singular value of a unit-norm matrix into roughly [0.7, 1.2] (NS_SINGULAR_BAND), which is what
# Muon needs; the plain cubic iteration converges exactly but slowly.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_SINGULAR_BAND = (0.6, 1.25)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors: U V^T of g = U S V^T, with
    S pushed towards 1. Runs in g's dtype (bf16 is fine on GPU); wide or tall both work."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, ns_steps: int) -> torch.Tensor:
    """The orthogonalised step direction for one matrix; updates the momentum buffer in place.
    Scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move by a similar RMS."""
    buf.mul_(momentum).add_(grad)
    direction = grad.add(buf, alpha=momentum) if nesterov else buf
    ortho = newton_schulz(direction, ns_steps)
    return ortho * math.sqrt(max(1.0, grad.size(0) / grad.size(1)))


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (lr scaled by the group's lr_mult, decoupled weight
    decay); the others take AdamW steps. The training loop sets every group's `lr` from one
    schedule; lr_mult keeps Muon's larger learning rate in a fixed ratio to it."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False, lr_mult=1.0)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"] * group["lr_mult"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    update = muon_update(p.grad, state["momentum_buffer"], group["momentum"],
                                         group["nesterov"], group["ns_steps"])
                    p.mul_(1 - lr * group["weight_decay"]).add_(update.to(p.dtype), alpha=-lr)
                else:
                    adamw_step(p, state, lr, group["betas"], group["eps"], group["weight_decay"])


def adamw_step(p: torch.Tensor, state: dict, lr: float, betas, eps: float, weight_decay: float) -> None:
    """One AdamW update (Loshchilov & Hutter): decoupled decay, bias-corrected moments."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float64)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = float(state["step"])
    beta1, beta2 = betas
    state["exp_avg"].lerp_(p.grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    p.mul_(1 - lr * weight_decay)
    denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Attention and MLP projections: 2-D, and not the token embedding or the LM head."""
    return p.dim() == 2 and not name.startswith(("embed_tokens", "lm_head"))
