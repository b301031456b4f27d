"""z-loss and logit soft-capping against their closed forms on full fp64 logits, on every path that
turns hidden states into logits (training loss, token log-probs, scoring, generation, serving)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.fused_loss import linear_cross_entropy
from lmforge.model.logprobs import token_logprobs
from lmforge.model.sampling import generate
from lmforge.model.scoring import score_tokens
from lmforge.safety.interp import logit_lens
from lmforge.serve.prompt_logprobs import prompt_logprobs

CAP = 2.0  # small enough that capping changes every distribution a lot (raw logits reach ~±10)


def capped(u, cap):
    return u if cap is None else cap * torch.tanh(u / cap)


@pytest.mark.parametrize("cap", [None, CAP])
@pytest.mark.parametrize("z_loss", [0.0, 0.05])
def test_fused_loss_equals_cross_entropy_plus_z_loss_formula_fp64(cap, z_loss):
    torch.manual_seed(0)
    h = (3 * torch.randn(200, 16, dtype=torch.float64)).requires_grad_()
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (200,))
    t[::6] = -100
    valid = t != -100
    z = capped(h @ w.t(), cap)  # the formula on full logits
    lse = torch.logsumexp(z, -1)
    ref = F.cross_entropy(z, t, ignore_index=-100) + z_loss * (lse.square() * valid).sum() / valid.sum()
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk_rows=64, softcap=cap, z_loss=z_loss)
    (got * 0.7).backward()
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h.grad, 0.7 * gh, atol=1e-10, rtol=0)
    torch.testing.assert_close(w.grad, 0.7 * gw, atol=1e-10, rtol=0)
    if z_loss:  # the term is not negligible here, so the comparison above really covers it
        assert float(ref.detach() - F.cross_entropy(z.detach(), t, ignore_index=-100)) > 0.5


def test_token_logprobs_and_entropy_are_softcapped_with_gradients_fp64():
    torch.manual_seed(1)
    h = (3 * torch.randn(90, 16, dtype=torch.float64)).requires_grad_()
    w = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (90,))
    logp_all = torch.log_softmax(capped(h @ w.t(), CAP), -1)
    ref_lp, ref_ent = logp_all.gather(1, t[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)
    g1, g2 = torch.randn(90, dtype=torch.float64), torch.randn(90, dtype=torch.float64)
    torch.autograd.backward([ref_lp, ref_ent], [g1, g2])
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lp, ent = token_logprobs(h, w, t, chunk_rows=16, return_entropy=True, softcap=CAP)
    torch.autograd.backward([lp, ent], [g1, g2])
    for got, ref in [(lp, ref_lp), (ent, ref_ent), (h.grad, gh), (w.grad, gw)]:
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def capped_model():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=48,
                      logit_softcap=CAP, qk_norm=True)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # raw logits of several units: capping at 2 matters
    return model


def reference_logits(model, tokens):
    """Soft-capped logits from the hidden states, written out here: [B, T, V] fp64."""
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        return capped(hidden @ model.lm_head.weight.t(), model.cfg.logit_softcap)


def test_every_logits_path_is_softcapped(capped_model):
    model = capped_model
    torch.manual_seed(2)
    x = torch.randint(0, 64, (2, 20))
    y = torch.randint(0, 64, (2, 20))
    ref = reference_logits(model, x)
    with torch.no_grad():
        raw_spread = float((model(x, return_hidden=True) @ model.lm_head.weight.t()).abs().max())
    assert raw_spread > 3 * CAP and float(ref.abs().max()) <= CAP  # capping really changes these logits
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)                                      # logits
        torch.testing.assert_close(model(x, last_only=True), ref[:, -1:])              # generation step
        torch.testing.assert_close(model(x, logits_index=torch.tensor([3, 19])), ref[:, [3, 19]])  # serving
        ref_ce = F.cross_entropy(ref.reshape(-1, 64), y.reshape(-1))
        torch.testing.assert_close(model(x, targets=y), ref_ce)                        # training loss
        ref_lp = torch.log_softmax(ref, -1).gather(2, y[..., None]).squeeze(-1)
        torch.testing.assert_close(model.token_logprobs(x, y), ref_lp)                 # DPO / GRPO / PPO
        torch.testing.assert_close(logit_lens(model, x)[-1], ref)                      # interpretability
    served = prompt_logprobs(model, x[0].tolist(), k=0)[1:]                            # echo + logprobs
    ref_prompt = torch.log_softmax(ref[0, :-1], -1).gather(1, x[0, 1:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([s.logprob for s in served], dtype=torch.float64), ref_prompt)


def test_scoring_uses_capped_logits(capped_model):
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (40,))
    ref = reference_logits(capped_model, ids[None, :-1])[0]
    nll = F.cross_entropy(ref, ids[1:], reduction="sum")
    score = score_tokens(capped_model, ids.numpy(), window=48)
    assert score.tokens == 39
    assert math.isclose(score.nll, float(nll), rel_tol=1e-6)  # the scorer takes CE in fp32


def test_sampling_draws_from_the_capped_distribution(capped_model):
    """generate() with a seed equals sampling by hand from softmax(capped logits) of a full forward
    (lmforge draws by inverse CDF: one uniform u per token, the first token whose cumulative
    probability exceeds u)."""
    prompt = [5, 9, 2]
    got = list(generate(capped_model, prompt, max_new_tokens=8, temperature=1.0, seed=7))
    gen = torch.Generator().manual_seed(7)
    seq = list(prompt)
    for _ in range(8):
        probs = torch.softmax(reference_logits(capped_model, torch.tensor([seq]))[0, -1].double(), -1)
        u = torch.rand(1, generator=gen).item()
        seq.append(int((probs.cumsum(0) <= u * probs.sum()).sum()))
    assert got == seq[len(prompt):]


def test_cached_decoding_equals_full_forward_with_qk_norm_and_cap(capped_model):
    torch.manual_seed(4)
    x = torch.randint(0, 64, (1, 12))
    cache = KVCache(capped_model.cfg, 1, 12, dtype=torch.float64)
    with torch.no_grad():
        steps = [capped_model(x[:, :7], cache=cache)] + [capped_model(x[:, i:i + 1], cache=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), reference_logits(capped_model, x))
