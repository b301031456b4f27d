"""SmoothQuant W8A8 against its definitions: the integer product is exact and row by row (so a
token's result does not depend on its batch), each token is quantised on its own scale, smoothing
keeps the float product and splits the range as alpha says, and on SmolLM2 it brings per-token
int8 activations close to the float model on held-out text."""
import copy

import pytest
import torch

from lmforge.model import load, save
from lmforge.model import w8a8
from lmforge.model.w8a8 import W8A8Linear, int8_mm
from lmforge.quant.apply import quantize_model
from lmforge.quant.calibration import calibration_batch
from lmforge.quant.int8 import linear_targets, quantize_per_channel, replace_module
from lmforge.quant.smoothquant import smooth_factors
from lmforge.serve.perplexity import heldout_text, perplexity
from tests.serve.helpers import tiny_model


def int8_pair(rows, n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (rows, n_in), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
    return x, w, torch.rand(n_out, generator=g) + 0.5


def exact_product(xq, w, scale):
    return ((xq.double() @ w.double().t()) * scale.double()).float()


@pytest.mark.parametrize("kernel", ["onednn", "fallback"])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (64, 40)])
def test_int8_mm_is_the_exact_integer_product_row_by_row(monkeypatch, kernel, shape):
    if kernel == "fallback":
        monkeypatch.setattr(w8a8, "_ONEDNN", False)
    elif not w8a8.ONEDNN_INT8_OP:
        pytest.fail("this PyTorch has no oneDNN int8 linear: the CPU kernel path is untested")
    elif not w8a8._ONEDNN:
        pytest.skip("CPU without VNNI: oneDNN's int8 GEMM saturates here, so W8A8 takes the float path (tested)")
    x, w, scale = int8_pair(300, *shape)
    full = int8_mm(x, w, scale)
    torch.testing.assert_close(full, exact_product(x, w, scale), rtol=1e-6, atol=0)
    for rows in (1, 2, 7, 16, 100):
        assert torch.equal(int8_mm(x[:rows], w, scale), full[:rows]), rows
    assert int8_mm(x[:0], w, scale).shape == (0, shape[1])


def test_the_packed_weight_follows_an_in_place_reload():
    x, w, scale = int8_pair(4, 64, 32)
    layer = W8A8Linear(w.clone(), scale, torch.ones(64))
    before = layer(x.float())
    _, w2, _ = int8_pair(4, 64, 32, seed=1)
    layer.load_state_dict({"qweight": w2, "scale": scale, "input_scale": torch.ones(64)})   # copies in place
    after = layer(x.float())
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, W8A8Linear(w2, scale, torch.ones(64))(x.float()), rtol=0, atol=0)


def test_each_token_is_quantised_on_its_own_scale():
    torch.manual_seed(0)
    n_in, n_out = 96, 48
    w, scale = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8), torch.rand(n_out) / 100
    input_scale = torch.rand(n_in) + 0.5
    layer = W8A8Linear(w, scale, input_scale)
    x = torch.randn(3, n_in)
    x[1] *= 1000   # a loud token must not take the others' resolution
    # reference, written out: x' = x * input_scale; s_x = max|x'| / 127 per row; q = round(x' / s_x)
    xs = x.double() * input_scale.double()
    sx = xs.abs().amax(1, keepdim=True) / 127
    ref = (torch.round(xs / sx) @ w.double().t()) * scale.double() * sx
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer(x)[2], layer(x[2:])[0])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smoothing_keeps_the_product_and_splits_the_range_by_alpha(alpha):
    torch.manual_seed(0)
    x = torch.randn(64, 32) * torch.logspace(-1, 2, 32)    # channels from quiet to loud
    w = torch.randn(16, 32)
    s = smooth_factors(x.abs().amax(0), w, alpha)
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    x_range, w_range = (x / s).abs().amax(0), (w * s).abs().amax(0)
    # per channel: max|x/s| = max|x|^(1-a) max|w|^(1-a), max|w s| = max|x|^a max|w|^a
    expect_x = (x.abs().amax(0) * w.abs().amax(0)) ** (1 - alpha)
    torch.testing.assert_close(x_range, expect_x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_range, (x.abs().amax(0) * w.abs().amax(0)) ** alpha, rtol=1e-4, atol=1e-6)


def unsmoothed_w8a8(model):
    """Every linear as W8A8 without smoothing (input_scale 1): per-token int8 activations as they are."""
    for name, mod in linear_targets(model):
        q, scale = quantize_per_channel(mod.weight)
        replace_module(model, name, W8A8Linear(q, scale, torch.ones(mod.in_features)))
    return model


@pytest.mark.slow
def test_smoothquant_keeps_smollm2_close_to_float_on_heldout_text(smollm, smollm_tokenizer, tmp_path):
    ids = smollm_tokenizer.encode(heldout_text(6_000))[:1024]
    fp32 = perplexity(smollm, ids)
    sq = quantize_model(copy.deepcopy(smollm), "smoothquant", calibration=calibration_batch(smollm_tokenizer, 8, 256))
    ppl_sq = perplexity(sq, ids)
    ppl_plain = perplexity(unsmoothed_w8a8(copy.deepcopy(smollm)), ids)
    assert ppl_sq < ppl_plain, (ppl_sq, ppl_plain)           # smoothing is what makes A8 usable
    assert abs(ppl_sq / fp32 - 1) < 0.015, (ppl_sq, fp32)
    save(sq, tmp_path / "sq", tokenizer=smollm_tokenizer)
    back = load(tmp_path / "sq")
    assert isinstance(back.layers[3].mlp.down_proj, W8A8Linear) and isinstance(back.lm_head, W8A8Linear)
    assert perplexity(back, ids) == ppl_sq


def test_a_w8a8_model_gives_each_sequence_the_same_logits_alone_and_batched():
    # every linear's integer product is row by row, norms and attention are per sequence: batching
    # equal-length sequences must not change a single bit (float GEMMs, blocked by row count, do)
    model = tiny_model(256, seed=3, max_seq_len=64)
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    quantize_model(model, "smoothquant", calibration=torch.randint(0, 256, (2, 32)))
    with torch.no_grad():
        batched = model(tokens)
        for i in range(3):
            assert torch.equal(model(tokens[i:i + 1])[0], batched[i]), i
