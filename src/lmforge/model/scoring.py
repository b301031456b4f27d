"""The one scorer of held-out text: summed next-token negative log-likelihood over windows.

Validation loss (train), perplexity (int8-report) and bits per byte (eval, speedrun) all derive
from `score_tokens`, so the same model on the same tokens gives the same number everywhere.

Windows: a model sees at most `window` tokens at once. Window k feeds tokens[k*stride : k*stride
+ window] and predicts the token after each of them; it counts only the predictions the windows
before it did not make, so every token from position 1 on is scored exactly once. With
stride == window the windows do not overlap (the nanoGPT protocol: cheap, but a token at the
start of a window sees little context); with a smaller stride every token after the first
window sees at least window - stride tokens of context, at window / stride times the compute.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Score:
    nll: float      # summed negative log-likelihood of the counted tokens, in nats
    tokens: int     # tokens counted
    bytes: int      # UTF-8 bytes the counted tokens stand for (0 when no byte lengths were given)

    @property
    def loss(self) -> float:
        """Mean NLL per token (nats): the training loss."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first counted target) of each window over n tokens: inputs tokens[begin:end]
    predict targets begin+1 .. end; targets from `first counted` on are scored."""
    out, done = [], 0  # done: last target position scored so far
    begin = 0
    while done < n - 1:
        end = min(begin + window, n - 1)
        out.append((begin, end, done + 1))
        done = end
        begin += stride
    return out


@torch.no_grad()
def score_tokens(model, tokens, window: int | None = None, stride: int | None = None, token_bytes=None,
                 batch_size: int = 8, autocast=contextlib.nullcontext) -> Score:
    """Sum of -log p(tokens[i] | the tokens before it in its window) over i >= 1.

    window: tokens per forward (default and maximum: the model's max_seq_len); stride: how far
    each window moves (default: window, no overlap). token_bytes [vocab]: UTF-8 length of each
    token; when given, targets standing for zero bytes (special tokens such as EOS between
    documents) are left out of every sum, so a model gains nothing by predicting boundaries.
    autocast: a context manager factory for the forward (e.g. bf16 autocast on GPU).
    """
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    window = min(window or model.cfg.max_seq_len, model.cfg.max_seq_len)
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(tokens)}")
    device = next(model.parameters()).device
    lengths = None if token_bytes is None else torch.as_tensor(np.asarray(token_bytes), device=device)
    spans = windows(len(tokens), window, stride)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = 0
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(spans), batch_size):
            group = spans[first:first + batch_size]
            width = max(end - begin for begin, end, _ in group)
            # Right padding: causal attention keeps it from changing the real positions.
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.zeros((len(group), width), dtype=torch.long)
            counted = torch.zeros((len(group), width), dtype=torch.bool)
            for row, (begin, end, first_target) in enumerate(group):
                x[row, :end - begin] = tokens[begin:end]
                y[row, :end - begin] = tokens[begin + 1:end + 1]
                counted[row, first_target - begin - 1:end - begin] = True
            x, y, counted = x.to(device), y.to(device), counted.to(device)
            if lengths is not None:
                counted &= lengths[y] > 0
            with autocast():
                logits = model(x)
            for row in range(len(group)):  # one row at a time: no float32 copy of the whole batch
                losses = F.cross_entropy(logits[row].float(), y[row], reduction="none")
                nll += losses[counted[row]].double().sum()
            n_tokens += int(counted.sum())
            if lengths is not None:
                n_bytes += int(lengths[y][counted].sum())
    finally:
        model.train(was_training)
    return Score(float(nll), n_tokens, n_bytes)
