"""Gradient noise scale (McCandlish et al. 2018): the two-batch estimator on known answers."""
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.model.config import ModelConfig
from lmforge.plan import NoiseScaleTracker, measure_noise_scale, noise_scale


def test_estimator_inverts_the_expected_squared_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B with |G|^2 = 4 and tr(Sigma) = 100  ->  B_simple = 25.
    g2, trace = 4.0, 100.0
    est = noise_scale(8, g2 + trace / 8, 128, g2 + trace / 128)
    assert est.grad_sq == pytest.approx(g2) and est.trace_sigma == pytest.approx(trace)
    assert est.b_simple == pytest.approx(25.0)


def test_estimator_errors_and_degenerate_gradients():
    with pytest.raises(LmforgeError, match="b_small < b_big"):
        noise_scale(32, 1.0, 32, 0.5)
    with pytest.raises(LmforgeError, match="cannot be negative"):
        noise_scale(1, -1.0, 2, 0.5)
    assert math.isinf(noise_scale(1, 1.0, 2, 0.4).b_simple)   # |G|^2 estimate <= 0: no signal yet


class Quadratic(torch.nn.Module):
    """loss_i(w) = |w - x_i|^2 / 2: per-example gradient w - x_i, so G = w - mu and Sigma = sigma^2 I."""

    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))


def test_measured_noise_scale_on_a_model_with_a_known_answer():
    torch.manual_seed(0)
    dim, sigma = 50, 2.0
    mu = torch.full((dim,), 0.5)                    # |G|^2 = 50 * 0.25 = 12.5, tr(Sigma) = 50 * 4 = 200
    batch = mu + sigma * torch.randn(8192, dim)

    def loss_fn(model, x):
        return 0.5 * (model.w - x).pow(2).sum(-1).mean()

    model = Quadratic(dim)
    est = measure_noise_scale(model, batch, small=16, loss_fn=loss_fn)
    assert est.grad_sq == pytest.approx(12.5, rel=0.1)
    assert est.trace_sigma == pytest.approx(200, rel=0.1)
    assert est.b_simple == pytest.approx(16, rel=0.15)
    assert model.w.grad is None   # the model's own gradient state is left as it was


def test_noise_scale_of_a_language_model_and_the_tracker():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=33)
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (32, 33))
    est = measure_noise_scale(model, tokens, small=4)
    assert est.grad_sq > 0 and est.trace_sigma > 0 and est.b_simple > 0
    tracker = NoiseScaleTracker(decay=0.5)
    for _ in range(3):
        tracker.update(est)
    assert tracker.b_simple == pytest.approx(est.b_simple)   # ratio of averages of identical estimates
    with pytest.raises(LmforgeError, match="fewer than two chunks"):
        measure_noise_scale(model, tokens[:4], small=4)
