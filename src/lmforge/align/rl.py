"""RL maths for PPO and GRPO as pure tensor functions: GAE, clipped losses, KL estimators, advantages.

Shapes: per-token tensors are ``[batch, time]`` with a 0/1 ``mask`` marking completion tokens
(right-padded: a row's valid tokens come first). Per-sequence tensors are ``[batch]``.
Log-probs are of the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def _check_mask(mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    for t in tensors:
        if t.shape != mask.shape:
            raise LmforgeError(
                f"per-token tensors must match the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}"
            )
    return mask.to(tensors[0].dtype if tensors else torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- GAE


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_values: torch.Tensor | None = None,
    terminated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    :math:`\delta_t = r_t + \gamma V_{t+1} - V_t`, :math:`A_t = \delta_t + \gamma\lambda A_{t+1}`,
    returns :math:`R_t = A_t + V_t`.

    After a row's last valid token the episode either *terminated* (an EOS: :math:`V_{T}=0`, the
    default) or was *truncated* by the length limit, in which case the value of the state it was cut
    in, ``bootstrap_values[b]``, stands in for :math:`V_T`. Padding positions get advantage and
    return 0. Returns ``(advantages, returns)``, both detached.
    """
    mask = _check_mask(mask, rewards, values)
    batch, steps = rewards.shape
    rewards, values = rewards.detach(), values.detach()
    if terminated is None:
        terminated = torch.ones(batch, dtype=torch.bool, device=rewards.device)
    if bootstrap_values is None:
        if not bool(terminated.all()):
            raise LmforgeError("truncated rows need bootstrap_values (the value of the state they were cut in)")
        bootstrap_values = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    end_value = torch.where(terminated.bool(), torch.zeros_like(bootstrap_values), bootstrap_values.detach())

    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        next_valid = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = next_valid * values[:, t + 1 if t + 1 < steps else t] + (1 - next_valid) * end_value
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_valid * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    r"""Normalise to unit variance (and zero mean unless ``shift_mean=False``) over masked positions.

    :math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` with the Bessel-corrected variance, as in the PPO
    implementations of Ziegler et al. 2019 and TRL's ``masked_whiten``. Used for reward whitening
    and advantage whitening; padding positions come back unchanged in value but meaningless.
    """
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    count = mask.sum()
    if count < 2:
        raise LmforgeError("whitening needs at least two values")
    mean = (x * mask).sum() / count
    var = (((x - mean) ** 2) * mask).sum() / (count - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


# ----------------------------------------------------------------------------- KL


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    r"""Per-token estimators of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating
    KL Divergence", joschu.net/blog/kl-approx.html).

    With :math:`\log r = \log\pi_{ref}(x) - \log\pi(x)`:
    ``k1`` = :math:`-\log r` (unbiased, high variance, can be negative);
    ``k2`` = :math:`\tfrac12(\log r)^2` (biased, low variance);
    ``k3`` = :math:`(r - 1) - \log r` (unbiased, always ≥ 0).
    """
    if kind not in KL_ESTIMATORS:
        raise LmforgeError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    return torch.expm1(log_r) - log_r


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float = 0.1):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    r"""Proportional controller on β towards a target KL (Ziegler et al. 2019, arXiv:1909.08593, §2.2).

    :math:`e = \mathrm{clip}(\mathrm{KL}/\mathrm{target} - 1, -0.2, 0.2)`,
    :math:`\beta \leftarrow \beta(1 + e\cdot n_{steps}/\mathrm{horizon})`.
    """

    def __init__(self, init_kl_coef: float = 0.1, target: float = 6.0, horizon: int = 10000):
        if target <= 0 or horizon <= 0:
            raise LmforgeError("adaptive KL needs target > 0 and horizon > 0")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_penalised_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token PPO rewards: :math:`r_t = -\beta\,\mathrm{KL}_t`, plus the sequence score on its last
    valid token (Ziegler et al. 2019; Ouyang et al. 2022). Returns ``(rewards, per_token_kl)``."""
    mask = _check_mask(mask, logprobs, ref_logprobs)
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), kind) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(-1).long()
    if bool((lengths == 0).any()):
        raise LmforgeError("every row needs at least one completion token to carry its score")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += scores.detach().to(rewards.dtype)
    return rewards, kl


# ----------------------------------------------------------------------------- PPO


@dataclass(frozen=True)
class ClippedLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> ClippedLoss:
    r"""PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), token mean over the mask.

    :math:`\rho = e^{\log\pi - \log\pi_{old}}`,
    :math:`\mathcal L = \mathrm{mean}\,\max(-A\rho, -A\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon))`.
    ``clip_fraction`` is the share of tokens where the clipped term is the larger (i.e. active).
    """
    mask = _check_mask(mask, logprobs, old_logprobs, advantages)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return ClippedLoss(loss, masked_mean((clipped > unclipped).to(mask.dtype), mask).detach())


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> ClippedLoss:
    r"""Clipped value loss (the PPO2 baselines form, used by Ziegler et al. 2019 and TRL's old PPO):

    :math:`V^{clip} = V_{old} + \mathrm{clip}(V - V_{old}, -c, c)`,
    :math:`\mathcal L = \tfrac12\,\mathrm{mean}\,\max((V - R)^2, (V^{clip} - R)^2)`.
    """
    mask = _check_mask(mask, values, old_values, returns)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return ClippedLoss(loss, masked_mean((clipped_err > unclipped_err).to(mask.dtype), mask).detach())


# ----------------------------------------------------------------------------- GRPO


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # [n] one per completion
    zero_variance: torch.Tensor  # [n_groups] bool: every completion in the group got the same reward

    @property
    def zero_variance_fraction(self) -> torch.Tensor:
        return self.zero_variance.float().mean()


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> GroupAdvantages:
    r"""GRPO advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2).

    ``rewards`` is ``[n_groups * group_size]`` with each group's completions adjacent.
    :math:`A_i = (r_i - \bar r_{g})/(s + \epsilon)` where :math:`s` is the group's (Bessel) std
    (``group``, the paper), the whole batch's std (``batch``, Liu et al. 2025 "Understanding R1-Zero-like
    training" / TRL's ``scale_rewards="batch"``), or no division (``none``, Dr. GRPO).
    A group whose rewards are all equal gets all-zero advantages and no learning signal: it is
    counted in ``zero_variance`` (DAPO, Yu et al. 2025, arXiv:2503.14476, filters such groups).
    """
    if scale not in ADVANTAGE_SCALES:
        raise LmforgeError(f"unknown advantage scale {scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}")
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise LmforgeError(f"need 1-D rewards in whole groups of size >= 2, got {tuple(rewards.shape)} / {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    group_std = grouped.std(dim=1)
    if scale == "group":
        centred = centred / (group_std.repeat_interleave(group_size) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    return GroupAdvantages(centred, zero_variance)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the whole loss mask of completions cut by the length limit (no EOS), as DAPO recommends:
    their reward judges text that never finished, so they should not teach the policy."""
    if truncated.shape != mask.shape[:1]:
        raise LmforgeError(f"truncated must have shape {tuple(mask.shape[:1])}, got {tuple(truncated.shape)}")
    return mask * (~truncated.bool()).unsqueeze(1).to(mask.dtype)


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, kind: str = "grpo", *, max_len: int | None = None
) -> torch.Tensor:
    r"""Reduce a ``[batch, time]`` per-token loss to a scalar.

    - ``grpo`` (Shao et al. 2024): mean over each sequence's tokens, then mean over sequences.
    - ``dr_grpo`` (Liu et al. 2025, arXiv:2503.20783): :math:`\sum_{b,t} \ell\,m / (B \cdot L_{max})`
      with a constant :math:`L_{max}` (the generation limit; default the tensor's time size),
      which removes the length bias of per-sequence means.
    - ``dapo`` (Yu et al. 2025, arXiv:2503.14476): token-level mean over the whole batch.
    """
    if kind not in AGGREGATIONS:
        raise LmforgeError(f"unknown aggregation {kind!r}; expected one of {', '.join(AGGREGATIONS)}")
    mask = _check_mask(mask, per_token_loss)
    masked = per_token_loss * mask
    if kind == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if kind == "dr_grpo":
        length = per_token_loss.shape[1] if max_len is None else max_len
        if length < per_token_loss.shape[1]:
            raise LmforgeError(f"max_len {length} is shorter than the completions ({per_token_loss.shape[1]})")
        return masked.sum() / (per_token_loss.shape[0] * length)
    return masked.sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class GRPOLoss:
    loss: torch.Tensor
    kl: torch.Tensor  # token mean of the k3 estimate (0 when beta = 0 and no reference given)
    clip_low_fraction: torch.Tensor  # ratio < 1 - eps_low with A < 0
    clip_high_fraction: torch.Tensor  # ratio > 1 + eps_high with A > 0


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: str = "grpo",
    max_len: int | None = None,
) -> GRPOLoss:
    r"""GRPO objective per token, then :func:`aggregate`.

    :math:`\ell_t = -\min(\rho_t A, \mathrm{clip}(\rho_t, 1-\epsilon_{low}, 1+\epsilon_{high}) A) + \beta\,k3_t`
    with one advantage per sequence (``advantages`` is ``[batch]``). ``eps_high`` > ``eps_low`` is
    DAPO's clip-higher (default: symmetric). The KL term is k3 to the reference (Shao et al. 2024, eq. 4).
    """
    mask = _check_mask(mask, logprobs, old_logprobs)
    if advantages.shape != logprobs.shape[:1]:
        raise LmforgeError(f"advantages must be one per sequence, shape {tuple(logprobs.shape[:1])}")
    if beta != 0.0 and ref_logprobs is None:
        raise LmforgeError("beta > 0 needs the reference model's log-probs")
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
        kl_mean = masked_mean(kl.detach(), mask)
    else:
        kl_mean = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    ratio = ratio.detach()
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    return GRPOLoss(
        aggregate(per_token, mask, aggregation, max_len=max_len),
        kl_mean,
        masked_mean(low, mask),
        masked_mean(high, mask),
    )
