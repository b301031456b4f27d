"""Per-token log-probabilities (and entropies) of given targets, computed in row chunks.

Preference optimisation and RL need log p(target_t) at every position, with gradients, not a
mean loss. The plain way, log_softmax(hidden @ W.T).gather(targets), holds [tokens, vocab] fp32
logits plus their log-softmax copy and, in backward, a gradient of the same size. Here each chunk
of rows turns its logits into per-row figures and drops them; backward recomputes the chunk's
logits (one extra matmul) instead of storing them, so memory beyond the inputs and the weight
gradient is one chunk, whatever the vocabulary.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lmforge.model.fused_loss import softcap_

# Rows per chunk default to this many logits (16 MiB in fp32): a flat working set as vocab grows.
CHUNK_ELEMENTS = 1 << 22


def _chunk_logprobs(h, weight, safe_t, acc_dtype, cap):
    """Chunk logits (soft-capped when cap is set) normalised in place: returns (log_softmax [n, V],
    target logp [n], d(capped)/d(raw) [n, V] or None)."""
    logp_all = (h @ weight.t()).to(acc_dtype)
    cap_deriv = softcap_(logp_all, cap)
    lse = torch.logsumexp(logp_all, dim=-1)
    logp_all.sub_(lse[:, None])
    return logp_all, logp_all.gather(1, safe_t[:, None]).squeeze(1), cap_deriv


def _entropy(logp_all):
    return -(logp_all.exp() * logp_all).sum(-1)


class LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int, with_entropy: bool,
                cap: float | None):
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 softmax
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, 0)
        logp = torch.zeros(targets.shape, dtype=acc_dtype, device=hidden.device)
        entropy = torch.zeros_like(logp) if with_entropy else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp_all, logp[rows], _ = _chunk_logprobs(hidden[rows], weight, safe_t[rows], acc_dtype, cap)
            if with_entropy:
                entropy[rows] = _entropy(logp_all)
        logp.mul_(valid)  # ignored positions: log-prob 0, entropy 0, no gradient
        ctx.save_for_backward(hidden, weight, safe_t, valid)
        ctx.set_materialize_grads(False)  # an output that no loss uses (a logged entropy) costs nothing in backward
        ctx.chunk_rows, ctx.acc_dtype, ctx.cap = chunk_rows, acc_dtype, cap
        # Backward recomputes the logits: under the same autocast state, so they are the same
        # logits whose log-probs were returned (as activation checkpointing does).
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if with_entropy:
            entropy.mul_(valid)
            return logp, entropy
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return LinearTokenLogprobs._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, weight, safe_t, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = ctx.acc_dtype
        grad_logp = (grad_logp * valid).to(acc_dtype) if grad_logp is not None else torch.zeros(valid.shape, dtype=acc_dtype, device=valid.device)
        if grad_entropy is not None:
            grad_entropy = (grad_entropy * valid).to(acc_dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, t, g = hidden[rows], safe_t[rows], grad_logp[rows]
            logp_all, _, cap_deriv = _chunk_logprobs(h, weight, t, acc_dtype, ctx.cap)
            # d logp_t / dz = onehot(t) - p;  d H / dz = -p * (log p + H)
            coeff = -g[:, None]
            if grad_entropy is not None:
                coeff = coeff - grad_entropy[rows, None] * (logp_all + _entropy(logp_all)[:, None])
            grad_z = logp_all.exp_().mul_(coeff)
            grad_z[torch.arange(len(t), device=t.device), t] += g
            if cap_deriv is not None:
                grad_z.mul_(cap_deriv)
            grad_z = grad_z.to(h.dtype)
            if need_h:
                grad_hidden[rows] = grad_z @ weight.to(h.dtype)
            if need_w and grad_z.dtype == acc_dtype:
                grad_weight.addmm_(grad_z.t(), h)  # in place: no [V, D] temporary per chunk
            elif need_w:
                grad_weight += grad_z.t() @ h
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = -100, chunk_rows: int | None = None,
                   return_entropy: bool = False, softcap: float | None = None):
    """log softmax(softcap(hidden @ weight.T))[targets] per row -> [N] (fp32 or wider), 0 where targets
    equal ignore_index; hidden [N, D], weight [V, D], targets [N]. With return_entropy, also the
    entropy of each row's distribution -> ([N], [N]). Both are differentiable."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return LinearTokenLogprobs.apply(hidden, weight, targets, ignore_index, chunk_rows, return_entropy, softcap)
