"""Cross-entropy fused with the LM head, computed in row chunks.

The plain path materialises [tokens, vocab] logits, a log-softmax copy, and in backward a
zero-filled gradient plus the log-softmax backward: about seven passes over the biggest tensor
of the step. Here each chunk's logits are turned into their gradient (softmax - onehot) in
place during the forward pass and immediately folded into the gradients of the hidden states
and the head weight, so the full logits never exist and the backward pass is a scaling.

Two optional extras live inside the same chunk loop, so they add no [tokens, vocab] tensor either:
- logit soft-capping (Gemma 2): logits z = c * tanh(u / c) of the raw head output u; the chain
  rule multiplies the gradient by dz/du = 1 - (z / c)^2.
- z-loss (PaLM): coef * logsumexp(z)^2 per token, added to the loss; its gradient with respect
  to z is 2 * coef * lse * softmax(z), so the chunk's gradient becomes
  softmax(z) * (1 + 2 * coef * lse) - onehot.
"""
from __future__ import annotations

import torch


def softcap_(logits: torch.Tensor, cap: float | None) -> torch.Tensor | None:
    """logits <- cap * tanh(logits / cap) in place; returns d(capped)/d(raw), or None without a cap."""
    if cap is None:
        return None
    logits.div_(cap).tanh_()
    deriv = 1.0 - logits.square()
    logits.mul_(cap)
    return deriv


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (differentiable), or logits unchanged without a cap."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int, cap: float | None,
                z_loss: float):
        n_valid = (targets != ignore_index).sum().clamp_min(1)
        any_ignored = bool(n_valid < targets.numel())  # skip a full masking pass in the common case
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 accumulation
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (h @ weight.t()).to(acc_dtype)
            cap_deriv = softcap_(logits, cap)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            # log-sum-exp and softmax from one exp pass, in place: no [rows, vocab] temporary
            row_max = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(row_max).exp_()
            denom = grad.sum(dim=-1)
            lse = row_max.squeeze(1) + denom.log()
            row_loss = lse - target_logit
            scale = 1.0 / denom                                          # softmax = exp / denom
            if z_loss:
                row_loss = row_loss + z_loss * lse.square()
                scale = scale * (1.0 + 2.0 * z_loss * lse)
            total += (row_loss * valid).sum()
            grad.mul_(scale[:, None])
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0   # minus one-hot
            if cap_deriv is not None:
                grad.mul_(cap_deriv)
            if any_ignored:
                grad.mul_(valid[:, None])
            grad = grad.to(h.dtype)
            grad_hidden[start:start + chunk_rows] = grad @ weight.to(h.dtype)
            grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_output / n_valid
        return (grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = 1024, softcap: float | None = None,
                         z_loss: float = 0.0) -> torch.Tensor:
    """Mean over non-ignored rows of cross-entropy(z, target) + z_loss * logsumexp(z)^2, where
    z = softcap(hidden @ weight.T); hidden [N, d], targets [N]."""
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, softcap, z_loss)
