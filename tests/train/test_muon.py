"""Muon against its definition: Newton–Schulz output checked spectrally (an independent route to the
same polynomial), one optimizer step against the equations in fp64, AdamW groups against torch."""
import math

import pytest
import torch

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.config import TrainRecipe
from lmforge.train.muon import NS_COEFFS, NS_SINGULAR_BAND, Muon, newton_schulz
from lmforge.train.trainer import build_optimizer

SHAPES = [(64, 64), (32, 96), (96, 32), (128, 48), (7, 200)]


def spectral_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The same map through the SVD: the iteration X <- aX + b(XX^T)X + c(XX^T)^2X keeps the
    singular vectors and sends each singular value s to a s + b s^3 + c s^5."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    a, b, c = NS_COEFFS
    s = s / (g.norm() + 1e-7)  # the same guard against a zero matrix
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_is_orthogonal_within_its_band(shape):
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    out = newton_schulz(g)
    sv = torch.linalg.svdvals(out)
    low, high = NS_SINGULAR_BAND
    assert sv.min() > low and sv.max() < high, sv
    # and it is the polar factor's direction: the singular vectors of g are kept
    torch.testing.assert_close(out, spectral_newton_schulz(g), rtol=0, atol=1e-10)


def test_newton_schulz_band_is_not_met_by_too_few_steps():
    g = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.linalg.svdvals(newton_schulz(g, steps=1)).min() < NS_SINGULAR_BAND[0]


def test_one_muon_step_matches_the_equations_fp64():
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(32, dtype=torch.float64, requires_grad=True)
    lr, mult, wd, mu = 0.01, 5.0, 0.1, 0.95
    opt = Muon([{"params": [w], "muon": True, "lr_mult": mult, "weight_decay": wd}, {"params": [v]}],
               lr=lr, momentum=mu)
    w0 = w.detach().clone()
    buf = torch.zeros_like(w0)
    for step in range(3):
        g = torch.randn_like(w0)
        w.grad, v.grad = g.clone(), torch.randn_like(v)
        want = w.detach().clone()
        opt.step()
        # Muon: B <- mu B + G; Nesterov direction G + mu B; W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) NS(direction)
        buf = mu * buf + g
        direction = g + mu * buf
        want = want * (1 - lr * mult * wd) - lr * mult * math.sqrt(48 / 32) * spectral_newton_schulz(direction)
        torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-12)
    assert not torch.equal(w.detach(), w0)


def test_adamw_groups_equal_torch_adamw_fp64():
    torch.manual_seed(1)
    p = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = Muon([{"params": [p], "weight_decay": 0.1}], lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([q], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_trainer_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=16, tie_embeddings=False))
    recipe = load_recipe(TrainRecipe, None, ["train.optimizer=muon", "train.lr=0.004", "train.muon_lr=0.02"])
    opt = build_optimizer(model, recipe.train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon and all(n.startswith("layers.") and model.get_parameter(n).dim() == 2 for n in muon)
    assert "embed_tokens.weight" not in muon and "lm_head.weight" not in muon
    assert [g["lr_mult"] for g in opt.param_groups if g["muon"]] == [pytest.approx(5.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_unknown_optimizer_is_refused():
    with pytest.raises(LmforgeError, match="train.optimizer"):
        load_recipe(TrainRecipe, None, ["train.optimizer=sgd"])
