"""Bradley–Terry reward-model loss as a pure tensor function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class RewardModelLoss:
    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardModelLoss:
    r"""Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, arXiv:2203.02155, eq. 1).

    :math:`\mathcal L = -\mathrm{mean}\,\log\sigma(r_c - r_r - m) + c\cdot\mathrm{mean}\,(r_c + r_r)^2`

    - ``margin`` m: per-pair margin (Llama 2, Touvron et al. 2023, arXiv:2307.09288, eq. 2); 0 if absent.
    - ``center_rewards_coefficient`` c: pushes rewards towards zero mean (Eisenstein et al. 2023,
      arXiv:2312.09244), exactly as TRL's ``RewardTrainer`` adds it.

    ``accuracy`` is the fraction with :math:`r_c > r_r`; ``margin`` the mean :math:`r_c - r_r` (both detached).
    """
    if rewards_chosen.shape != rewards_rejected.shape or rewards_chosen.dim() != 1:
        raise LmforgeError(
            f"rewards must be 1-D with one shape, got {tuple(rewards_chosen.shape)} and {tuple(rewards_rejected.shape)}"
        )
    if margin is not None and margin.shape != rewards_chosen.shape:
        raise LmforgeError(f"margin must have shape {tuple(rewards_chosen.shape)}, got {tuple(margin.shape)}")
    diff = rewards_chosen - rewards_rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    diff = diff.detach()
    return RewardModelLoss(loss, (diff > 0).float().mean(), diff.mean())
