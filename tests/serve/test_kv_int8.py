"""The int8 KV cache: per-head absmax quantisation within half a step, ~2x the blocks of a 16-bit
cache for the same memory, results independent of prompt chunking, and a held-out perplexity on
SmolLM2 within 1 % of the float32 cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.kv_report import paged_perplexity
from lmforge.serve.paged_cache import PagedKVCache, dequantize_per_head, quantize_per_head
from lmforge.serve.perplexity import heldout_text


def test_per_head_quantisation_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 2, 3)[None, :, None]  # heads of very different size
    q, scale = quantize_per_head(x)
    assert q.dtype == torch.int8 and scale.shape == (50, 3)
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127)
    err = (dequantize_per_head(q, scale, torch.float32) - x).abs()
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-6)).all())
    assert int(q.abs().max()) == 127
    zeros_q, zeros_scale = quantize_per_head(torch.zeros(2, 1, 8))   # an all-zero head stays zero, not NaN
    assert bool((dequantize_per_head(zeros_q, zeros_scale, torch.float32) == 0).all())


def test_int8_cache_holds_about_twice_the_tokens_of_a_16_bit_cache(tiny, smollm_tokenizer):
    cfg = tiny.cfg                                                     # head_dim 16 -> (2*16) / (16+4) = 1.6x
    per = {kv: PagedKVCache.bytes_per_block(cfg, 16, dt, kv) for kv, dt in
           (("auto", torch.bfloat16), ("int8", torch.bfloat16))}
    assert per["auto"] / per["int8"] == (2 * cfg.head_dim) / (cfg.head_dim + 4)
    engines = {kv: LLMEngine(tiny, smollm_tokenizer, EngineConfig(kv_cache_mb=4, kv_dtype=kv)) for kv in ("auto", "int8")}
    assert engines["int8"].cache.k[0].dtype == torch.int8
    # fp32 model: 4 bytes per value vs 1 + 4/head_dim
    ratio = engines["int8"].blocks.num_blocks / engines["auto"].blocks.num_blocks
    assert math.isclose(ratio, 4 * cfg.head_dim / (cfg.head_dim + 4), rel_tol=0.01)
    with pytest.raises(LmforgeError, match="kv dtype"):
        LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=4, kv_dtype="int4"))


def test_int8_results_do_not_depend_on_prompt_chunking(smollm_tokenizer):
    """Attention reads the stored, dequantised K/V for every token, this step's included, so a
    prompt prefilled in one chunk or in many decodes the same (float64, so only quantisation
    could make a difference, and a sharp random model, so it would show)."""
    from lmforge.model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                    max_seq_len=256, init_std=0.3)).eval().double()
    prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for kv in ("auto", "int8"):
        for budget in (512, 16, 7):
            engine = LLMEngine(model, smollm_tokenizer, EngineConfig(num_blocks=64, max_batched_tokens=budget,
                                                                     kv_dtype=kv, prefix_caching=False))
            runs[kv, budget] = engine.generate([prompt], params)[0]
    for kv in ("auto", "int8"):
        for budget in (16, 7):
            assert runs[kv, budget]["token_ids"] == runs[kv, 512]["token_ids"]
            diff = max(abs(a.logprob - b.logprob) for a, b in zip(runs[kv, budget]["logprobs"], runs[kv, 512]["logprobs"]))
            assert diff < 1e-9, (kv, budget, diff)
    # and the int8 cache does change the numbers (the comparison above has something to detect)
    diff = max(abs(a.logprob - b.logprob) for a, b in zip(runs["int8", 512]["logprobs"], runs["auto", 512]["logprobs"]))
    assert diff > 1e-6


def test_paged_perplexity_auto_equals_a_plain_forward(tiny):
    ids = torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    window = 128
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start:start + window + 1])
            logits = tiny(chunk[None, :-1])[0]
            nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
            n += len(chunk) - 1
    assert math.isclose(paged_perplexity(tiny, ids, "auto", window), math.exp(nll / n), rel_tol=1e-5)


@pytest.mark.slow
def test_int8_kv_perplexity_within_one_percent_on_smollm2(smollm, smollm_tokenizer):
    ids = smollm_tokenizer.encode(heldout_text(3000))
    base = paged_perplexity(smollm, ids, "auto", window=512)
    quant = paged_perplexity(smollm, ids, "int8", window=512)
    assert 1 < base < 50
    assert abs(quant / base - 1) < 0.01, (base, quant)


def test_cli_int8_report_kv_and_serve_flags(tmp_path, smollm_tokenizer):
    import json

    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.model import save
    from tests.serve.helpers import tiny_model
    ckpt = tmp_path / "tiny"
    save(tiny_model(smollm_tokenizer.vocab_size), ckpt)
    smollm_tokenizer.save(ckpt)
    text = tmp_path / "heldout.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    result = CliRunner().invoke(app, ["int8-report", str(ckpt), "--kv", "--text-file", str(text)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert abs(report["relative_change"]) < 0.01 and report["greedy_agreement"]["prompts"] == 8
    assert report["blocks_per_512mb"]["int8"] > 1.5 * report["blocks_per_512mb"]["bfloat16"]
    for flag, value in (("--kv-dtype", "int4"), ("--speculative", "lookahead")):
        result = CliRunner().invoke(app, ["serve", str(ckpt), "--port", "0", flag, value])
        assert isinstance(result.exception, LmforgeError) and flag in str(result.exception), result.output
