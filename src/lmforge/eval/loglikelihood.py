"""Batched log-likelihood of continuations given contexts, on token ids, for an in-process model.

For each request (context ids, continuation ids) returns (sum of log p(continuation token | all
before it), whether every continuation token was the argmax). How it is fast:
- requests sharing a context (the choices of one question) run that context once
  (`SharedPrefixCache`); single-token continuations (MMLU letters) need no second pass at all;
- contexts are sorted by length and batched under a token budget, left-padded;
- the LM head runs only where a prediction is scored: the last context position and the
  continuation tokens, never over the whole prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.eval.attention_cache import PaddedCache, SharedPrefixCache


def _fit(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """The model reads context + continuation[:-1]; keep that within max_len by trimming the
    context's left (and, for an over-long continuation, its left too, keeping one context token)."""
    if len(continuation) > max_len:
        cut = len(continuation) - max_len
        context, continuation = (context + continuation[:cut])[-1:], continuation[cut:]
    room = max_len + 1 - len(continuation)
    return context[-room:], continuation


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and is-argmax, without materialising a full log-softmax copy."""
    logits = logits.float()
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)
    return picked - logits.logsumexp(-1), picked >= logits.max(-1).values


@torch.no_grad()
def score_continuations(model, requests: Sequence[tuple[list[int], list[int]]], token_budget: int | None = None,
                        max_rows: int = 64, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    if not requests:
        return []
    params = next(model.parameters())
    device, dtype, max_len = params.device, params.dtype, model.cfg.max_seq_len
    token_budget = token_budget or (32768 if device.type == "cuda" else 4096)
    fitted = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        fitted.append(_fit(list(ctx), list(cont), max_len))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups, key=len, reverse=True)  # longest first: the batch's width is its first context
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    batch: list[tuple[int, ...]] = []
    for ctx in order + [None]:
        if ctx is not None and (not batch or (len(batch) + 1) * len(batch[0]) <= token_budget and len(batch) < max_rows):
            batch.append(ctx)
            continue
        _score_batch(model, batch, groups, fitted, results, device, dtype, token_budget, max_rows)
        if progress:
            progress(sum(len(groups[c]) for c in batch))
        batch = [ctx] if ctx is not None else []
    model.train(was_training)
    return results  # type: ignore[return-value]


def _score_batch(model, contexts, groups, fitted, results, device, dtype, token_budget, max_rows) -> None:
    width = max(len(c) for c in contexts)
    tokens = torch.zeros(len(contexts), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(contexts), width, dtype=torch.bool, device=device)
    for g, ctx in enumerate(contexts):  # left padding: every row's last slot is its last token
        tokens[g, width - len(ctx):] = torch.tensor(ctx, device=device)
        valid[g, width - len(ctx):] = True
    positions = (torch.arange(width, device=device)[None] - (width - valid.sum(1, keepdim=True))).clamp(min=0)
    cache = PaddedCache(model.cfg, len(contexts), width, device, dtype)
    cache.prepare(valid)
    last = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]  # [G, V]
    rows = [(g, i) for g, ctx in enumerate(contexts) for i in groups[ctx]]
    first = torch.tensor([fitted[i][1][0] for _, i in rows], device=device)
    lp0, greedy0 = _token_logprobs(last[[g for g, _ in rows]], first)
    for r, (_, i) in enumerate(rows):
        results[i] = (float(lp0[r]), bool(greedy0[r]))
    longer = [(g, i) for g, i in rows if len(fitted[i][1]) > 1]
    step = 0
    while step < len(longer):  # continuation pass, chunked under the same token budget
        n_tok = max(len(fitted[i][1]) - 1 for _, i in longer[step:step + max_rows])
        chunk = longer[step: step + max(1, min(max_rows, token_budget // n_tok))]
        step += len(chunk)
        n_tok = max(len(fitted[i][1]) - 1 for _, i in chunk)
        inputs = torch.zeros(len(chunk), n_tok, dtype=torch.long, device=device)
        targets = torch.zeros(len(chunk), n_tok, dtype=torch.long, device=device)
        for r, (_, i) in enumerate(chunk):
            cont = fitted[i][1]
            inputs[r, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)
            targets[r, : len(cont) - 1] = torch.tensor(cont[1:], device=device)
        group_rows = torch.tensor([g for g, _ in chunk], device=device)
        start = valid.sum(1)[group_rows]  # each row continues right after its own context
        positions = start[:, None] + torch.arange(n_tok, device=device)[None]
        logits = model(inputs, positions=positions, cache=SharedPrefixCache(cache, group_rows, n_tok))
        lp, greedy = _token_logprobs(logits, targets)
        for r, (_, i) in enumerate(chunk):
            n = len(fitted[i][1]) - 1
            total, all_greedy = results[i]
            results[i] = (total + float(lp[r, :n].double().sum()), all_greedy and bool(greedy[r, :n].all()))
