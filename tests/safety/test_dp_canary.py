"""Canary exposure smoke test (the full comparison is benchmarks/dp_sgd.py): a 2-digit secret planted
in 6 of ~360 stdlib byte windows is memorised by plain training (ranked first of 100) and not under
DP-SGD at epsilon = 8 with the same steps and expected batch."""
import math

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.safety.accountant import epsilon, noise_for_epsilon
from lmforge.safety.dp_sgd_canary import (
    PREFIX,
    canary_windows,
    exposure,
    stdlib_bytes,
    train_on_windows,
)

CFG = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=64)


def test_exposure_ranks_all_candidates():
    class Prefers:  # logits that favour the digits of one secret (then a newline) wherever they appear
        def __init__(self, secret):
            self.secret = secret

        def eval(self):
            return self

        def __call__(self, tokens):
            logits = torch.zeros(*tokens.shape, 256)
            start = len(PREFIX) - 1
            for k, ch in enumerate(self.secret.encode() + b"\n"):
                logits[:, start + k, ch] = 5.0
            return logits
    assert exposure(Prefers("37"), "37") == pytest.approx(math.log2(100))       # ranked first
    # 19 candidates (9x, x9) score better than "37": rank 20
    assert exposure(Prefers("99"), "37") == pytest.approx(math.log2(100) - math.log2(20))


@pytest.mark.slow
def test_dp_sgd_cuts_canary_exposure():
    windows = canary_windows(stdlib_bytes(12_000), "37", copies=6, width=32)
    steps, batch = 80, 32
    q = batch / len(windows)
    sigma = noise_for_epsilon(8.0, q, steps, 1e-5)
    assert epsilon(q, sigma, steps, 1e-5)[0] <= 8.0
    found = {}
    for name, dp in (("plain", None), ("dp", (sigma, 1.0))):
        torch.manual_seed(0)
        model = Transformer(CFG)
        train_on_windows(model, windows, steps, batch, 1e-2, seed=0, dp=dp)
        found[name] = exposure(model, "37")
    assert found["plain"] == pytest.approx(math.log2(100))  # memorised: the secret ranks first
    assert found["dp"] < found["plain"] - 2                  # rank 4 or worse of 100 under DP
