"""lmforge's row attention kernel (serve/row_attention.cpp): exact attention over each row's own keys,
with the same bits whatever the row is batched with; and what that buys: speculative and batched
decoding of an int4 model reproduce plain single-stream decoding token for token."""
import platform

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, cpu_kernels
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.paged_cache import PagedKVCache
from lmforge.serve.speculative import SpeculativeConfig

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="lmforge's CPU kernels are x86 only")


def attention(q, k, v, keys, lengths):
    assert cpu_kernels.load(), "lmforge's CPU kernels did not build"
    return torch.ops.lmforge_rows.attention(q, k, v, keys, lengths)


def random_case(rows=7, width=90, heads=6, kv_heads=2, d=64, slots=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, d, generator=g)
    k, v = torch.randn(2, slots, kv_heads, d, generator=g)
    keys = torch.randint(0, slots, (rows, width), generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0] = width
    return q, k, v, keys, lengths


def reference(q, k, v, keys, lengths):
    """Softmax attention in float64, row by row over its first lengths[r] keys."""
    group = q.shape[1] // k.shape[1]
    out = []
    for r, n in enumerate(lengths.tolist()):
        ks = k[keys[r, :n]].double().repeat_interleave(group, 1).transpose(0, 1)   # [H, n, D]
        vs = v[keys[r, :n]].double().repeat_interleave(group, 1).transpose(0, 1)
        w = torch.softmax(q[r].double()[:, None] @ ks.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        out.append((w @ vs)[:, 0])
    return torch.stack(out).float()


# head_dim 64 and 32: the AVX2 path's whole 64-float chunks and a short one; 72: a chunk of 64 and one
# of 8; 70: not a multiple of 8, the portable path. sharpness scales q: a flat softmax (measured error
# <= 4.8e-7; an exp one polynomial term short gives up to 1.5e-6) and a peaked one, whose scores are
# larger and carry more float32 rounding of their own (<= 2.2e-6).
@pytest.mark.parametrize("heads,kv_heads,d", [(6, 2, 64), (4, 4, 32), (8, 2, 72), (9, 3, 70)])
@pytest.mark.parametrize("sharpness,atol", [(1.0, 1e-6), (4.0, 3e-6)])
def test_row_attention_equals_float64_softmax_attention(heads, kv_heads, d, sharpness, atol):
    for seed in range(5):
        q, *rest = random_case(heads=heads, kv_heads=kv_heads, d=d, seed=seed)
        case = (q * sharpness, *rest)
        torch.testing.assert_close(attention(*case), reference(*case), rtol=0, atol=atol)


def test_a_row_gets_the_same_bits_alone_batched_and_padded():
    q, k, v, keys, lengths = random_case(rows=9, width=120)
    batched = attention(q, k, v, keys, lengths)
    for r, n in enumerate(lengths.tolist()):
        alone = attention(q[r:r + 1].contiguous(), k, v, keys[r:r + 1, :n].contiguous(), lengths[r:r + 1])
        assert torch.equal(alone[0], batched[r]), r
    # SDPA over the same padded, masked batch does not have this property (why the kernel exists)
    mask = (torch.arange(keys.shape[1]) < lengths[:, None])[:, None, None]
    ks, vs = (t[keys].transpose(1, 2) for t in (k, v))
    sdpa = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, enable_gqa=True)[:, :, 0]
    alone = [F.scaled_dot_product_attention(q[r:r + 1, :, None], ks[r:r + 1, :, :n], vs[r:r + 1, :, :n],
                                            enable_gqa=True)[0, :, 0] for r, n in enumerate(lengths.tolist())]
    assert not all(torch.equal(a, b) for a, b in zip(alone, sdpa))


def test_threads_do_not_change_a_bit():
    case = random_case(rows=16, width=64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention(*case)
        torch.set_num_threads(4)
        four = attention(*case)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, four)


def test_bad_rows_are_refused():
    q, k, v, keys, lengths = random_case(rows=2, width=8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        attention(q, k, v, torch.full_like(keys, k.shape[0]), lengths)
    with pytest.raises(RuntimeError, match="sees 9 of 8 keys"):
        attention(q, k, v, keys, torch.tensor([9, 1]))
    with pytest.raises(RuntimeError, match="float32"):
        attention(q.double(), k, v, keys, lengths)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_the_cache_takes_the_kernel_and_agrees_with_its_sdpa_path(kv_dtype):
    cfg = ModelConfig(vocab_size=32, dim=96, n_layers=1, n_heads=6, n_kv_heads=2, hidden_dim=64)
    cache = PagedKVCache(cfg, num_blocks=32, block_size=8, kv_dtype=kv_dtype)
    assert cache.row_kernel
    q, k, v, keys, lengths = random_case(rows=5, width=40, heads=6, kv_heads=2, d=16, slots=256)
    cache.write(0, torch.arange(256), k, v)
    kernel = cache.row_attention(0, q, keys.reshape(-1), lengths)
    cache.row_kernel = False
    sdpa = cache.row_attention(0, q, keys.reshape(-1), lengths)
    torch.testing.assert_close(kernel, sdpa, rtol=0, atol=2e-6)
    if kv_dtype == "auto":
        torch.testing.assert_close(kernel, reference(q, k, v, keys, lengths), rtol=0, atol=2e-6)


OPEN_ENDED = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
              "What are the benefits of reading books?", "Describe a day in the life of a farmer."]


@pytest.fixture(scope="module")
def smollm_int4(smollm_path):
    from lmforge.model import load
    from lmforge.quant.apply import quantize_model
    model = load(smollm_path)
    quantize_model(model, "rtn", bits=4, group_size=32, head_bits=4)
    return model


def run_together(engine, prompts, params, speculative):
    ids = [engine.add_request(None, p, params, speculative=s) for p, s in zip(prompts, speculative)]
    out = {i: [] for i in ids}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[i] for i in ids]


@pytest.mark.slow
def test_int4_speculation_reproduces_plain_decoding_alone_and_batched(smollm_int4, smollm_tokenizer):
    """On int4 weights every layer re-rounds its inputs, so a last-bit difference in attention becomes a
    different token within a few dozen: before the row kernel, prompt lookup changed the output of all
    four of these prompts decoded alone. Now speculation gives exactly plain decoding's tokens, alone and
    in a batch of speculating and plain requests (compared with the same batch decoded plainly: the
    prompts are prefilled in one step either way, and prefill's matmuls, whose rounding depends on how
    many tokens a step holds, are not what this is about)."""
    tok = smollm_tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in OPEN_ENDED]
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    plain = LLMEngine(smollm_int4, tok, EngineConfig(kv_cache_mb=32))
    spec = LLMEngine(smollm_int4, tok, EngineConfig(kv_cache_mb=32, speculative=SpeculativeConfig("ngram", 4, 3, 2)))
    for p in prompts:
        assert spec.generate([p], greedy)[0]["token_ids"] == plain.generate([p], greedy)[0]["token_ids"]
    assert spec.spec_stats["accepted"] > 0
    both = prompts + prompts
    want = run_together(plain, both, greedy, [False] * 8)
    assert run_together(spec, both, greedy, [True] * 4 + [False] * 4) == want
