"""INT8 weight-only quantisation: per-channel error bound, drop-in layers, perplexity cost."""
import pytest
import torch
from torch import nn

from lmforge.model.quantized import Int8Linear
from lmforge.quant.int8 import int8_linear, quantize_int8, quantize_per_channel, weight_bytes
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.perplexity import heldout_text, int8_report
from tests.serve.helpers import tiny_model


def test_per_channel_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 200) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_int8_linear_matches_its_dequantised_weight(monkeypatch, cpu_kernel):
    import lmforge.model.quantized as quant
    monkeypatch.setattr(quant, "_CPU_INT8_MM", cpu_kernel and hasattr(torch, "_weight_int8pack_mm"))
    torch.manual_seed(0)
    lin = nn.Linear(96, 48, bias=False)
    q = int8_linear(lin)
    x = torch.randn(2, 5, 96)
    ref = x @ q.dequantized().T
    got = q(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    # the CPU kernel takes bfloat16 activations: ~3 significant digits
    tol = 1e-2 * ref.abs().max() if quant._CPU_INT8_MM else 1e-5
    assert (got - ref).abs().max() <= tol
    assert (got - lin(x)).abs().max() < 0.02 + tol


def test_quantize_model_in_place_and_serve_it(smollm_tokenizer):
    model = tiny_model(smollm_tokenizer.vocab_size, seed=3)
    ref = LLMEngine(model, smollm_tokenizer, EngineConfig(num_blocks=32)).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]
    quantize_int8(model)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.layers[0].mlp.up_proj, Int8Linear)
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert model.layers[0].mlp.up_proj.qweight.element_size() == 1
    assert weight_bytes(model.layers) < weight_bytes(tiny_model(smollm_tokenizer.vocab_size).layers) / 3
    out = LLMEngine(model, smollm_tokenizer, EngineConfig(num_blocks=32)).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out["token_ids"]) == 4 and out["token_ids"][0] == ref["token_ids"][0]


@pytest.mark.slow
def test_int8_perplexity_change_below_one_percent(smollm, smollm_tokenizer):
    report = int8_report(smollm, smollm_tokenizer, heldout_text(2_500), window=1024)
    assert report["tokens"] > 500
    assert abs(report["relative_change"]) < 0.01, report
    assert report["weight_mb_int8"] < 0.6 * report["weight_mb"]
