"""Interpretability on the lmforge Transformer: residual-stream caching, logit lens, attention
patterns, induction / previous-token head scores, activation and attribution patching.

The residual stream "after layer l" is the output of block l (l = -1: the token embeddings). The
logit lens decodes it with the model's own final norm and LM head, so at the last layer it is the
model's logits. Patching replaces residual-stream vectors of a corrupted run with those of a clean
run, one (layer, position) at a time, and reads a metric of the final logits.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lmforge.model.layers import apply_rope


@contextlib.contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def residual_stream(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-> (logits [B, T, V], [embeddings, after block 0, ..., after block L-1], each [B, T, D])."""
    cache = []
    handles = [model.embed_tokens.register_forward_hook(lambda m, i, o: cache.append(o))]
    handles += [layer.register_forward_hook(lambda m, i, o: cache.append(o)) for layer in model.layers]
    with _hooks(handles):
        logits = model(tokens)
    return logits, cache


def logit_lens(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits read off the residual stream after every block: [L, B, T, V] (the last is the model's)."""
    _, cache = residual_stream(model, tokens)
    return torch.stack([model.logits(model.norm(x)) for x in cache[1:]])


def attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities of every head: [L, B, H, T, T], recomputed from each layer's
    queries and keys (the forward pass itself uses fused SDPA, which does not return them)."""
    inputs = []
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, args: inputs.append(args[:3]))
               for layer in model.layers]
    with _hooks(handles), torch.no_grad():
        model(tokens)
    patterns = []
    for layer, (x, cos, sin) in zip(model.layers, inputs):
        attn = layer.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        patterns.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    return torch.stack(patterns)


def repeated_random_tokens(vocab: int, half: int, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, 2*half]: a random sequence followed by itself (induction heads predict the repeat)."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (batch, half), generator=gen)
    return torch.cat([first, first], dim=1)


def shifted_repeats(vocab: int, length: int, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] random tokens: after a random prefix of 0..length/4 tokens, a random segment
    followed by itself (filling the row). The repeat's offset varies from row to row, so only a
    content-based induction circuit (not a head attending a fixed distance back) predicts it."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (batch, length), generator=gen)
    for row in rows:
        p = int(torch.randint(0, length // 4 + 1, (1,), generator=gen))
        a = (length - p) // 2
        row[p + a:p + 2 * a] = row[p:p + a]
    return rows


def head_scores(patterns: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From patterns [L, B, H, 2*half, 2*half] on repeated random tokens -> (induction [L, H],
    previous-token [L, H]): the mean attention, over the second half, to the token after the earlier
    occurrence of the current token (t - half + 1), and to the previous token (t - 1)."""
    t = torch.arange(half, 2 * half)
    induction = patterns[..., t, t - half + 1].mean(dim=(1, 3))
    t_all = torch.arange(1, 2 * half)
    previous = patterns[..., t_all, t_all - 1].mean(dim=(1, 3))
    return induction, previous


def logit_difference(right: int, wrong: int):
    """Metric: logit(right) - logit(wrong) at the last position, averaged over the batch."""
    return lambda logits: (logits[:, -1, right] - logits[:, -1, wrong]).mean()


def _patched_run(model, tokens, layer: int, position: int | None, value: torch.Tensor):
    """Logits of `tokens` with the residual stream after block `layer` (-1: the embeddings) set to
    `value` at `position` (None: every position)."""
    module = model.embed_tokens if layer < 0 else model.layers[layer]

    def hook(m, args, out):
        out = out.clone()
        if position is None:
            out[:] = value
        else:
            out[:, position] = value[:, position]
        return out
    with _hooks([module.register_forward_hook(hook)]):
        return model(tokens)


@torch.no_grad()
def activation_patching(model, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> torch.Tensor:
    """[L+1, T]: the metric of the corrupted run with the clean residual stream patched in at each
    (layer, position); row 0 is the embeddings, row l+1 is after block l."""
    _, clean_cache = residual_stream(model, clean)
    T = clean.shape[1]
    out = torch.zeros(len(clean_cache), T)
    for layer in range(len(clean_cache)):
        for pos in range(T):
            out[layer, pos] = metric(_patched_run(model, corrupt, layer - 1, pos, clean_cache[layer]))
    return out


def patch_all_positions(model, clean, corrupt, layer: int, metric) -> float:
    """The metric of the corrupted run with the whole clean residual stream after block `layer`."""
    with torch.no_grad():
        _, clean_cache = residual_stream(model, clean)
        return float(metric(_patched_run(model, corrupt, layer, None, clean_cache[layer + 1])))


def attribution_patching(model, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> torch.Tensor:
    """[L+1, T]: the first-order estimate of activation patching, (clean - corrupt) · d metric / d
    residual at the corrupted run, summed over the hidden dimension; one forward and one backward
    pass instead of L*T forward passes (Nanda 2023)."""
    with torch.no_grad():
        _, clean_cache = residual_stream(model, clean)
    captured = []

    def keep(m, i, o):
        o.retain_grad()
        captured.append(o)
    modules = [model.embed_tokens, *model.layers]
    with _hooks([m.register_forward_hook(keep) for m in modules]):
        value = metric(model(corrupt))
    grads = torch.autograd.grad(value, captured)
    return torch.stack([((c - x.detach()) * g).sum(dim=(0, 2)) for c, x, g in zip(clean_cache, captured, grads)])


class _NoMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def attention_only(model):
    """Removes every block's MLP (it then adds zero to the residual stream): an attention-only model."""
    for layer in model.layers:
        layer.mlp = _NoMLP()
    return model
