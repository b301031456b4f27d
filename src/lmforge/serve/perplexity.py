"""Perplexity on held-out text, to measure what quantisation costs.

Held-out text by default is Python's own standard library source (lmforge's embedded corpus,
present on every machine): a fixed set of files, so the figure is reproducible.
"""
from __future__ import annotations

import copy
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_FILES = ("textwrap.py", "fractions.py", "bisect.py", "heapq.py", "colorsys.py")


def heldout_text(max_chars: int = 60_000) -> str:
    """Source of a few standard-library modules, concatenated."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / name).read_text(encoding="utf-8") for name in DEFAULT_FILES if (lib / name).exists()]
    return "\n\n".join(parts)[:max_chars]


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = torch.tensor(token_ids[start:start + window + 1], device=device)
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1])[0].float()
        nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def int8_report(model, tokenizer, text: str | None = None, window: int = 512) -> dict:
    """Perplexity of the model and of its INT8 copy on the same text, and the relative change."""
    from lmforge.serve.quant import quantize_int8, weight_bytes
    ids = tokenizer.encode(text if text is not None else heldout_text())
    base = perplexity(model, ids, window)
    q = quantize_int8(copy.deepcopy(model))
    quant = perplexity(q, ids, window)
    return {"tokens": len(ids), "ppl": base, "ppl_int8": quant, "relative_change": quant / base - 1,
            "weight_mb": weight_bytes(model) / 2**20, "weight_mb_int8": weight_bytes(q) / 2**20}
