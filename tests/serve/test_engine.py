"""Engine behaviour: batching invariance, sampling parameters, stop conditions, cancellation,
prefix caching, and the batch `complete` helper."""
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams, complete
from lmforge.serve.speculative import SpeculativeConfig

CHAT_QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a CPU does.",
                  "Give me three tips for learning to code.", "What is 12 times 12?", "Name a famous painter.",
                  "Why is the sky blue?", "Describe a cat in two sentences."]


def chat_ids(tok, question):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))


def run_all(engine, prompts, params):
    return engine.generate(prompts, params)


def test_greedy_identical_alone_and_batched_with_7_others(smollm, smollm_tokenizer):
    prompts = [chat_ids(smollm_tokenizer, q) for q in CHAT_QUESTIONS]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    engine = LLMEngine(smollm, smollm_tokenizer, EngineConfig(kv_cache_mb=64))
    alone = run_all(engine, prompts[:1], params)[0]
    batched = run_all(engine, prompts, params)
    assert len(alone["token_ids"]) == 32
    assert batched[0]["token_ids"] == alone["token_ids"]
    assert batched[0]["text"] == alone["text"]
    assert len({tuple(r["token_ids"]) for r in batched}) == len(prompts)  # really different requests
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("field", ["block_size", "kv_cache_mb", "max_num_seqs", "max_batched_tokens", "num_blocks"])
@pytest.mark.parametrize("value", [0, -3])
def test_engine_config_rejects_sizes_below_one(field, value):
    # max_num_seqs=0 left the scheduler nothing to run: generate() looped forever
    with pytest.raises(LmforgeError, match=f"EngineConfig.{field} must be at least 1, got {value}"):
        EngineConfig(**{field: value})


def test_warm_up_leaves_no_trace(tiny, smollm_tokenizer):
    # after the warm-up (which decodes prompts of token 0, drafting from them), the engine serves as a
    # fresh one does: the same unseeded samples, no prefix-cache hits from the warm-up's blocks,
    # counters from zero
    config = EngineConfig(num_blocks=64, block_size=4, speculative=SpeculativeConfig("ngram", num_tokens=3))
    sampled = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    prompt = [0] * 9
    fresh = LLMEngine(tiny, smollm_tokenizer, config)
    warmed = LLMEngine(tiny, smollm_tokenizer, config)
    assert warmed.warm_up() > 0
    assert warmed.generate([prompt], sampled) == fresh.generate([prompt], sampled)
    assert warmed.blocks.prefix_hits == 0 and warmed.num_steps == fresh.num_steps
    assert warmed.spec_stats == fresh.spec_stats
    assert warmed.add_request(None, prompt, sampled) == fresh.add_request(None, prompt, sampled)  # request ids


def test_seeded_sampling_reproducible_alone_and_batched(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=128))
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run_all(engine, [[10, 20, 30]], sampled)[0]["token_ids"]
    others = [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 5
    batched = run_all(engine, [[7, 8]] * 5 + [[10, 20, 30]], others + [sampled])[-1]["token_ids"]
    assert alone == batched
    different_seed = SamplingParams(**{**sampled.__dict__, "seed": 99})
    assert run_all(engine, [[10, 20, 30]], different_seed)[0]["token_ids"] != alone


def test_stop_conditions(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=128))
    sampled = dict(max_tokens=20, temperature=1.0, seed=7)  # seeded: varied yet reproducible tokens
    base = run_all(engine, [[11, 12, 13]], SamplingParams(**sampled, ignore_eos=True))[0]
    assert base["finish_reason"] == "length" and len(base["token_ids"]) == 20
    # a stop token id ends the request at its first occurrence, and its text is not included
    k = next(i for i, t in enumerate(base["token_ids"]) if i >= 3 and t not in base["token_ids"][:i])
    r = run_all(engine, [[11, 12, 13]], SamplingParams(**sampled, stop_token_ids=[base["token_ids"][k]]))[0]
    assert r["finish_reason"] == "stop" and r["token_ids"] == base["token_ids"][:k + 1]
    assert r["text"] == smollm_tokenizer.decode(base["token_ids"][:k], skip_special=True)
    # a stop string ends the text right before it, even when it spans several tokens
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 4]
    r = run_all(engine, [[11, 12, 13]], SamplingParams(**sampled, stop=["@@never@@", stop]))[0]
    assert r["finish_reason"] == "stop" and r["text"] == text[:text.index(stop)]


def test_eos_stops_unless_ignored(smollm, smollm_tokenizer):
    engine = LLMEngine(smollm, smollm_tokenizer, EngineConfig(kv_cache_mb=32))
    r = run_all(engine, [chat_ids(smollm_tokenizer, "What is 2+2?")], SamplingParams(max_tokens=48, temperature=0))[0]
    assert r["finish_reason"] == "stop" and r["token_ids"][-1] in smollm_tokenizer.stop_ids()
    assert "4" in r["text"] and "<|im_end|>" not in r["text"]


def test_logprobs_are_the_models_distribution(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64))
    prompt = [3, 1, 4, 1, 5]
    r = run_all(engine, [prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    with torch.no_grad():
        ref = torch.log_softmax(tiny(torch.tensor([prompt]))[0, -1].float(), -1)
    lp = r["logprobs"][0]
    assert lp.token_id == int(ref.argmax()) and math.isclose(lp.logprob, float(ref.max()), abs_tol=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_logit_bias_and_penalties(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64))
    forced = run_all(engine, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, logit_bias={777: 100.0}))[0]
    assert forced["token_ids"] == [777] * 5
    penalised = run_all(engine, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, logit_bias={777: 100.0},
                                                          frequency_penalty=2.0, presence_penalty=2.0, seed=0))[0]
    assert penalised["token_ids"][0] == 777  # the bias still wins, the penalties only add up with repeats
    assert len(penalised["token_ids"]) == 5


def test_abort_frees_blocks(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64, block_size=4))
    ids = [engine.add_request(None, [5] * 30, SamplingParams(max_tokens=100, temperature=0)) for _ in range(3)]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0 and engine.num_running == 3
    for rid in ids:
        assert engine.abort(rid)
    assert not engine.abort(ids[0])
    assert engine.blocks.num_used == 0 and not engine.has_work


def test_prefix_cache_reuse_gives_same_output(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64, block_size=4))
    prompt = list(range(40, 90))
    params = SamplingParams(max_tokens=8, temperature=0)
    first = run_all(engine, [prompt], params)[0]
    hits = engine.blocks.prefix_hits
    engine.add_request("again", prompt, params)
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert engine.blocks.prefix_hits - hits == 48          # 12 full blocks of the 50-token prompt
    assert outs[-1].cached_tokens == 48
    assert [o.new_token_ids[0] for o in outs] == first["token_ids"]


def test_chunked_prefill_matches_single_shot(tiny, smollm_tokenizer):
    prompt = list(range(1000, 1300))
    params = SamplingParams(max_tokens=10, temperature=0)
    whole = run_all(LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64)), [prompt], params)[0]
    chunked = run_all(LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64, max_batched_tokens=32)),
                      [prompt], params)[0]
    assert whole["token_ids"] == chunked["token_ids"]


def test_requests_that_cannot_fit_are_refused(tiny, smollm_tokenizer):
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=8, block_size=4))  # 32 token slots
    assert engine.max_model_len == 32
    with pytest.raises(LmforgeError, match="maximum context length"):
        engine.add_request(None, [1] * 30, SamplingParams(max_tokens=5))
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=1.5),
                SamplingParams(logprobs=99), SamplingParams(stop=[""]), SamplingParams(logit_bias={10**9: 1.0})):
        with pytest.raises(LmforgeError):
            engine.add_request(None, [1, 2], bad)
    with pytest.raises(LmforgeError, match="empty"):
        engine.add_request(None, [], SamplingParams())
    with pytest.raises(LmforgeError, match="token ids"):
        engine.add_request(None, [10**9], SamplingParams())


def test_complete_runs_a_batch(tiny, smollm_tokenizer):
    texts = complete(tiny, smollm_tokenizer, ["Hello", "def f(x):", "The"], max_tokens=6)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    again = complete(tiny, smollm_tokenizer, ["def f(x):"], max_tokens=6)
    assert again[0] == texts[1]  # greedy: same prompt, same text, whatever the batch
