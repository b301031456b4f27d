"""One continuous batch holding a speculating request, a grammar-constrained one, a prefix-cache
hit and a plain one: each request gets exactly the tokens it gets when it runs alone (greedy)."""
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.grammar import compile_grammar
from lmforge.serve.speculative import SpeculativeConfig
from tests.serve.test_speculative import V, blocks_hold_only_tokens, toy_model


def test_mixed_batch_gives_each_request_its_solo_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    # float64 (batching cannot flip an argmax by rounding) over SmolLM2's first 96 tokens: the
    # specials, digits, punctuation and letters, so the grammar below can be written with them.
    model = toy_model(V)
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    grammar = compile_grammar(("regex", r"\[[0-9]{1,3}(,[0-9]{1,3}){2,5}\]"), tok, V)
    shared = list(range(17, 17 + 40))                                      # 10 blocks of 4 tokens
    requests = {   # name: (prompt, params, speculative)
        "plain": (shared + [60, 61], greedy, False),
        "speculative": ([30, 31, 32, 33, 34] * 3 + [30], greedy, True),
        "grammar": ([50, 51, 52], SamplingParams(max_tokens=40, temperature=0, grammar=grammar), None),
        "prefix-hit": (shared + [70, 71], greedy, False),
    }
    config = dict(num_blocks=512, block_size=4, speculative=SpeculativeConfig("ngram", num_tokens=4, default_on=False))
    alone = {}
    for name, (prompt, params, spec) in requests.items():
        engine = LLMEngine(model, tok, EngineConfig(**config))
        alone[name] = engine.generate([prompt], params)[0]["token_ids"]
    assert tok.decode(alone["grammar"]).startswith("[") and len(alone["grammar"]) > 5

    engine = LLMEngine(model, tok, EngineConfig(**config))
    out, together = {}, set()

    def step():
        for o in engine.step():
            assert o.error is None
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.add_request("plain", *requests["plain"][:2], speculative=False)
    step()                                       # the shared prompt's blocks are now cached
    for name in ("speculative", "grammar", "prefix-hit"):
        prompt, params, spec = requests[name]
        engine.add_request(name, prompt, params, speculative=spec)
    while engine.has_work:
        step()
        blocks_hold_only_tokens(engine)
        if len(engine.scheduler.running) == 4:
            together.add(engine.num_steps)
    assert len(together) > 10                    # the four really decoded in one batch
    assert engine.blocks.prefix_hits > 0 and engine.seqs == {} and engine.blocks.num_used == 0
    stats = engine.spec_stats
    assert 0 < stats["accepted"] < stats["drafted"], stats       # drafts were accepted and rolled back
    assert out == alone
