"""Bits per byte: the tokenizer-independent measure of how well a model predicts text.

bpb = sum over predicted tokens of -log2 p(token) / number of UTF-8 bytes those tokens stand for.
Special tokens (EOS between documents) count zero bytes and are left out of both sums, so a
model cannot lower its score by predicting document boundaries well.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from lmforge.model.scoring import score_tokens


def bits_per_byte(model, tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """Score a token stream in non-overlapping windows of seq_len (each window predicts its own
    tokens from the ones before, the usual nanoGPT/nanochat protocol) with the one scorer."""
    tokens = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens, dtype=np.int64)
    score = score_tokens(model, tokens, window=seq_len, token_bytes=token_bytes, batch_size=batch_size)
    if not score.bytes:
        raise ValueError("no scored token stands for any bytes (only special tokens?)")
    return {"bpb": score.bits_per_byte, "loss": score.loss, "perplexity": score.perplexity,
            "tokens": score.tokens, "bytes": score.bytes}


def unigram_byte_bpb(train_texts: Iterable[str], val_texts: Iterable[str]) -> float:
    """The baseline every model must beat: cross-entropy in bits/byte of a byte-frequency model
    fitted on the training text (add-one smoothing), measured on the validation text."""
    counts = Counter()
    for t in train_texts:
        counts.update(t.encode("utf-8"))
    total = sum(counts.values()) + 256
    logp = {b: math.log2((counts.get(b, 0) + 1) / total) for b in range(256)}
    bits = n = 0
    for t in val_texts:
        data = t.encode("utf-8")
        for b, c in Counter(data).items():
            bits -= c * logp[b]
        n += len(data)
    return bits / n
