"""`needle.max_length=auto`: the longest context that fits a memory budget, checked against the
memory formula written out here by hand for the tiny Llama of conftest (dim 64, 2 layers, 4 heads,
2 KV heads of 16, hidden 160, fp32, engine prefill chunks of 512 tokens), then the needle sweep at
that length on the tiny model."""
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.context_fit import generation_memory
from lmforge.eval.runner import evaluate
from lmforge.eval.tasks import make_task
from lmforge.serve.paged_cache import PagedKVCache

GIB = 2.0 ** 30


def by_hand(backend, n: int, pool: float = 0) -> float:
    """Bytes to generate from an n-token prompt: weights, K and V of 2 layers x 2 heads x 16 dims in
    fp32 per token, one layer's activations over a prefill chunk (x, k, v, q, gate/up/act), that
    layer's K/V gathered from the cache, the chunk's fp32 scores over 4 heads, the last logits."""
    weights = sum(p.numel() * 4 for p in backend.model.parameters())
    c = min(512, n)
    kv_cache = max(2 * 2 * 2 * 16 * 4 * n, pool)  # a KV pool allocated whole (GPU) counts whole
    activations = c * (64 + 2 * 2 * 16 + 4 * 16 + 3 * 160) * 4
    gathered = 2 * 2 * 16 * 4 * n
    scores = c * n * 4 * 4
    logits = backend.model.cfg.vocab_size * 4
    return weights + kv_cache + activations + gathered + scores + logits


def chosen(backend, budget_bytes: float):
    task = make_task("needle", {"max_length": "auto", "memory_gb": budget_bytes / GIB})
    task.backend = backend
    task.lengths()
    return task.fit


def test_auto_length_is_the_longest_within_the_budget(tiny_backend):
    assert tiny_backend.model.cfg.max_seq_len == 512  # the conftest model's positions
    fit = chosen(tiny_backend, by_hand(tiny_backend, 400))
    assert (fit.length, fit.limited_by) == (400, "memory budget")
    assert fit.estimate_bytes == by_hand(tiny_backend, 400)
    assert chosen(tiny_backend, by_hand(tiny_backend, 400) - 1).length == 399  # one byte less: one token less
    big = chosen(tiny_backend, 100 * GIB)
    assert (big.length, big.limited_by) == (512, "max position")
    assert "512 tokens, limited by the max position" in big.reason()
    with pytest.raises(LmforgeError, match="over the"):
        chosen(tiny_backend, by_hand(tiny_backend, 10))
    derived = chosen(tiny_backend, 0)  # from MemAvailable: this machine holds the whole tiny model
    assert derived.budget_source.endswith("MemAvailable + the loaded weights") and derived.length == 512
    with pytest.raises(LmforgeError, match="'auto' or unset"):
        make_task("needle", {"max_length": "400"})


def test_estimate_terms_match_the_engine(tiny_backend):
    engine = tiny_backend.engine()
    assert engine.config.max_batched_tokens == 512  # the prefill chunk by_hand assumes (CPU)
    assert PagedKVCache.bytes_per_block(tiny_backend.model.cfg, 16, torch.float32) == 16 * 2 * 2 * 2 * 16 * 4
    weights = sum(p.numel() * 4 for p in tiny_backend.model.parameters())
    for pool in (0, 2**20, 2**30):
        got = generation_memory(tiny_backend.model.cfg, 400, weights, 4, 512, pool)
        assert got == by_hand(tiny_backend, 400, pool)


def test_needle_sweep_runs_at_the_auto_length(tiny_backend, tmp_path):
    task = make_task("needle", {"max_length": "auto", "memory_gb": by_hand(tiny_backend, 400) / GIB,
                                "depths": [0.5], "trials": 1})
    report = evaluate(tiny_backend, [task], tmp_path / "eval", show_progress=False)
    details = report["tasks"]["needle"]["details"]
    assert details["context_lengths"] == [256, 400]  # the ladder, ending at the longest that fits
    assert details["max_length"]["length"] == 400 and details["max_length"]["limited_by"] == "memory budget"
    assert report["tasks"]["needle"]["n"] == 2
    longest = max(task.items(), key=lambda it: it["length"])
    assert len(tiny_backend.tok.encode(longest["prompt"])) <= 400 - task.config.max_new_tokens
    assert (tmp_path / "eval" / "needle_heatmap.png").exists()
