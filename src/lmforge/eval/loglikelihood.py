"""Batched log-likelihood of continuations given contexts, on token ids, for an in-process model.

For each request (context ids, continuation ids) returns (sum of log p(continuation token | all
before it), whether every continuation token was the argmax). How it is fast:
- requests sharing a context (the choices of one question) run that context once, and contexts
  sharing a prefix (the same few-shot examples) run that prefix once per batch
  (`SegmentCache`); single-token continuations (MMLU letters) need no continuation pass at all;
- contexts are clustered by their first tokens, batched under a token budget, left-padded;
- the LM head runs only where a prediction is scored: the last context position and the
  continuation tokens, never over the whole prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.eval.attention_cache import SegmentCache

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a separate forward


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


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _greedy(contexts: list[tuple[int, ...]], token_budget: int, max_rows: int, share: bool):
    """Consecutive batches under a token budget; with `share`, the batch's common prefix P is
    computed once, so a batch costs P + rows * (longest - P) tokens."""
    batch: list[tuple[int, ...]] = []
    shared = 0
    for ctx in contexts:
        if batch:
            lcp = min(shared, _common_prefix(batch[0], ctx), len(ctx) - 1) if share else 0
            lcp = lcp if lcp >= MIN_SHARED else 0
            width = max(len(ctx), len(batch[0]) if not share else max(map(len, batch)))
            if lcp + (len(batch) + 1) * (width - lcp) <= token_budget and len(batch) < max_rows:
                batch.append(ctx)
                shared = lcp
                continue
            yield batch, shared if len(batch) > 1 else 0
        batch, shared = [ctx], len(ctx) - 1
    if batch:
        yield batch, shared if len(batch) > 1 else 0


def _batches(contexts: list[tuple[int, ...]], token_budget: int, max_rows: int):
    """Contexts that start alike (the same few-shot examples) are batched together, in
    lexicographic order so the deepest common prefixes are adjacent; all other contexts are
    batched longest first (least padding). -> (contexts, length of their shared prefix)."""
    clusters: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for c in contexts:
        clusters.setdefault(c[:MIN_SHARED], []).append(c)
    related = sorted((sorted(m) for m in clusters.values() if len(m) > 1), key=lambda m: -max(map(len, m)))
    alone = sorted((m[0] for m in clusters.values() if len(m) == 1), key=len, reverse=True)
    for members in related:
        yield from _greedy(members, token_budget, max_rows, share=True)
    yield from _greedy(alone, token_budget, max_rows, share=False)


@torch.no_grad()
def score_continuations(model, requests: Sequence[tuple[list[int], list[int]]], token_budget: int | None = None,
                        max_rows: int = 64, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    if not requests:
        return []
    params = next(model.parameters())
    device, max_len = params.device, model.cfg.max_seq_len
    token_budget = token_budget or (32768 if device.type == "cuda" else 4096)
    fitted = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        fitted.append(_fit(list(ctx), list(cont), max_len))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(tuple(ctx), []).append(i)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    for batch, shared in _batches(list(groups), token_budget, max_rows):
        _score_batch(model, batch, shared, groups, fitted, results, device, token_budget, max_rows)
        if progress:
            progress(sum(len(groups[c]) for c in batch))
    model.train(was_training)
    return results  # type: ignore[return-value]


def _score_batch(model, contexts, shared, groups, fitted, results, device, token_budget, max_rows) -> None:
    segments = []
    if shared:  # the common prefix, once
        cache = SegmentCache([], [], torch.ones(1, shared, dtype=torch.bool, device=device))
        model(torch.tensor([contexts[0][:shared]], device=device),
              positions=torch.arange(shared, device=device)[None], cache=cache, last_only=True)
        segments.append(cache.segment)
    G = len(contexts)
    width = max(len(c) for c in contexts) - shared
    tokens = torch.zeros(G, width, dtype=torch.long, device=device)
    valid = torch.zeros(G, width, dtype=torch.bool, device=device)
    for g, ctx in enumerate(contexts):  # left padding: every row's last slot is its last token
        tail = ctx[shared:]
        tokens[g, width - len(tail):] = torch.tensor(tail, device=device)
        valid[g, width - len(tail):] = True
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    positions = (lengths[:, None] - width + torch.arange(width, device=device)[None]).clamp(min=0)
    cache = SegmentCache(segments, [torch.zeros(G, dtype=torch.long, device=device)] * len(segments), valid)
    last = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]  # [G, V]
    segments = segments + [cache.segment]
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
        positions = lengths[group_rows][:, None] + torch.arange(n_tok, device=device)[None]
        # right padding: pads come after every real token, so the causal mask already hides them
        cache = SegmentCache(segments, [torch.zeros_like(group_rows)] * (len(segments) - 1) + [group_rows],
                             torch.ones(len(chunk), n_tok, dtype=torch.bool, device=device), store=False)
        lp, greedy = _token_logprobs(model(inputs, positions=positions, cache=cache), targets)
        for r, (_, i) in enumerate(chunk):
            n = len(fitted[i][1]) - 1
            total, all_greedy = results[i]
            results[i] = (total + float(lp[r, :n].double().sum()), all_greedy and bool(greedy[r, :n].all()))
