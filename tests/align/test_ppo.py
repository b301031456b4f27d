"""PPO: one forward gives log-probs equal to a plain full forward and values from the value head on
the same hidden states (gradients reach the head and the trunk); a rollout's advantages and returns
equal GAE on KL-penalised rewards recomputed from full logits; the loss equals rl.py's clipped losses;
a tiny model's reward rises under PPO and a shuffled-reward control's does not; the reference stays
the starting model (frozen copy, or LoRA adapters off); stop + --resume between the PPO epochs of a
rollout equals a straight run; the CLI runs the tiny recipe."""
import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.ppo import PPOConfig, PPOObjective, PPORecipe, finetune_ppo, policy_forward
from lmforge.align.rl import gae, kl_penalised_rewards, ppo_policy_loss, ppo_value_loss, whiten
from lmforge.align.tasks import Task, arithmetic_tasks
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, save
from lmforge.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [f"{t.prompt} {t.answer}" for t in arithmetic_tasks(400, 0)]
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def tiny(tok, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                   hidden_dim=96, max_seq_len=64)).to(dtype)


def digit_share(text: str, task: Task) -> float:
    """A dense verifiable reward a random tiny model can climb: the share of digit characters."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def plain_logprobs(model, tokens, prompt_len, n):
    ids = tokens[:prompt_len + n][None]
    logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    return logp[torch.arange(prompt_len - 1, prompt_len + n - 1), ids[0, prompt_len:]]


def full_forward(model, tokens, prompt_len, n):
    """Reference: the row alone, full logits, log_softmax, gathered at its n completion tokens; and
    the value head on the final hidden states at the positions before each completion token."""
    ids = tokens[:prompt_len + n][None]
    pos = torch.arange(prompt_len - 1, prompt_len + n - 1)
    hidden = model(ids[:, :-1], return_hidden=True)[0]
    return plain_logprobs(model, tokens, prompt_len, n), model.value_head(hidden).squeeze(-1)[pos]


def objective(tok, cfg, reward_fn=digit_share, ref=None, n_prompts=4, grad_accum=1, tasks=None):
    obj = PPOObjective(tok, tasks or arithmetic_tasks(32, 0), [], cfg, n_prompts, tok.eos_id, grad_accum,
                       reward_fn=reward_fn, reference=(lambda device: ref) if ref is not None else None)
    return obj, obj.batches(n_prompts, seed=1)


def test_one_forward_gives_full_forward_logprobs_and_value_head_values_with_gradients(tok):
    model = tiny(tok, dtype=torch.float64)
    obj, loader = objective(tok, PPOConfig(max_tokens=5), ref=copy.deepcopy(model))
    model = obj.prepare_model(model)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 1.0)  # zero-initialised: make the values non-trivial
    r = obj.rollout(model, 0, 1)
    lp, ent, values = policy_forward(model, r["tokens"], r["prompt_lens"], r["mask"])
    lens = r["mask"].sum(1).long()
    for i in range(len(lens)):
        p, n = int(r["prompt_lens"][i]), int(lens[i])
        exp_lp, exp_v = full_forward(model, r["tokens"][i], p, n)
        torch.testing.assert_close(lp[i, :n], exp_lp, rtol=0, atol=1e-10)
        torch.testing.assert_close(values[i, :n], exp_v, rtol=0, atol=1e-10)
        assert lp[i, n:].abs().sum() == 0 and values[i, n:].abs().sum() == 0
    (values.sum() + lp.sum()).backward()
    assert model.value_head.weight.grad.abs().sum() > 0 and model.value_head.bias.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0  # the trunk gets gradients too


@pytest.mark.parametrize("kl_estimator,whiten_rewards", [("k1", True), ("k3", False)])
def test_rollout_advantages_and_loss_equal_the_rl_formulas_on_full_logits(tok, kl_estimator, whiten_rewards):
    torch.manual_seed(0)
    model = tiny(tok, dtype=torch.float64)
    reference = tiny(tok, seed=1, dtype=torch.float64)
    cfg = PPOConfig(max_tokens=5, beta=0.3, kl_estimator=kl_estimator, whiten_rewards=whiten_rewards, lam=0.9,
                    gamma=0.97, clip_eps=0.1, value_clip=0.05, vf_coef=0.5)
    obj, loader = objective(tok, cfg, ref=reference)
    model = obj.prepare_model(model)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 1.0)
    r = obj.rollout(model, 0, 1)
    m = r["mask"]
    lens = m.sum(1).long()
    old_lp, old_v, ref_lp = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    for i in range(len(lens)):
        p, n = int(r["prompt_lens"][i]), int(lens[i])
        old_lp[i, :n], old_v[i, :n] = full_forward(model, r["tokens"][i], p, n)
        ref_lp[i, :n] = plain_logprobs(reference, r["tokens"][i], p, n)
    texts = [tok.decode([t for t in r["tokens"][i, int(r["prompt_lens"][i]):int(r["prompt_lens"][i]) + int(lens[i])]
                         .tolist() if t != tok.eos_id]) for i in range(len(lens))]
    scores = torch.tensor([digit_share(t, None) for t in texts], dtype=torch.float64)
    torch.testing.assert_close(r["scores"], scores)
    rewards, kl = kl_penalised_rewards(scores, old_lp, ref_lp, m, kl_coef=0.3, kind=kl_estimator)
    if whiten_rewards:
        rewards = whiten(rewards, m, shift_mean=False) * m
    adv, ret = gae(rewards, old_v, m, gamma=0.97, lam=0.9)
    adv = whiten(adv, m) * m
    for name, expected in (("old_logprobs", old_lp), ("old_values", old_v), ("advantages", adv), ("returns", ret),
                           ("kl", kl.sum(1))):
        torch.testing.assert_close(r[name], expected, rtol=0, atol=1e-9, msg=name)
    assert r["kl"].abs().sum() > 0

    # the loss at a later epoch (weights moved) equals rl.py's clipped losses on full-forward figures
    loader.rollouts[0] = r
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, metrics = obj.loss(model, {"counter": torch.tensor(1), "seed": torch.tensor(1)})  # epoch 1 of rollout 0
    rows_lp, rows_v = [], []
    for i in range(len(lens)):
        a, b = full_forward(model, r["tokens"][i], int(r["prompt_lens"][i]), int(lens[i]))
        rows_lp.append(F.pad(a, (0, m.shape[1] - a.numel())))
        rows_v.append(F.pad(b, (0, m.shape[1] - b.numel())))
    new_lp, new_v = torch.stack(rows_lp), torch.stack(rows_v)
    pol = ppo_policy_loss(new_lp, r["old_logprobs"], r["advantages"], m, clip_eps=0.1)
    val = ppo_value_loss(new_v, r["old_values"], r["returns"], m, clip_range=0.05)
    expected = pol.loss + 0.5 * val.loss
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    g = torch.autograd.grad(loss, [model.lm_head.weight, model.value_head.weight])
    g_ref = torch.autograd.grad(expected, [model.lm_head.weight, model.value_head.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(float(pol.clip_fraction)) and metrics["clip_fraction"] > 0
    assert metrics["value_loss"] == pytest.approx(float(val.loss.detach()))
    assert metrics["response_length"] == pytest.approx(float(lens.double().mean()))
