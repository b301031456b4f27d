"""RL maths against closed forms worked by hand (TRL 1.16 no longer ships PPO), plus properties.

Every expected number below is written out from the formula in the comment next to it, not taken
from running the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.rl import (
    AdaptiveKLController,
    aggregate,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalised_rewards,
    mask_truncated,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from lmforge.errors import LmforgeError

D = torch.float64


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


# ----------------------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    # gamma = 0.9, lambda = 0.8, so gamma * lambda = 0.72; the episode terminates after step 2 (V_3 = 0).
    # delta_2 = 1 + 0.9*0   - 0.7 = 0.3      A_2 = 0.3
    # delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03     A_1 = 0.03 + 0.72*0.3   = 0.246
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04     A_0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(ret, t([0.71712, 0.846, 1.0]))  # returns = A + V


def test_gae_truncated_row_bootstraps_from_the_cut_state():
    # Same episode, cut by the length limit in a state worth V = 0.4:
    # delta_2 = 1 + 0.9*0.4 - 0.7 = 0.66; A_1 = 0.03 + 0.72*0.66 = 0.5052; A_0 = 0.04 + 0.72*0.5052 = 0.403744
    adv, _ = gae(
        t([0, 0, 1]),
        t([0.5, 0.6, 0.7]),
        torch.ones(1, 3),
        gamma=0.9,
        lam=0.8,
        bootstrap_values=t(0.4),
        terminated=torch.tensor([False]),
    )
    torch.testing.assert_close(adv, t([0.403744, 0.5052, 0.66]))
    # A terminated row ignores its bootstrap value.
    adv_term, _ = gae(
        t([0, 0, 1]),
        t([0.5, 0.6, 0.7]),
        torch.ones(1, 3),
        gamma=0.9,
        lam=0.8,
        bootstrap_values=t(0.4),
        terminated=torch.tensor([True]),
    )
    torch.testing.assert_close(adv_term, t([0.21712, 0.246, 0.3]))


def test_gae_right_padding_is_ignored():
    # Row 2 has two tokens then padding whose reward/value (99) must not leak in:
    # delta_1 = 2 - 1 = 1, A_1 = 1; delta_0 = 0 + 0.9*1 - 1 = -0.1, A_0 = -0.1 + 0.72*1 = 0.62
    rewards = t([0, 0, 1], [0, 2, 99])
    values = t([0.5, 0.6, 0.7], [1, 1, 99])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]))
    torch.testing.assert_close(ret, t([0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]))


def test_gae_limits_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=gen, dtype=D), torch.randn(4, 6, generator=gen, dtype=D)
    mask = torch.ones(4, 6)
    gamma = 0.95
    adv1, _ = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    discounted = torch.stack([sum(gamma**k * rewards[:, s + k] for k in range(6 - s)) for s in range(6)], dim=1)
    torch.testing.assert_close(adv1, discounted - values)
    adv0, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1, dtype=D)], dim=1)
    torch.testing.assert_close(adv0, rewards + gamma * next_values - values)


def test_gae_truncated_without_bootstrap_is_a_user_error():
    with pytest.raises(LmforgeError, match="bootstrap"):
        gae(t([1.0]), t([0.0]), torch.ones(1, 1), terminated=torch.tensor([False]))


# ----------------------------------------------------------------------------- PPO losses


def test_ppo_policy_loss_by_hand():
    # ratios e^0.1, e^-0.5, e^0.3, 1 with advantages 1, -1, -2, 0.5 and eps = 0.2:
    #  token 0: r = 1.105 inside [0.8, 1.2]          -> -1 * 1.105
    #  token 1: r = 0.607 < 0.8, A < 0: clip active  -> max(0.607, 0.8) = 0.8
    #  token 2: r = 1.350 > 1.2 but A < 0: pessimism keeps the unclipped 2 * 1.350
    #  token 3: r = 1                                 -> -0.5
    old = torch.zeros(1, 4, dtype=D)
    logprobs = t([0.1, -0.5, 0.3, 0.0]).requires_grad_()
    adv = t([1.0, -1.0, -2.0, 0.5])
    out = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 4), clip_eps=0.2)
    expected = (-math.exp(0.1) + 0.8 + 2 * math.exp(0.3) - 0.5) / 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.clip_fraction.item() == pytest.approx(0.25)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    # d/dlogp of -A r = -A r; the clipped token gets no gradient.
    torch.testing.assert_close(grad, t([-math.exp(0.1), 0.0, 2 * math.exp(0.3), -0.5]) / 4)


def test_ppo_value_loss_by_hand():
    # c = 0.2. token 0: V = 1, V_old = 0.5 -> V_clip = 0.7; (1-2)^2 = 1 < (0.7-2)^2 = 1.69 (clip active)
    #          token 1: V = 0, V_old = 0.5 -> V_clip = 0.3; (0-0.6)^2 = 0.36 > (0.3-0.6)^2 = 0.09
    out = ppo_value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.6]), torch.ones(1, 2), clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_ppo_clip_fraction_counts_only_masked_tokens():
    old = torch.zeros(1, 4, dtype=D)
    logprobs = t([1.0, 1.0, 0.0, 1.0])  # ratio e > 1.2 on three tokens, A > 0: clipped
    out = ppo_policy_loss(logprobs, old, torch.ones(1, 4, dtype=D), torch.tensor([[1, 1, 1, 0]]))
    assert out.clip_fraction.item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_closed_form():
    # log r = ref - logp = -1.5 - (-1) = -0.5
    logp, ref = t(-1.0), t(-1.5)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)


def test_k3_is_nonnegative():
    gen = torch.Generator().manual_seed(1)
    logp, ref = 5 * torch.randn(10_000, generator=gen, dtype=D), 5 * torch.randn(10_000, generator=gen, dtype=D)
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())
    assert bool((kl_estimate(logp, ref, "k1") < 0).any())  # k1 is not: the contrast that makes the check meaningful


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_by_monte_carlo(kind):
    policy = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=D)
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=D)
    true_kl = (policy * (policy.log() - ref.log())).sum().item()
    gen = torch.Generator().manual_seed(2)
    samples = torch.multinomial(policy, 200_000, replacement=True, generator=gen)
    estimates = kl_estimate(policy.log()[samples], ref.log()[samples], kind)
    stderr = estimates.std().item() / math.sqrt(samples.numel())
    assert abs(estimates.mean().item() - true_kl) < 4 * stderr
    # k2 is biased for this pair (its mean is off by many standard errors): the test can tell.
    k2 = kl_estimate(policy.log()[samples], ref.log()[samples], "k2")
    assert abs(k2.mean().item() - true_kl) > 4 * k2.std().item() / math.sqrt(samples.numel())


def test_adaptive_kl_controller_ziegler_update():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error clipped at +0.2
    value = ctl.value
    assert ctl.update(6.0, 256) == pytest.approx(value)  # on target: unchanged
    assert ctl.update(5.4, 256) == pytest.approx(value * (1 - 0.1 * 256 / 10_000))  # error -0.1


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    logp = t([-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0])
    ref = t([-1.5, -1.0, -1.0], [-1.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(t(3.0, 5.0), logp, ref, mask, kl_coef=0.1, kind="k1")
    torch.testing.assert_close(kl, t([0.5, 0.0, 0.0], [0.0, -1.0, 0.0]))
    torch.testing.assert_close(rewards, t([-0.05, 0.0, 3.0], [0.0, 0.1 + 5.0, 0.0]))


def test_whiten_closed_form_and_mask():
    x = t(1.0, 2.0, 3.0, 4.0, 100.0)
    mask = torch.tensor([1, 1, 1, 1, 0])
    out = whiten(x, mask)
    expected = (t(1.0, 2.0, 3.0, 4.0) - 2.5) / math.sqrt(5 / 3 + 1e-8)  # Bessel variance of 1..4 is 5/3
    torch.testing.assert_close(out[:4], expected)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[:4], expected + 2.5)


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages_three_scalings():
    rewards = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    # group 1: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2: constant (zero variance)
    group = group_advantages(rewards, 4, scale="group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(group.advantages, t(a, -a, -a, a, 0.0, 0.0, 0.0, 0.0))
    assert group.zero_variance.tolist() == [False, True]
    assert group.zero_variance_fraction.item() == 0.5
    # batch: centred on the group mean, divided by the std of all 8 (mean 0.75, var (6/16 + 2*9/16)/7 = 1.5/7)
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="batch").advantages, t(b, -b, -b, b, 0.0, 0.0, 0.0, 0.0)
    )
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="none").advantages, t(0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0)
    )


def test_group_advantages_reject_partial_groups():
    with pytest.raises(LmforgeError, match="whole groups"):
        group_advantages(t(1.0, 2.0, 3.0), 2)


def test_three_aggregations_by_hand():
    loss = t([1.0, 2.0, 3.0, 7.0], [4.0, 9.0, 9.0, 9.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(loss, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # per sequence, then mean
    assert aggregate(loss, mask, "dr_grpo").item() == pytest.approx(10 / (2 * 4))  # sum / (B * L_max)
    assert aggregate(loss, mask, "dr_grpo", max_len=10).item() == pytest.approx(10 / (2 * 10))
    assert aggregate(loss, mask, "dapo").item() == pytest.approx(10 / 4)  # token mean over the batch


def test_truncated_completions_are_masked_out():
    loss = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = torch.ones(2, 3)
    masked = mask_truncated(mask, torch.tensor([False, True]))
    assert masked.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert aggregate(loss, masked, "dapo").item() == pytest.approx(2.0)
    assert aggregate(loss, masked, "grpo").item() == pytest.approx(1.0)  # the empty row counts as 0 in the mean


def test_grpo_loss_on_policy_is_minus_advantage_plus_beta_k3():
    logp = t([-1.0, -2.0], [-0.5, -0.5]).requires_grad_()
    ref = t([-1.5, -2.0], [-0.5, -1.0])
    adv = t(1.0, -2.0)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logp, logp.detach(), adv, mask, ref_logprobs=ref, beta=0.1, aggregation="dapo")
    k3 = [math.exp(-0.5) - 1 + 0.5, 0.0, 0.0]  # on the three valid tokens
    expected = (-1.0 - 1.0 + 2.0 + 0.1 * sum(k3)) / 3
    assert out.loss.item() == pytest.approx(expected)
    assert out.kl.item() == pytest.approx(sum(k3) / 3)
    (grad,) = torch.autograd.grad(out.loss, logp)
    # d/dlogp: -A (ratio 1) + beta * (1 - exp(ref - logp))
    torch.testing.assert_close(grad, t([-1.0 + 0.1 * (1 - math.exp(-0.5)), -1.0], [2.0, 0.0]) / 3)


def test_grpo_clip_higher():
    old = torch.zeros(1, 1, dtype=D)
    logp = t([math.log(1.25)])
    adv, mask = t(1.0), torch.ones(1, 1)
    symmetric = grpo_loss(logp, old, adv, mask, eps_low=0.2)
    assert symmetric.loss.item() == pytest.approx(-1.2)  # clipped at 1 + 0.2
    assert symmetric.clip_high_fraction.item() == 1.0
    higher = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert higher.loss.item() == pytest.approx(-1.25)  # inside 1 + 0.28: not clipped
    assert higher.clip_high_fraction.item() == 0.0
    low = grpo_loss(t([math.log(0.75)]), old, t(-1.0), mask, eps_low=0.2, eps_high=0.28)
    assert low.loss.item() == pytest.approx(0.8)  # -min(-0.75, -0.8): the low side still clips at 0.2
    assert low.clip_low_fraction.item() == 1.0


def test_grpo_beta_without_reference_is_a_user_error():
    with pytest.raises(LmforgeError, match="reference"):
        grpo_loss(t([0.0]), t([0.0]), t(1.0), torch.ones(1, 1), beta=0.1)
