"""GPTQ and AWQ against their defining properties: GPTQ reduces to round-to-nearest when inputs are
uncorrelated and beats it on the layer's output loss when they are; AWQ's scaling leaves the float
model's function unchanged and lowers the output error when a few input channels dominate."""
import copy

import pytest
import torch
from torch import nn

from lmforge.model import ModelConfig, Transformer
from lmforge.quant.apply import quantize_model
from lmforge.quant.awq import awq_block
from lmforge.quant.calibration import blockwise
from lmforge.quant.gptq import gptq, hessian
from lmforge.quant.groupwise import dequantize, fake_quantize, rtn


def output_error(x, w, wq):
    return ((x.double() @ (wq.double() - w.double()).t()) ** 2).sum().item()


def correlated_inputs(n=2048, d=256, seed=0):
    """Inputs near a 16-dimensional subspace (real activations are strongly correlated too)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(act_order):
    """H = I: no column's error can be compensated by another's, so GPTQ must equal RTN."""
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    q, s, z = gptq(w, torch.eye(128) * 2, 4, 64, asym=True, act_order=act_order)
    q_rtn, s_rtn, z_rtn = rtn(w, 4, 64, asym=True)
    assert torch.equal(q, q_rtn.to(torch.uint8))
    torch.testing.assert_close(s, s_rtn)
    torch.testing.assert_close(z, z_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("asym", [False, True])
def test_gptq_beats_round_to_nearest_on_the_output_loss(act_order, asym):
    x = correlated_inputs()
    torch.manual_seed(1)
    w = torch.randn(64, 256)    # two column blocks of 128: the error also flows across blocks
    q, s, z = gptq(w, hessian(x), 4, 32, asym, act_order)
    err_gptq = output_error(x, w, dequantize(q, s, z, 32))
    err_rtn = output_error(x, w, fake_quantize(w, 4, 32, asym))
    assert err_gptq < 0.2 * err_rtn, (err_gptq, err_rtn)


def tiny(seed=0, n_heads=4, n_kv_heads=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=128,
                      max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():   # a few loud input channels, as real LLM activations have
        for layer in model.layers:
            layer.input_layernorm.weight[:4] = 8.0
            layer.post_attention_layernorm.weight[:4] = 8.0
    return model


@pytest.mark.parametrize("n_kv_heads", [2, 4])   # 4: o_proj scaled too (no GQA sharing)
def test_awq_scaling_keeps_the_float_model_function(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 96, (4, 32))
    with torch.no_grad():
        before = model(tokens)
    scaled = copy.deepcopy(model)
    blockwise(scaled, tokens, lambda i, block, inputs: awq_block(block, inputs, scaled.cfg, 4, 32, False))
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), scaled.state_dict().values()))
    assert changed     # the scales were folded in ...
    with torch.no_grad():
        torch.testing.assert_close(scaled(tokens), before, rtol=1e-4, atol=1e-4)   # ... losslessly


def heldout_loss(model, tokens):
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_stay_closer_to_the_float_model_than_rtn(method):
    """Distance to the float model's logits on tokens not used for calibration."""
    model = tiny(1)
    calib, heldout = torch.randint(0, 96, (8, 48)), torch.randint(0, 96, (4, 48))
    with torch.no_grad():
        ref = model(heldout)

    def distance(m):
        with torch.no_grad():
            return (m(heldout) - ref).pow(2).mean().item()

    d_rtn = distance(quantize_model(copy.deepcopy(model), "rtn", group_size=32))
    d_cal = distance(quantize_model(copy.deepcopy(model), method, group_size=32, calibration=calib))
    assert d_cal < d_rtn, (d_cal, d_rtn)
