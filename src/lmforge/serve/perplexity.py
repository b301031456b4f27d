"""Perplexity on held-out text, to measure what quantisation costs.

Held-out text by default is the validation split of lmforge's embedded corpus (Python's standard
library source, present on every machine, split by a hash of each path), the same text `eval bpb`
scores; tokens are scored by the one scorer, `lmforge.model.scoring.score_tokens`.
"""
from __future__ import annotations

import copy

import torch

from lmforge.corpus.stdlib import stdlib_documents
from lmforge.model.scoring import score_tokens


def heldout_text(max_chars: int = 60_000) -> str:
    """The stdlib validation split's files in path order, joined, cut at max_chars."""
    parts, size = [], 0
    for doc in stdlib_documents("val"):
        parts.append(doc.text)
        size += len(doc.text) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    return score_tokens(model, token_ids, window=window).perplexity


def int8_report(model, tokenizer, text: str | None = None, window: int = 512) -> dict:
    """Perplexity of the model and of its INT8 copy on the same text, and the relative change."""
    from lmforge.quant.int8 import quantize_int8, weight_bytes
    ids = tokenizer.encode(text if text is not None else heldout_text())
    base = perplexity(model, ids, window)
    q = quantize_int8(copy.deepcopy(model))
    quant = perplexity(q, ids, window)
    return {"tokens": len(ids), "ppl": base, "ppl_int8": quant, "relative_change": quant / base - 1,
            "weight_mb": weight_bytes(model) / 2**20, "weight_mb_int8": weight_bytes(q) / 2**20}
