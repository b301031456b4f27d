"""Next-token sampling (temperature, top-k, top-p) and KV-cached generation."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.model.context import fit_to_context
from lmforge.model.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits [..., V] outside the top-k set and outside the smallest top-p nucleus."""
    logits = logits.float()
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one per row: probs [B, V] (rows need not be normalised), uniforms [B] in
    [0, 1) -> the first token whose cumulative probability exceeds u x the row's total. One uniform
    per row, so a batch of rows with generators of their own is sampled in one call; tokens of
    probability 0 are never drawn."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    over = ids >= probs.shape[-1]  # u x total rounded up to the total: the last token that has mass
    if over.any():
        last = probs.shape[-1] - 1 - (probs[over] > 0).flip(-1).int().argmax(-1)
        ids = ids.masked_scatter(over, last)
    return ids


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return draw(probs, torch.rand(probs.shape[0], generator=generator, device=probs.device))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, prefilling the prompt once and decoding with a KV cache.

    The reference implementation (one sequence, plain KV cache) that the serving engine is tested
    against; a prompt too long for the context is fitted by the same rule as everywhere else."""
    device = next(model.parameters()).device
    prompt_ids, max_new_tokens = fit_to_context(prompt_ids, max_new_tokens, model.cfg.max_seq_len)
    max_len = len(prompt_ids) + max_new_tokens
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg, 1, max_len, device=device, dtype=next(model.parameters()).dtype)
    tokens = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        if cache.length + tokens.shape[1] > max_len:
            return
        logits = model(tokens, cache=cache, last_only=True)[:, -1]
        nxt = int(sample(logits, temperature, top_k, top_p, gen)[0])
        yield nxt
        if stop_ids and nxt in stop_ids:
            return
        tokens = torch.tensor([[nxt]], device=device)
