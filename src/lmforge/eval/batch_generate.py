"""Static-batch generation for evaluation: left-padded prompts decode in lockstep.

Used by the in-process backend when the serving engine's batch completion is not available.
Finished rows leave the batch, so the cost follows the live rows. Greedy decoding gives the same
tokens as one-at-a-time `lmforge.model.sampling.generate` (tested).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.eval.attention_cache import PaddedCache
from lmforge.model.sampling import sample


@torch.no_grad()
def generate_batch(model, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: set[int] | None = None,
                   is_done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New token ids for each prompt. Generation of a row ends at a stop id (kept in the output),
    when `is_done(row, tokens)` says so (e.g. a stop string appeared), or after max_new_tokens."""
    if not prompts:
        return []
    params = next(model.parameters())
    device, dtype, max_len = params.device, params.dtype, model.cfg.max_seq_len
    max_new_tokens = max(1, min(max_new_tokens, max_len - 1))
    prompts = [list(p[-(max_len - max_new_tokens):]) or [0] for p in prompts]  # leave room to generate
    width = max(len(p) for p in prompts)
    B = len(prompts)
    tokens = torch.zeros(B, width, dtype=torch.long, device=device)
    valid = torch.zeros(B, width, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = torch.tensor(p, device=device)
        valid[b, width - len(p):] = True
    lengths = valid.sum(1)
    positions = (torch.arange(width, device=device)[None] - (width - lengths[:, None])).clamp(min=0)
    cache = PaddedCache(model.cfg, B, width + max_new_tokens, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    outputs: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # original row index of each cache row
    was_training = model.training
    model.eval()
    cache.prepare(valid)
    logits = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]
    next_pos = lengths.clone()
    for step in range(max_new_tokens):
        chosen = sample(logits, temperature, top_k, top_p, gen)
        keep = []
        for r, row in enumerate(live):
            tok = int(chosen[r])
            outputs[row].append(tok)
            finished = (stop_ids and tok in stop_ids) or (is_done and is_done(row, outputs[row]))
            if not finished:
                keep.append(r)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            idx = torch.tensor(keep, device=device)
            cache.keep_rows(idx)
            chosen, next_pos = chosen[idx], next_pos[idx]
            live = [live[r] for r in keep]
        cache.prepare(torch.ones(len(live), 1, dtype=torch.bool, device=device))
        logits = model(chosen[:, None], positions=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    return outputs
