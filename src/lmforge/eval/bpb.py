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
import torch
import torch.nn.functional as F


@torch.no_grad()
def bits_per_byte(model, tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """Score a token stream in non-overlapping windows of seq_len (each window predicts its own
    tokens 1..seq_len from the ones before, the usual nanoGPT/nanochat protocol)."""
    seq_len = seq_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    tokens = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens, dtype=np.int64)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"need more than {seq_len} tokens to score, got {len(tokens)}")
    lengths = torch.as_tensor(token_bytes, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = n_tokens = 0
    was_training = model.training
    model.eval()
    for start in range(0, n_windows, batch_size):
        rows = [tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(start, min(n_windows, start + batch_size))]
        batch = torch.as_tensor(np.stack(rows), device=device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        b = lengths[y.reshape(-1)]
        counted = b > 0
        nats += loss[counted].double().sum()
        n_bytes += int(b.sum())
        n_tokens += int(counted.sum())
    model.train(was_training)
    total = float(nats)
    return {"bpb": total / (math.log(2) * n_bytes), "loss": total / n_tokens,
            "perplexity": math.exp(total / n_tokens), "tokens": n_tokens, "bytes": n_bytes}


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
