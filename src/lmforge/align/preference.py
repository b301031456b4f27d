"""Preference-optimisation losses (DPO family, KTO, SimPO, ORPO) as pure tensor functions.

Every function takes per-sequence log-probabilities (already reduced over the completion's tokens by
the caller) and returns per-example losses plus the implicit rewards. No model, no loop: the trainer
computes the log-probs (chunked, see the model hooks) and calls these.

Conventions shared by all functions:
- ``*_logps`` are 1-D tensors of shape ``[batch]``; summed over completion tokens unless the method
  says "averaged" (SimPO, ORPO, and the IPO length normalisation that TRL applies).
- Rewards are returned detached: they are for logging and accuracy, never for gradients.
- ``PreferenceLoss.loss`` is the mean over the batch, which is what TRL optimises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses and the implicit rewards of chosen and rejected completions."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def reward_accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose chosen reward is strictly above the rejected one."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()

    @property
    def reward_margin(self) -> torch.Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise LmforgeError(f"beta must be > 0, got {beta}")


def _check_same_shape(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise LmforgeError(f"log-prob tensors must be 1-D with one shape, got {sorted(shapes)}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    r"""Direct Preference Optimisation and its variants.

    With the log-ratios :math:`h_c = \log\pi(y_c|x) - \log\pi_{ref}(y_c|x)` (summed over tokens),
    :math:`h_r` likewise, and :math:`\Delta = h_c - h_r`:

    - ``sigmoid`` (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7),
      with the conservative label smoothing ε of cDPO (Mitchell 2023, "A note on DPO with noisy
      preferences"): :math:`-(1-ε)\log\sigma(\beta\Delta) - ε\log\sigma(-\beta\Delta)`.
      TRL 1.16's ``sigmoid`` has no label smoothing; at ε = 0 the two are identical.
    - ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, eq. 9), ε = flip
      probability in [0, 0.5): :math:`[-(1-ε)\log\sigma(\beta\Delta) + ε\log\sigma(-\beta\Delta)]/(1-2ε)`.
    - ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): :math:`\max(0, 1-\beta\Delta)`.
    - ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm...", arXiv:2310.12036, eq. 17, β = τ):
      :math:`(\bar h_c - \bar h_r - 1/(2\beta))^2`. Convention: like TRL, the log-ratios are divided
      by the completion lengths (``chosen_lengths``/``rejected_lengths``, clamped ≥ 1) — TRL and the
      IPO authors use the length-averaged form. Without lengths, the paper's summed form is used.

    Implicit rewards: :math:`r_c = \beta h_c`, :math:`r_r = \beta h_r` (detached), for all types.
    """
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise LmforgeError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise LmforgeError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise LmforgeError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise LmforgeError("give both chosen_lengths and rejected_lengths, or neither")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        ipo_delta = delta
        if chosen_lengths is not None:  # TRL's (and the IPO authors') per-token form
            ipo_delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2

    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@dataclass(frozen=True)
class KTOLoss:
    """Per-example KTO losses, each example's implicit reward, and the KL baseline z0 used."""

    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_policy_logps: torch.Tensor | None = None,
    kl_ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    r"""Kahneman–Tversky Optimisation (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7–8).

    Unpaired data: each completion is labelled desirable or undesirable. With
    :math:`h = \log\pi(y|x) - \log\pi_{ref}(y|x)` (summed) and the reference point
    :math:`z_0 = \max(0, \mathrm{mean}(\log\pi(y'|x') - \log\pi_{ref}(y'|x')))` estimated on
    mismatched pairs (``kl_*_logps``; detached, as in the paper and TRL; 0 when not given):

    - desirable: :math:`\lambda_D (1 - \sigma(\beta(h - z_0)))`
    - undesirable: :math:`\lambda_U (1 - \sigma(\beta(z_0 - h)))`

    ``loss`` is the mean over all examples (TRL concatenates the two groups and takes the mean; the
    order does not change it). Rewards are :math:`\beta h` (detached).
    """
    _check_same_shape(policy_logps, ref_logps, desirable)
    _check_beta(beta)
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise LmforgeError("give both kl_policy_logps and kl_ref_logps, or neither")
    desirable = desirable.bool()
    logratios = policy_logps - ref_logps
    if kl_policy_logps is None:
        kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
    else:
        kl = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOLoss(losses, beta * logratios.detach(), desirable, kl)


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    r"""SimPO (Meng et al. 2024, "Simple Preference Optimization...", arXiv:2405.14734, eq. 6).

    Reference-free; the log-probs are *averaged* over each completion's tokens:
    :math:`-(1-ε)\log\sigma(\beta(\bar\ell_c - \bar\ell_r) - \gamma) - ε\log\sigma(-\beta(\bar\ell_c - \bar\ell_r) + \gamma)`.
    ``gamma`` is the target reward margin (TRL's ``simpo_gamma``; TRL writes it as
    :math:`\beta(\Delta - \gamma/\beta)`, the same number). Rewards: :math:`\beta\bar\ell` (detached).
    """
    _check_same_shape(policy_chosen_avg_logps, policy_rejected_avg_logps)
    _check_beta(beta)
    if not 0.0 <= label_smoothing <= 1.0:
        raise LmforgeError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    r"""ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", arXiv:2403.07691, eq. 6–7).

    With length-averaged log-probs :math:`\bar\ell` and :math:`\log\mathrm{odds}(y) = \bar\ell - \log(1 - e^{\bar\ell})`,
    the per-pair loss is :math:`-\beta\log\sigma(\log\mathrm{odds}(y_c) - \log\mathrm{odds}(y_r))` (β is the
    paper's λ). The full ORPO objective adds the SFT negative log-likelihood of the chosen tokens
    (a token mean), which the caller owns: ``nll + orpo_loss(...).loss``.
    Convention: TRL casts these log-probs to float32 before this formula; we keep the input dtype.
    Rewards: :math:`\beta\bar\ell` (detached).
    """
    _check_same_shape(policy_chosen_avg_logps, policy_rejected_avg_logps)
    _check_beta(beta)
    if bool((policy_chosen_avg_logps >= 0).any() or (policy_rejected_avg_logps >= 0).any()):
        raise LmforgeError("ORPO needs average log-probs < 0 (a probability of 1 has infinite odds)")
    log_odds = (policy_chosen_avg_logps - policy_rejected_avg_logps) - (
        log1mexp(policy_chosen_avg_logps) - log1mexp(policy_rejected_avg_logps)
    )
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach())
