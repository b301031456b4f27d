"""What the int8 KV cache costs: held-out perplexity and greedy agreement against the model's own
dtype, and how many more tokens the same memory holds.

Perplexity is scored through the paged cache itself: each window of held-out text is one prefill
step whose attention reads the stored (for int8: quantised, then dequantised) K/V of every token
of the window, which is exactly what each of those tokens would see when decoded one at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.serve.paged_cache import PagedKVCache, StepBatch, StepItem
from lmforge.serve.sequence import SamplingParams, Sequence


@torch.inference_mode()
def paged_perplexity(model, token_ids: list[int], kv_dtype: str = "auto", window: int = 512,
                     block_size: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, attention through a paged cache."""
    if len(token_ids) < 2:
        raise ValueError("need at least 2 tokens")
    device = next(model.parameters()).device
    dtype = model.embed_tokens.weight.dtype
    blocks = -(-window // block_size)
    cache = PagedKVCache(model.cfg, blocks, block_size, device, dtype, kv_dtype)
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window + 1]
        inputs, targets = chunk[:-1], torch.tensor(chunk[1:], device=device)
        seq = Sequence("ppl", inputs, SamplingParams())
        seq.block_table = list(range(blocks))
        step = StepBatch(cache, [StepItem(seq, 0, inputs, len(inputs))], device)
        logits = model(step.tokens, step.positions, cache=step, logits_index=step.logits_index)[0].float()
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += len(inputs)
    return math.exp(total / count)


def greedy_agreement(model, tokenizer, prompts: list[list[int]], max_tokens: int = 64) -> dict:
    """Greedy continuations with the model-dtype cache vs the int8 cache, all prompts batched."""
    from lmforge.serve.engine import EngineConfig, LLMEngine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = {}
    for kv in ("auto", "int8"):
        engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_mb=64, kv_dtype=kv))
        outs[kv] = [r["token_ids"] for r in engine.generate(prompts, params)]
    same_prefix = []
    for a, b in zip(outs["auto"], outs["int8"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix.append(n)
    return {"prompts": len(prompts), "identical": sum(n == max_tokens for n in same_prefix),
            "mean_identical_prefix": sum(same_prefix) / len(prompts), "max_tokens": max_tokens}


def kv_int8_report(model, tokenizer, text: str, prompts: list[list[int]] | None = None, window: int = 512,
                   max_tokens: int = 64) -> dict:
    ids = tokenizer.encode(text)
    base = paged_perplexity(model, ids, "auto", window)
    quant = paged_perplexity(model, ids, "int8", window)
    dtype = model.embed_tokens.weight.dtype
    mb = 512 * 2**20
    blocks = {kv: mb // PagedKVCache.bytes_per_block(model.cfg, 16, dtype, kv) for kv in ("auto", "int8")}
    blocks_bf16 = mb // PagedKVCache.bytes_per_block(model.cfg, 16, torch.bfloat16, "auto")
    report = {"tokens": len(ids), "ppl": base, "ppl_kv_int8": quant, "relative_change": quant / base - 1,
              "blocks_per_512mb": {str(dtype).removeprefix("torch."): blocks["auto"], "bfloat16": blocks_bf16,
                                   "int8": blocks["int8"]}}
    if prompts:
        report["greedy_agreement"] = greedy_agreement(model, tokenizer, prompts, max_tokens)
    return report
