"""The paged KV cache gives the same logits as the model's contiguous KV cache, whatever the
block size, chunking of prompts, batch composition or prefix sharing."""
import pytest
import torch

from lmforge.model.kv_cache import KVCache
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams


def record_logits(engine: LLMEngine) -> dict[str, list[torch.Tensor]]:
    """Wrap the runner so every step's logits are kept, per request, in order."""
    seen: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def recording(items):
        step, logits, guesses = run(items)
        for seq, row in zip(step.sampled, logits):
            seen.setdefault(seq.request_id, []).append(row.clone())
        return step, logits, guesses
    engine.runner.run = recording
    return seen


@torch.no_grad()
def contiguous_logits(model, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """Prefill then one token at a time through the contiguous KVCache (the reference path)."""
    cache = KVCache(model.cfg, 1, len(prompt) + len(generated), dtype=torch.float32)
    out = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
    for token in generated[:-1]:
        out.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
    return out


def run_and_compare(model, prompts, config: EngineConfig, max_tokens: int | list[int] = 12, atol=1e-4):
    """max_tokens: one for all, or one per prompt (sequences then finish at different steps)."""
    engine = LLMEngine(model, None, config)
    engine.stop_ids = set()
    seen = record_logits(engine)
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    ids = [engine.add_request(None, p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, limits)]
    generated = {i: [] for i in ids}
    while engine.has_work:
        for out in engine.step():
            generated[out.request_id] += out.new_token_ids
    for rid, prompt, n in zip(ids, prompts, limits):
        ref = contiguous_logits(model, prompt, generated[rid])
        assert len(seen[rid]) == len(ref) == n
        worst = max(float((got - want.float()).abs().max()) for got, want in zip(seen[rid], ref))
        assert worst < atol, f"{rid}: paged and contiguous logits differ by {worst}"
    assert engine.blocks.num_used == 0
    return engine


class _NoDetok:
    def decode(self, ids, skip_special=False):
        return ""


@pytest.fixture(autouse=True)
def no_detokenizer(monkeypatch):
    # These tests run without a tokenizer: text is irrelevant, logits are what is compared.
    import lmforge.serve.engine as engine_mod
    real = engine_mod.Detokenizer
    monkeypatch.setattr(engine_mod, "Detokenizer", lambda tok, stop: real(_NoDetok(), stop))


PROMPTS = [[5, 17, 99, 3, 42, 7, 7, 1000, 12], [8] * 37, list(range(100, 171)), [2, 4]]


@pytest.mark.parametrize("block_size,budget", [(16, 512), (4, 512), (1, 512), (8, 10), (3, 7)])
def test_paged_logits_equal_contiguous(tiny, block_size, budget):
    # budget < prompt length forces chunked prefill across steps, mixed with other sequences' decodes
    run_and_compare(tiny, PROMPTS, EngineConfig(block_size=block_size, num_blocks=200, max_batched_tokens=budget))


def test_paged_logits_with_prefix_sharing(tiny):
    shared = list(range(300, 340))
    prompts = [shared + [1, 2, 3], shared + [9], shared[:35], shared + [1, 2, 3]]
    engine = run_and_compare(tiny, prompts, EngineConfig(block_size=8, num_blocks=100, max_batched_tokens=64))
    assert engine.blocks.prefix_hits > 0


def test_paged_logits_under_preemption(tiny):
    # 12 blocks of 4 slots cannot hold four growing sequences at once: some get preempted and
    # recomputed, and the logits must still match.
    engine = run_and_compare(tiny, PROMPTS[:1] + [[3] * 9, [4] * 10, [6] * 8],
                             EngineConfig(block_size=4, num_blocks=12, max_batched_tokens=64, prefix_caching=False),
                             max_tokens=20)
    assert engine.scheduler.num_preemptions > 0


def test_paged_logits_equal_contiguous_smollm2(smollm):
    prompts = [[1, 4093, 198, 19556, 905, 28, 638, 359, 346, 47, 2, 198, 1, 520, 9531, 198], [504, 3458, 282]]
    run_and_compare(smollm, prompts, EngineConfig(block_size=16, num_blocks=16, max_batched_tokens=8), max_tokens=6,
                    atol=2e-4)
