"""Compiled decode (EngineConfig(compile_decode=True), `lmforge serve --compile`): decode steps go
through torch.compile over a tensor-only view of the step and give the contiguous-cache reference's
logits, float or quantised, whatever the lengths and batch sizes; at most two graphs are compiled
(one sequence; several); a compiler failure falls back to eager decoding."""
import copy
import logging

import pytest
import torch
import torch._dynamo
import torch._guards

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.quant import quantize_model
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.paged_cache import StepBatch
from lmforge.serve.speculative import SpeculativeConfig
from tests.serve.test_paged_cache import PROMPTS, no_detokenizer, run_and_compare  # noqa: F401
from tests.serve.test_speculative import V, prompts_with_repeats, run, toy_model
from tests.serve.test_speculative_medusa import jittered_heads

pytestmark = pytest.mark.slow   # each graph takes seconds to compile on 2 cores


@pytest.fixture
def compiled_steps(monkeypatch):
    """Counts decode steps handed to the compiled function, and graphs compiled during the test (by
    Dynamo's compile id: a graph whose tracing restarts is still one graph)."""
    torch._dynamo.reset()
    calls = []
    real = StepBatch.decode_view

    def spy(self):
        calls.append(len(self.slots))   # attention rows: one per new token
        return real(self)
    monkeypatch.setattr(StepBatch, "decode_view", spy)
    compiled = set()
    real_compile = torch.compile

    def counting_compile(model, **kwargs):
        options = dict(kwargs.get("options") or {})
        guard_filter = options.pop("guard_filter_fn", None)

        def backend(gm, example_inputs):  # Inductor with the runner's options, counting graphs
            from torch._inductor.compile_fx import compile_fx
            cid = torch._guards.CompileContext.current_compile_id()
            compiled.add((cid.frame_id, cid.frame_compile_id))
            return compile_fx(gm, example_inputs, config_patches=options)
        return real_compile(model, dynamic=kwargs.get("dynamic"), backend=backend,
                            options={"guard_filter_fn": guard_filter} if guard_filter else None)
    monkeypatch.setattr(torch, "compile", counting_compile)
    yield calls, compiled
    torch._dynamo.reset()


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_compiled_decode_equals_the_reference(tiny, compiled_steps, kv_dtype):
    calls, compiled = compiled_steps
    # four ragged sequences that finish at different steps: the batch size and every length change
    # from step to step, down to one sequence alone: two graphs (several sequences; one), never more
    atol = 1e-4 if kv_dtype == "auto" else 2e-2   # int8 KV: the reference reads unquantised K/V
    engine = run_and_compare(tiny, PROMPTS, EngineConfig(block_size=4, num_blocks=200, kv_dtype=kv_dtype,
                                                         compile_decode=True), max_tokens=[12, 5, 9, 16], atol=atol)
    assert engine.runner.compile_decode, "compiling failed: the engine fell back to eager"
    assert {1, 2, 3, 4} <= set(calls), "decode steps did not take the compiled path"
    assert len(compiled) == 2, f"{len(compiled)} graphs compiled (expected 2: several sequences, one)"


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_compiled_decode_of_quantised_weights(tiny, compiled_steps, method):
    calls, compiled = compiled_steps
    model = copy.deepcopy(tiny)
    if method == "int8":
        quantize_model(model, "int8")
    elif method == "w8a8":   # the oneDNN int8 product, a custom op: one opaque call in the graph
        quantize_model(model, "smoothquant", calibration=torch.tensor(PROMPTS[2][:64]).view(2, 32))
    else:
        quantize_model(model, "rtn", bits=4, group_size=32)
    # bfloat16 activations in the packed kernels: the tolerance of their own eager test
    engine = run_and_compare(model, PROMPTS[:2], EngineConfig(block_size=4, num_blocks=200, compile_decode=True),
                             atol=3e-2)
    assert engine.runner.compile_decode, "compiling failed: the engine fell back to eager"
    assert calls and len(compiled) <= 2


def test_a_second_model_in_the_process_gets_its_own_graphs(tiny):
    # the runner skips Dynamo's guards on the model's modules and parameters, which is safe only
    # because each runner compiles its own copy of the decode function: a second model of the same
    # class compiled in the same process (8 heads of 8 instead of 4 of 16: the same parameter
    # shapes, a different attention; or int4 layers) must still decode by its own graphs. The real
    # torch.compile here: the counting fixture's per-call backends would keep the graphs apart anyway.
    torch._dynamo.reset()
    try:
        run_and_compare(tiny, PROMPTS[:2], EngineConfig(block_size=4, num_blocks=200, compile_decode=True), atol=1e-4)
        torch.manual_seed(1)
        heads = Transformer(ModelConfig(vocab_size=tiny.cfg.vocab_size, dim=64, n_layers=2, n_heads=8, n_kv_heads=4,
                                        hidden_dim=128, max_seq_len=512, tie_embeddings=True)).eval()
        int4 = copy.deepcopy(tiny)
        quantize_model(int4, "rtn", bits=4, group_size=32)
        for model, atol in ((heads, 1e-4), (int4, 3e-2)):
            engine = run_and_compare(model, PROMPTS[:2], EngineConfig(block_size=4, num_blocks=200,
                                                                      compile_decode=True), atol=atol)
            assert engine.runner.compile_decode, "compiling failed: the engine fell back to eager"
    finally:
        torch._dynamo.reset()


def test_int4_decode_compiles_two_graphs_whatever_the_batch(tiny, compiled_steps):
    # the several-rows graph is first compiled at two rows, then meets three and four: no recompile
    # (the int4 kernel's packed tensors are plain attributes; left dynamic, duck sizing tied the row
    # count to their trailing dimension of 2, and a batch of 16 recompiled in the middle of serving)
    calls, compiled = compiled_steps
    model = copy.deepcopy(tiny)
    quantize_model(model, "rtn", bits=4, group_size=32)
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=200, compile_decode=True))
    for prompts in (PROMPTS[:1], PROMPTS[:2], PROMPTS[:3], PROMPTS):
        engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert engine.runner.compile_decode and {1, 2, 3, 4} <= set(calls)
    assert len(compiled) == 2, f"{len(compiled)} graphs compiled (expected 2: one row, several)"


def test_short_prompts_alone_or_joining_decodes_reuse_the_warm_up_graphs(tiny, compiled_steps):
    # the several-rows graph is first compiled (by the server's warm-up) on a decode of several
    # streams, where the step's tokens and its logits rows are equal; a short prompt (<= ROW_TOKENS)
    # arriving while others decode makes a rows step with more tokens than logits rows. Duck sizing
    # had tied the two sizes: such a step recompiled (a minute's stall on SmolLM2, in the middle of
    # serving 16 streams)
    calls, compiled = compiled_steps
    engine = LLMEngine(copy.deepcopy(tiny), None, EngineConfig(block_size=4, num_blocks=200, compile_decode=True))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.warm_up()
    assert len(compiled) == 3, "the warm-up did not compile the three graphs"
    short = PROMPTS[2][:5]
    for p in PROMPTS[:2]:
        engine.add_request(None, p, greedy)
    engine.step(), engine.step()          # both prompts in, decoding
    engine.add_request(None, short, greedy)
    rows = len(calls)
    while engine.has_work:
        engine.step()
    assert 2 + len(short) in calls[rows:], "the short prompt's step did not take the compiled path"
    # a short prompt alone: several rows, one logits row (a size-1 dimension is always specialised)
    lone = PROMPTS[3]
    engine.add_request(None, lone, greedy)
    rows = len(calls)
    while engine.has_work:
        engine.step()
    assert len(lone) in calls[rows:], "the lone short prompt's step did not take the compiled path"
    assert len(compiled) == 3, f"{len(compiled)} graphs compiled (expected 3: one row, several, a lone prompt)"


@pytest.mark.parametrize("method", ["ngram", "medusa"])
def test_compiled_speculative_verification_is_token_identical(smollm_tokenizer, compiled_steps, method):
    # verifying a draft (1 + k tokens per sequence) runs compiled too, one attention row per token,
    # and Medusa's guesses come out of the compiled step with its logits: the same drafts and
    # acceptances as eager decoding, and output identical to plain decoding
    calls, compiled = compiled_steps
    target, prompts = toy_model(V), prompts_with_repeats(6)
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = run(LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=256, block_size=4)),
                [(p, greedy, None) for p in prompts])
    spec = SpeculativeConfig(method, num_tokens=3) if method == "ngram" else \
        SpeculativeConfig(method, num_tokens=3, medusa_heads=jittered_heads(target, 3, 0.05))
    stats = []
    for compile_decode in (False, True):
        engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=256, block_size=4, speculative=spec,
                                                                  compile_decode=compile_decode))
        assert run(engine, [(p, greedy, None) for p in prompts]) == plain
        stats.append(engine.spec_stats)
    assert engine.runner.compile_decode and max(calls) > len(prompts), "no verification step took the compiled path"
    assert stats[0] == stats[1] and 0 < stats[1]["accepted"] < stats[1]["drafted"], stats
    assert len(compiled) <= 2


def test_a_failing_compiler_falls_back_to_eager(tiny, monkeypatch, caplog):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.ERROR, logger="lmforge.serve.model_runner"):
        engine = run_and_compare(tiny, PROMPTS, EngineConfig(block_size=4, num_blocks=200, compile_decode=True))
    assert "decoding eagerly" in caplog.text
    assert not engine.runner.compile_decode and engine.runner._decode_fn is None
