"""Cross-entropy fused with the LM head, computed in row chunks.

The plain path materialises [tokens, vocab] logits, a log-softmax copy, and in backward a
zero-filled gradient plus the log-softmax backward: about seven passes over the biggest tensor
of the step. Here each chunk's logits are turned into their gradient (softmax - onehot) in
place during the forward pass and immediately folded into the gradients of the hidden states
and the head weight, so the full logits never exist and the backward pass is a scaling.
"""
from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int):
        n_valid = (targets != ignore_index).sum().clamp_min(1)
        any_ignored = bool(n_valid < targets.numel())  # skip a full masking pass in the common case
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 accumulation
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (h @ weight.t()).to(acc_dtype)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
            grad = logits.sub_(lse[:, None]).exp_()                      # softmax, in place
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0   # minus one-hot
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
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets; hidden [N, d], targets [N]."""
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
