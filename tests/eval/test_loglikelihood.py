"""Log-likelihoods from the in-process backend equal those computed directly with `transformers`
on the same (random Llama) model and the same token ids; batched generation equals one-at-a-time."""
import random

import pytest
import torch

from lmforge.eval.loglikelihood import score_continuations
from lmforge.model import ModelConfig, Transformer
from lmforge.model.sampling import generate

transformers = pytest.importorskip("transformers")

PAIRS = [
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Question: What is 2 + 2?\nAnswer:", " five"),
    ("Question: What is 2 + 2?\nAnswer:", " The quick brown fox"),
    ("A. red\nB. blue\nAnswer: ", "B"),          # trailing space moves into the continuation
    ("def add(a, b):\n", "    return a + b\n"),
    ("", "The lighthouse keeper"),                # empty context: conditioned on EOS/BOS
    ("The quick brown fox jumps over the lazy dog. " * 30, " over the lazy dog."),  # longer than context
]


def hf_continuation_logprob(hf, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = hf(ids).logits[0, :-1].double().log_softmax(-1)
    positions = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    targets = ids[0, 1:]
    total = sum(float(logp[p, targets[p]]) for p in positions)
    greedy = all(int(logp[p].argmax()) == int(targets[p]) for p in positions)
    return total, greedy


def test_loglikelihood_matches_transformers(tiny_model_dir, tiny_backend):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    got = tiny_backend.loglikelihood(PAIRS)
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got):
        ctx_ids, cont_ids = tiny_backend.encode_pair(ctx, cont)
        ref_lp, ref_greedy = hf_continuation_logprob(hf, ctx_ids, cont_ids)
        assert lp == pytest.approx(ref_lp, abs=2e-4 * len(cont_ids))
        assert greedy == ref_greedy
    # the model is random but not flat: log-likelihoods differ between choices
    assert len({round(lp, 3) for lp, _ in got[:3]}) == 3


def test_greedy_flag_is_true_for_the_models_own_argmax(tiny_model_dir, tiny_backend):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    ctx = tiny_backend.tok.encode("Question: What is 2 + 2?\nAnswer:")
    with torch.no_grad():
        best = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
    (lp, greedy), = score_continuations(tiny_backend.model, [(ctx, [best])])
    assert greedy


def test_rolling_loglikelihood_matches_transformers(tiny_model_dir, tiny_backend):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    text = "The lighthouse keeper wrote the weather in a small notebook every evening."
    (nats, n_tokens), = tiny_backend.loglikelihood_rolling([text])
    ids = [tiny_backend.prefix_id] + tiny_backend.tok.encode(text)
    ref, _ = hf_continuation_logprob(hf, ids[:1], ids[1:])
    assert n_tokens == len(ids) - 1 and nats == pytest.approx(ref, abs=1e-3)


def random_requests(rng, vocab, n_contexts=12):
    """Questions with 1-4 choices; most contexts open with one of two shared "few-shot" prefixes."""
    shots = [[rng.randrange(vocab) for _ in range(n)] for n in (18, 24)]
    reqs = []
    for q in range(n_contexts):
        tail = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        ctx = (shots[q % 2] + tail) if q % 3 else [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        reqs += [(ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]) for _ in range(rng.randint(1, 4))]
    return reqs


# one batch; batches sharing a prefix; many small batches and chunks
@pytest.mark.parametrize("budget, rows", [(4096, 64), (120, 8), (50, 3)])
def test_prefix_sharing_batches_equal_one_by_one_forward(budget, rows):
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    reqs = random_requests(random.Random(0), 97) + [([5] * 70, [6] * 8)]  # the last one needs truncation
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape), with_kwargs=True)
    got = score_continuations(model, reqs, token_budget=budget, max_rows=rows)
    hook.remove()
    if budget == 4096:  # each shared "few-shot" prefix ran once, as a one-row forward
        assert sorted(t for b, t in calls if b == 1 and t >= 18) == [18, 24]
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        ctx = ctx[-(cfg.max_seq_len + 1 - len(cont)):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = model(ids[:, :-1])[0].log_softmax(-1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        assert lp == pytest.approx(float(logp[pos, ids[0, pos + 1]].sum()), abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == ids[0, pos + 1]).all())


def test_backend_generation_equals_one_at_a_time_generate(tiny_backend):
    """Batched generation goes through the serving engine; greedy output equals the reference
    single-sequence KV-cached `generate`, row by row, with rows stopping at different steps."""
    from lmforge.eval.backend import GenerationRequest

    prompts = ["The quick brown", "def add(a, b):\n", "Question: What is 2 + 2?\nAnswer:", "A", "The special magic"]
    texts = tiny_backend.generate([GenerationRequest(p, 20) for p in prompts])
    tok, stops = tiny_backend.tok, tiny_backend.tok.stop_ids()
    for prompt, text in zip(prompts, texts):
        ids = [t for t in generate(tiny_backend.model, tok.encode(prompt), 20, temperature=0.0, stop_ids=stops)
               if t not in stops]
        assert text == tok.decode(ids, skip_special=True)


def test_generation_stops_at_stop_strings(tiny_backend):
    from lmforge.eval.backend import GenerationRequest

    free, = tiny_backend.generate([GenerationRequest("The quick brown", 30)])
    assert free  # the random model says something
    stop = free[len(free) // 2: len(free) // 2 + 2]
    cut, = tiny_backend.generate([GenerationRequest("The quick brown", 30, stop=(stop,))])
    assert stop not in cut and free.startswith(cut)
