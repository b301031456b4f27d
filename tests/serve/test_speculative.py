"""Speculative decoding in the engine: greedy output identical to plain decoding for each proposer
(batched with plain requests, with preemption and prefix hits), KV rollback of rejected drafts,
and rejection sampling that keeps the target distribution exactly (chi-squared tests)."""
import copy
import itertools

import pytest
import torch
from scipy.stats import chisquare

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.sampling import generate
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.speculative import DraftBudget, SpeculativeConfig
from lmforge.serve.speculative.medusa import MedusaHeads
from lmforge.serve.speculative.ngram import prompt_lookup
from lmforge.serve.speculative.verify import verify_sampled


def toy_model(vocab: int, seed: int = 0, std: float = 0.1) -> Transformer:
    """A 2-layer random model in float64 (batching cannot flip an argmax through rounding). Its
    init_std is large enough that the context matters, so drafts are both accepted and rejected."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=512, tie_embeddings=True, init_std=std)
    return Transformer(cfg).eval().double()


def perturbed(model: Transformer, scale: float, seed: int = 1) -> Transformer:
    """A draft model: the target with every weight jittered, so it agrees often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.std())
    return draft


V = 96


def prompts_with_repeats(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, some repeating a phrase (prompt lookup finds matches), some sharing a
    16-token head (prefix-cache hits)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, V, (16,), generator=g).tolist()
    out = []
    for i in range(n):
        phrase = torch.randint(0, V, (5 + i % 7,), generator=g).tolist()
        out.append((head if i % 4 == 0 else []) + phrase * (1 + i % 3) + [i % V])
    return out


def run(engine: LLMEngine, requests, check=None) -> list[list[int]]:
    """requests: (prompt, params, speculative) -> token ids per request; check(engine) after each step."""
    ids = [engine.add_request(None, p, sp, speculative=s) for p, sp, s in requests]
    out = {i: [] for i in ids}
    while engine.has_work:
        for o in engine.step():
            assert o.error is None
            out[o.request_id] += o.new_token_ids
        if check:
            check(engine)
    assert engine.blocks.num_used == 0
    return [out[i] for i in ids]


def blocks_hold_only_tokens(engine: LLMEngine) -> None:
    """KV rollback: after every step a decoding sequence holds no block past its tokens."""
    for seq in engine.scheduler.running:
        if seq.spec is not None and seq.num_pending == 1:
            assert len(seq.block_table) <= engine.blocks.blocks_for(seq.num_tokens), seq


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_is_token_identical_to_plain_decoding(method, smollm_tokenizer):
    target = toy_model(V)
    prompts = prompts_with_repeats(32)
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=64, temperature=1.0, seed=5, ignore_eos=True)
    plain = run(LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=1024, block_size=4)),
                [(p, greedy, None) for p in prompts] + [(prompts[0], sampled, None)])
    spec = SpeculativeConfig(method=method, num_tokens=4, draft_model=perturbed(target, 0.3), default_on=False)
    engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=1024, block_size=4, speculative=spec))
    # 32 speculating requests in one continuous batch with the same prompts decoded plainly and a
    # plain sampled request.
    got = run(engine, [(p, greedy, True) for p in prompts] + [(p, greedy, False) for p in prompts]
              + [(prompts[0], sampled, False)], check=blocks_hold_only_tokens)
    assert got[:32] == plain[:32]
    assert got[32:64] == plain[:32]
    assert got[64] == plain[32]
    stats = engine.spec_stats
    assert 0 < stats["accepted"] < stats["drafted"], stats  # drafts were both accepted and rejected
    assert engine.blocks.prefix_hits > 0


def test_speculation_survives_preemption_in_a_tight_cache(smollm_tokenizer):
    target = toy_model(V)
    prompts = prompts_with_repeats(12, seed=3)
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    plain = run(LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=1024, block_size=4)),
                [(p, greedy, None) for p in prompts])
    for method in ("ngram", "draft"):
        spec = SpeculativeConfig(method=method, num_tokens=5, draft_model=perturbed(target, 0.3))
        engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=60, block_size=4, speculative=spec))
        assert run(engine, [(p, greedy, None) for p in prompts], check=blocks_hold_only_tokens) == plain
        assert engine.scheduler.num_preemptions > 0 and engine.spec_stats["accepted"] > 0


def test_draft_model_proposals_are_its_own_greedy_continuations(smollm_tokenizer):
    """The draft model's paged cache stays right through rejections, rollback and preemption:
    every draft it proposes equals its greedy continuation computed from scratch (model.sampling.generate)."""
    target = toy_model(V)
    draft_model = perturbed(target, 0.3)
    spec = SpeculativeConfig(method="draft", num_tokens=3, draft_model=draft_model)
    # a cache so small that sequences are preempted and their draft K/V must be recomputed too
    engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=40, block_size=4, speculative=spec))
    propose, checked = engine.proposer.propose, []

    def checking(work, generator=None):
        propose(work, generator)
        for seq, k in work:
            want = list(generate(draft_model, seq.token_ids, max_new_tokens=k, temperature=0))
            assert seq.spec.draft == want
            checked.append(k)
    engine.proposer.propose = checking
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    run(engine, [(p, greedy, None) for p in prompts_with_repeats(8)])
    stats = engine.spec_stats
    assert engine.scheduler.num_preemptions > 0 and sum(checked) == stats["drafted"] > 100
    assert 0 < stats["accepted"] < stats["drafted"], stats


@pytest.mark.slow
def test_smollm2_prompt_lookup_is_token_identical(smollm, smollm_tokenizer):
    tok = smollm_tokenizer
    code = "def area(width, height):\n    result = width * height\n    return result\n"
    questions = [f"Rename the variable result to product in this code:\n{code}", "Name three colours."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = run(LLMEngine(smollm, tok, EngineConfig(kv_cache_mb=16)), [(p, greedy, None) for p in prompts])
    engine = LLMEngine(smollm, tok, EngineConfig(kv_cache_mb=16, speculative=SpeculativeConfig(num_tokens=4)))
    got = run(engine, [(p, greedy, None) for p in prompts] + [(prompts[0], greedy, False)])
    assert got == plain + plain[:1]
    assert engine.spec_stats["accepted"] >= 5, engine.spec_stats


def test_draft_budget_follows_acceptance():
    b = DraftBudget(4)
    assert b.allowed() == 4
    b.update(4, 4)
    assert b.allowed() == 4                      # capped at k
    b.update(4, 1)
    assert b.allowed() == 2                      # accepted + 1
    b.update(2, 2)
    assert b.allowed() == 3                      # a full acceptance grows it by one
    b.update(3, 0)
    assert b.allowed() == 1                      # a miss drops it to one
    b.update(1, 0)                               # a second miss in a row: pause 2 steps
    assert [b.allowed() for _ in range(3)] == [0, 0, 1]
    b.update(1, 0)
    assert [b.allowed() for _ in range(5)] == [0, 0, 0, 0, 1]
    b.update(0, 0)                               # no draft this time: nothing learnt
    b.update(1, 1)                               # a hit ends the misses
    assert b.allowed() == 2 and b.misses == 0
    for _ in range(10):
        b.update(1, 0)
    assert b.pause == 32                         # pauses are capped


def test_adaptive_speculation_drafts_less_where_drafts_fail(smollm_tokenizer):
    """A chaotic target (large init) rarely continues a repeat, so prompt lookup's 1-gram drafts
    mostly fail: the adaptive budget drafts far fewer tokens, for the same output."""
    target = toy_model(V, std=0.5)
    prompts = prompts_with_repeats(8, seed=2)
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    stats = {}
    outputs = {}
    for adaptive in (False, True):
        spec = SpeculativeConfig("ngram", num_tokens=4, ngram_min=1, adaptive=adaptive)
        engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=512, block_size=4, speculative=spec))
        outputs[adaptive] = run(engine, [(p, greedy, None) for p in prompts])
        stats[adaptive] = engine.spec_stats
    assert outputs[True] == outputs[False]
    fixed, adapted = stats[False], stats[True]
    assert fixed["accepted"] < 0.3 * fixed["drafted"], fixed           # the premise: drafts mostly fail
    assert adapted["drafted"] < 0.4 * fixed["drafted"], (adapted, fixed)
    assert adapted["accepted"] / adapted["drafted"] > fixed["accepted"] / fixed["drafted"]


def test_prompt_lookup_drafts():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3], 2, n_max=3) == [9, 1]
    assert prompt_lookup([5, 1, 2, 7, 1, 2], 3, n_max=2) == [7, 1, 2]
    assert prompt_lookup([4, 4, 4], 4, n_max=2) == [4, 4, 4, 4]             # a loop drafts k tokens
    assert prompt_lookup([1, 2, 3, 4], 4, n_max=3) == []                      # nothing repeats
    assert prompt_lookup([1, 2, 8, 3, 2, 9, 3, 2], 1, n_max=2) == [9]         # longest, latest match


def test_speculation_options_are_checked(tiny, smollm_tokenizer):
    with pytest.raises(LmforgeError, match="draft model"):
        LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=8, speculative=SpeculativeConfig(method="draft")))
    with pytest.raises(LmforgeError, match="vocabulary"):
        LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=8, speculative=SpeculativeConfig(
            method="draft", draft_model=toy_model(V))))
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=8))
    with pytest.raises(LmforgeError, match="without speculative"):
        engine.add_request(None, [1, 2], SamplingParams(), speculative=True)


# --- the target distribution is kept: rejection sampling ----------------------------------------
def markov(vocab: int, seed: int, sharpness: float) -> torch.Tensor:
    """A random first-order chain: row t is the next-token distribution after token t."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * sharpness, -1)


def speculative_paths(p: torch.Tensor, q: torch.Tensor | None, length: int, n: int, k: int, seed: int,
                      verify=verify_sampled) -> list[tuple[int, ...]]:
    """Generate n sequences of `length` tokens from chain p, starting after token 0, k draft tokens
    per round: drawn from chain q, or (q None) the deterministic point-mass draft 'next = t + 1'."""
    g = torch.Generator().manual_seed(seed)
    vocab = p.shape[0]
    paths = []
    for _ in range(n):
        out = [0]
        while len(out) - 1 < length:
            draft, qrows = [], []
            for _ in range(k):
                prev = (draft or out)[-1]
                if q is None:
                    draft.append((prev + 1) % vocab)
                else:
                    qrows.append(q[prev])
                    draft.append(int(torch.multinomial(q[prev], 1, generator=g)))
            context = out[-1:] + draft
            probs = torch.stack([p[t] for t in context])          # target at each verified position
            out += verify(probs, draft, torch.stack(qrows) if qrows else None, g)
        paths.append(tuple(out[1:length + 1]))
    return paths


def chi2_pvalue(paths, p: torch.Tensor, length: int) -> float:
    vocab = p.shape[0]
    cells = list(itertools.product(range(vocab), repeat=length))
    expected = []
    for cell in cells:
        prob, prev = 1.0, 0
        for t in cell:
            prob *= float(p[prev, t])
            prev = t
        expected.append(prob * len(paths))
    counts = {c: 0 for c in cells}
    for path in paths:
        counts[path] += 1
    return chisquare([counts[c] for c in cells], expected).pvalue


@pytest.mark.parametrize("draft", ["model", "point-mass"])
def test_rejection_sampling_keeps_the_target_distribution(draft):
    """Three tokens from a 4-token chain (64 outcomes), generated 2 draft tokens per round with
    accept/reject, residual resampling and the bonus token: the joint distribution is the target chain's."""
    p, q = markov(4, 0, 1.5), markov(4, 1, 1.5)
    paths = speculative_paths(p, q if draft == "model" else None, length=3, n=4000, k=2, seed=0)
    assert chi2_pvalue(paths, p, 3) > 1e-3
    # the same statistic rejects the draft's own distribution: the test has the power to notice
    if draft == "model":
        assert chi2_pvalue(paths, q, 3) < 1e-6


def test_engine_sampling_with_speculation_matches_the_model(smollm_tokenizer):
    """End to end on a 4-token vocabulary: with prompt lookup, a draft model and Medusa heads, the
    engine's sampled 3-token continuations follow the target model's own joint distribution. The
    target soft-caps its logits (at 2, which moves its joint distribution by a total variation of
    0.36), so a path that verifies with the bare LM head instead of model.logits fails."""
    target = toy_model(4, seed=2, std=0.5)
    target.cfg.logit_softcap = 2.0
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with torch.no_grad():
        expected = {}
        for cell in itertools.product(range(4), repeat=3):
            logits = target(torch.tensor([prompt + list(cell)]))[0, len(prompt) - 1:-1]
            expected[cell] = float(torch.softmax(logits, -1).gather(1, torch.tensor(cell)[:, None]).prod())
    n = 1500
    heads = MedusaHeads(64, 2, 4).double()
    with torch.no_grad():
        heads.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    for method in ("ngram", "draft", "medusa"):
        spec = SpeculativeConfig(method=method, num_tokens=2, draft_model=toy_model(4, seed=3, std=0.5),
                                 medusa_heads=heads)
        engine = LLMEngine(target, smollm_tokenizer, EngineConfig(num_blocks=4096, block_size=4, max_num_seqs=512,
                                                                 max_batched_tokens=8192, seed=11, speculative=spec))
        engine.stop_ids = set()
        params = [SamplingParams(max_tokens=3, temperature=1.0, seed=i) for i in range(n)]
        paths = [tuple(r["token_ids"]) for r in engine.generate([prompt] * n, params)]
        assert engine.spec_stats["rounds"] > n / 2 and engine.spec_stats["accepted"] < engine.spec_stats["drafted"]
        assert pooled_chisquare_pvalue([paths.count(c) for c in expected], [e * n for e in expected.values()]) > 1e-3, \
            method


def pooled_chisquare_pvalue(counts: list[int], expected: list[float], min_expected: float = 5.0) -> float:
    """Chi-squared with the cells expected fewer than min_expected times pooled into one (the test's
    approximation fails on near-empty cells: a single hit in a cell expected 0.15 times adds ~5)."""
    rare = [i for i, e in enumerate(expected) if e < min_expected]
    kept = [i for i in range(len(expected)) if i not in rare]
    return chisquare([counts[i] for i in kept] + [sum(counts[i] for i in rare)],
                     [expected[i] for i in kept] + [sum(expected[i] for i in rare)]).pvalue
