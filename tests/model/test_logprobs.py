"""Chunked per-token log-probs equal log_softmax(full logits).gather, with gradients; and they
equal transformers' Llama on converted weights."""
import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.logprobs import token_logprobs


def reference(h, w, t):
    """The plain path: full logits, log_softmax, gather; -100 -> 0; entropy of each row."""
    logp_all = torch.log_softmax(h @ w.t(), dim=-1)
    valid = t != -100
    logp = logp_all.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_values_and_gradients_match_plain_log_softmax_in_fp64(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(150, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(70, 24, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 70, (150,))
    t[::5] = -100
    g_logp, g_ent = torch.randn(150, dtype=torch.float64), torch.randn(150, dtype=torch.float64)

    ref_logp, ref_ent = reference(h, w, t)
    torch.autograd.backward([ref_logp, ref_ent], [g_logp, g_ent])
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    logp, ent = token_logprobs(h, w, t, chunk_rows=chunk_rows, return_entropy=True)
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    assert logp.dtype == torch.float64 and logp.shape == (150,)
    assert bool((logp[::5] == 0).all()) and bool((ent[::5] == 0).all())
    for got, ref in [(logp, ref_logp), (ent, ref_ent), (h.grad, ref_gh), (w.grad, ref_gw)]:
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)

    # log-probs alone (no entropy output) take the same gradient path
    h.grad = w.grad = None
    ref_logp, _ = reference(h, w, t)
    (ref_logp * g_logp).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (token_logprobs(h, w, t, chunk_rows=chunk_rows) * g_logp).sum().backward()
    torch.testing.assert_close(h.grad, ref_gh, atol=1e-10, rtol=0)
    torch.testing.assert_close(w.grad, ref_gw, atol=1e-10, rtol=0)


def test_frozen_head_gets_no_gradient_and_bf16_returns_fp32():
    torch.manual_seed(0)
    h = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.bfloat16)  # frozen (e.g. a LoRA base head)
    t = torch.randint(0, 300, (40,))
    logp = token_logprobs(h, w, t, chunk_rows=16)
    assert logp.dtype == torch.float32
    ref, _ = reference((h @ w.t()).float(), torch.eye(300), t)  # bf16 logits, fp32 log-softmax
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    logp.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and w.grad is None


def test_model_token_logprobs_equal_full_logits_and_share_the_hidden_forward():
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    x = torch.randint(0, 97, (3, 17))
    targets = x[:, 1:].clone()
    targets[0, :4] = -100
    logits = model(x[:, :-1])
    ref, ref_ent = reference(logits.reshape(-1, 97), torch.eye(97, dtype=torch.float64), targets.reshape(-1))
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp, ent = model.token_logprobs(x[:, :-1], targets, return_entropy=True, chunk_rows=5)
    logp.sum().backward()
    assert logp.shape == (3, 16)
    torch.testing.assert_close(logp, ref.view(3, 16), atol=1e-10, rtol=0)
    torch.testing.assert_close(ent, ref_ent.view(3, 16), atol=1e-10, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-10, rtol=0, msg=n)
    # return_hidden gives the final-norm states whose head projection is exactly the logits
    hidden = model(x[:, :-1], return_hidden=True)
    assert hidden.shape == (3, 16, 32)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=0, rtol=0)


def test_logprobs_match_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model import load

    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load(tmp_path / "hf")
    tokens = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        ref = torch.log_softmax(hf(tokens).logits[:, :-1].float(), -1).gather(2, tokens[:, 1:, None]).squeeze(2)
        got = ours.token_logprobs(tokens[:, :-1], tokens[:, 1:], chunk_rows=8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_backward_recomputes_under_the_forward_autocast_state():
    """Under bf16 autocast the returned log-probs come from bf16 logits; backward must recompute
    those same logits (not fp32 ones), so the hidden gradient equals the plain autocast path's."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(500, 32, requires_grad=True)
    t, g = torch.randint(0, 500, (64,)), torch.randn(64)
    with torch.autocast("cpu", torch.bfloat16):
        ref = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    (ref * g).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        got = token_logprobs(h, w, t, chunk_rows=16)
    (got * g).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (h.grad - ref_gh).norm() / ref_gh.norm() < 1e-3  # 7e-3 if recomputed in fp32
    assert (w.grad - ref_gw).norm() / ref_gw.norm() < 5e-3  # ours accumulates the head gradient in fp32
