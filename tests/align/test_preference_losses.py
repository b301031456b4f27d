"""Preference and reward-model losses equal TRL 1.16's, values and gradients, in float64 (≤ 1e-6).

TRL's losses live inside trainer methods. We call them unbound, with a `SimpleNamespace` standing in
for the trainer (only the attributes each method reads) and a fake model that returns chosen
per-token log-probs the way TRL's fused LM head does (zero where the label is -100). Gradients are
taken with respect to those per-token log-probs (or the rewards / averaged log-probs fed in), so the
whole chain — masking, summing, the loss — is compared, not just the last formula.

Convention differences checked here:
- IPO: TRL divides each log-ratio by its completion length; we do the same when given lengths.
- DPO sigmoid with label smoothing (cDPO): TRL 1.16's DPO `sigmoid` has no smoothing, so the smoothed
  form is checked against TRL's CPO `sigmoid` loss fed the log-ratios (the same formula there).
- ORPO: TRL casts the averaged log-probs to float32 inside the loss; its figures therefore carry
  float32 rounding, and the comparison is at 1e-6 against that. TRL's full ORPO loss also adds an
  NLL over prompt + completion tokens; our DPO command's ORPO adds it over the completion only.
- SimPO: TRL 1.16 keeps it in `trl.experimental.cpo.CPOTrainer` (`loss_type="simpo"`); with
  `cpo_alpha > 0` CPO adds an NLL term (CPO-SimPO), so the parity is with `cpo_alpha = 0`.
- KTO: TRL's z0 is the mean over the (gathered) batch; ours over the rows given, i.e. a micro-batch.
"""

from __future__ import annotations

from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from lmforge.align.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss
from lmforge.align.reward import bradley_terry_loss

TOL = 1e-6
SEQ = 9  # tokens per row (prompt + completion + right padding)


@pytest.fixture(scope="module")
def trl():
    """Import TRL (and transformers behind it) once for the module. TRL is in the dev extra: a missing
    import fails the test rather than skipping it."""
    import warnings

    import trl

    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    assert trl.__version__.startswith("1.16"), (
        f"these parity checks were written against TRL 1.16, got {trl.__version__}"
    )
    return SimpleNamespace(
        DPO=trl.DPOTrainer,
        KTO=trl.KTOTrainer,
        Reward=trl.RewardTrainer,
        CPO=CPOTrainer,
        ORPO=ORPOTrainer,
        GRPO=trl.GRPOTrainer,
    )


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def reduce(x, reduction):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def _trainer(**attrs) -> SimpleNamespace:
    """The attributes TRL's loss methods read from `self`, for a single-process training step."""
    base = {
        "model": SimpleNamespace(training=True),
        "accelerator": _Accelerator(),
        "aux_loss_enabled": False,
        "_metrics": defaultdict(lambda: defaultdict(list)),
        "_total_train_tokens": 0,
        "_tp_size": 1,
        "args": SimpleNamespace(),
    }
    base.update(attrs)
    return SimpleNamespace(**base)


class _FusedHeadModel:
    """Returns fixed per-token log-probs for each `input_ids` tensor, zeroed where labels are -100
    (TRL's fused LM head output contract: `log_probs[:, t]` scores token t + 1)."""

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def __call__(self, input_ids, labels, fused_lm_head, **_):
        assert fused_lm_head
        log_probs = self.table[input_ids.data_ptr()] * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _completion_mask(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of [prompt (1-3 tokens)][completion (1+ tokens)][right padding], as 0/1."""
    mask = torch.zeros(rows, SEQ, dtype=torch.long)
    for i in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=gen))
        length = int(torch.randint(1, SEQ - start + 1, (1,), generator=gen))
        mask[i, start : start + length] = 1
    return mask


def _token_logps(rows: int, gen: torch.Generator) -> torch.Tensor:
    return (-3 * torch.rand(rows, SEQ - 1, generator=gen, dtype=torch.float64)).requires_grad_()


def _grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, leaf, retain_graph=True)[0]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float64 or theirs.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs.double(), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- DPO


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.7, 0.0),
        ("hinge", 0.3, 0.0),
        ("robust", 0.1, 0.2),
        ("robust", 0.4, 0.05),
    ],
)
def test_dpo_matches_trl(trl, loss_type, beta, label_smoothing):
    gen = torch.Generator().manual_seed(int(beta * 1000) + len(loss_type))
    pairs = 6
    mask = _completion_mask(2 * pairs, gen)
    token_logps = _token_logps(2 * pairs, gen)
    ref_logps = -10 * torch.rand(2 * pairs, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, 50, (2 * pairs, SEQ), generator=gen)

    trainer = _trainer(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": mask,
        "ref_chosen_logps": ref_logps[:pairs],
        "ref_rejected_logps": ref_logps[pairs:],
    }
    model = _FusedHeadModel({input_ids.data_ptr(): token_logps})
    theirs = trl.DPO._compute_loss(trainer, model, inputs, return_outputs=False)

    seq_logps = (token_logps * mask[:, 1:]).sum(1)
    lengths = mask.sum(1).to(torch.float64)
    ours = dpo_loss(
        seq_logps[:pairs],
        seq_logps[pairs:],
        ref_logps[:pairs],
        ref_logps[pairs:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:pairs] if loss_type == "ipo" else None,
        rejected_lengths=lengths[pairs:] if loss_type == "ipo" else None,
    )
    _close(ours.loss, theirs)
    _close(_grad(ours.loss, token_logps), _grad(theirs, token_logps))
    metrics = trainer._metrics["train"]
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=TOL)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=TOL)
    assert ours.reward_accuracy.item() == pytest.approx(metrics["rewards/accuracies"][0], abs=TOL)
    assert ours.reward_margin.item() == pytest.approx(metrics["rewards/margins"][0], abs=TOL)


def test_ipo_without_lengths_is_the_summed_paper_form_not_trls(trl):
    """Documents the convention: TRL's IPO is length-normalised; ours only when lengths are given."""
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-4.0, -9.0, -5.0, -6.0))
    summed = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo").loss
    assert summed.item() == pytest.approx(((-4 + 5) - (-9 + 6) - 5.0) ** 2)
    averaged = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.1,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2.0]),
        rejected_lengths=torch.tensor([4.0]),
    )
    assert averaged.loss.item() == pytest.approx((1 / 2 - (-3) / 4 - 5.0) ** 2)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_label_smoothing_matches_trls_cpo_sigmoid(trl, label_smoothing):
    gen = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_()
    pr.requires_grad_()
    cpo = _trainer(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=label_smoothing, simpo_gamma=0.0)
    theirs, _, _ = trl.CPO.cpo_loss(cpo, pc - rc, pr - rr)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="sigmoid", label_smoothing=label_smoothing)
    _close(ours.losses, theirs)
    for leaf in (pc, pr):
        _close(_grad(ours.loss, leaf), _grad(theirs.mean(), leaf))


# ----------------------------------------------------------------------------- KTO


@pytest.mark.parametrize(
    ("beta", "desirable_weight", "undesirable_weight", "with_kl"),
    [(0.1, 1.0, 1.0, True), (0.5, 1.33, 0.7, True), (0.2, 1.0, 1.0, False)],
)
def test_kto_matches_trl(trl, beta, desirable_weight, undesirable_weight, with_kl):
    gen = torch.Generator().manual_seed(11)
    rows = 8
    mask, kl_mask = _completion_mask(rows, gen), _completion_mask(rows, gen)
    token_logps, kl_token_logps = _token_logps(rows, gen), _token_logps(rows, gen)  # both with gradients
    ref_logps = -10 * torch.rand(rows, generator=gen, dtype=torch.float64)
    # Mismatched pairs scored a little lower by the reference, so z0 = max(0, mean KL) is positive.
    kl_ref_logps = (kl_token_logps.detach() * kl_mask[:, 1:]).sum(1) - 0.5 * torch.rand(rows, generator=gen,
                                                                                         dtype=torch.float64)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    input_ids = torch.randint(0, 50, (rows, SEQ), generator=gen)
    kl_input_ids = torch.randint(0, 50, (rows, SEQ), generator=gen)

    trainer = _trainer(
        precompute_ref_logps=True,
        calculate_KL=with_kl,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    trainer._compute_kl_logps = MethodType(trl.KTO._compute_kl_logps, trainer)  # the KL pass TRL's loss calls
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": mask,
        "KL_input_ids": kl_input_ids,
        "KL_attention_mask": torch.ones_like(kl_input_ids),
        "KL_completion_mask": kl_mask,
        "label": desirable,
        "ref_logps": ref_logps,
        "ref_KL_logps": kl_ref_logps,
    }
    model = _FusedHeadModel({input_ids.data_ptr(): token_logps, kl_input_ids.data_ptr(): kl_token_logps})
    theirs = trl.KTO._compute_loss(trainer, model, inputs, return_outputs=False)

    ours = kto_loss(
        (token_logps * mask[:, 1:]).sum(1),
        ref_logps,
        desirable,
        kl_policy_logps=(kl_token_logps * kl_mask[:, 1:]).sum(1) if with_kl else None,
        kl_ref_logps=kl_ref_logps if with_kl else None,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    _close(ours.loss, theirs)
    _close(_grad(ours.loss, token_logps), _grad(theirs, token_logps))
    # z0 carries no gradient (TRL scores the KL rows under no_grad and detaches their mean)
    assert torch.autograd.grad(theirs, kl_token_logps, allow_unused=True)[0] is None
    if with_kl:
        assert torch.autograd.grad(ours.loss, kl_token_logps, allow_unused=True)[0] is None
    metrics = trainer._metrics["train"]
    assert ours.kl.item() == pytest.approx(metrics["kl"][0], abs=TOL)
    if with_kl:
        assert ours.kl.item() > 0
    assert ours.rewards[desirable].mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=TOL)
    assert ours.rewards[~desirable].mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=TOL)


# ----------------------------------------------------------------------------- SimPO, ORPO


def _avg_logps(gen: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = (-3 * torch.rand(rows, generator=gen, dtype=torch.float64) - 0.01).requires_grad_()
    rejected = (-3 * torch.rand(rows, generator=gen, dtype=torch.float64) - 0.01).requires_grad_()
    return chosen, rejected


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_matches_trl_cpo_simpo(trl, beta, gamma, label_smoothing):
    gen = torch.Generator().manual_seed(3)
    chosen, rejected = _avg_logps(gen, 10)
    cpo = _trainer(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    theirs, theirs_chosen_rewards, theirs_rejected_rewards = trl.CPO.cpo_loss(cpo, chosen, rejected)
    ours = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    _close(ours.losses, theirs)
    _close(ours.chosen_rewards, theirs_chosen_rewards)
    _close(ours.rejected_rewards, theirs_rejected_rewards)
    for leaf in (chosen, rejected):
        _close(_grad(ours.loss, leaf), _grad(theirs.mean(), leaf))


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(trl, beta):
    gen = torch.Generator().manual_seed(5)
    chosen, rejected = _avg_logps(gen, 10)
    with torch.no_grad():  # cover both branches of log1mexp (either side of -ln 2)
        chosen[:3] = torch.tensor([-0.05, -0.4, -0.69])
    orpo = _trainer(beta=beta)
    theirs, theirs_chosen_rewards, theirs_rejected_rewards, _, _ = trl.ORPO.odds_ratio_loss(orpo, chosen, rejected)
    ours = orpo_loss(chosen, rejected, beta=beta)
    # TRL returns beta * logsigmoid(log_odds) and subtracts its mean from the NLL; our loss is its negative.
    _close(ours.losses, -theirs)
    _close(ours.chosen_rewards, theirs_chosen_rewards)
    _close(ours.rejected_rewards, theirs_rejected_rewards)
    for leaf in (chosen, rejected):
        _close(_grad(ours.loss, leaf), _grad(-theirs.mean(), leaf))


def test_log1mexp_is_accurate_on_both_sides_of_minus_ln2():
    """ORPO's log(1 - e^x) against closed forms: log(-x) + x/2 - x^2/24 near 0 (where 1 - e^x cancels)
    and -e^x - e^{2x}/2 far below (where log(1 - e^x) rounds to 0); TRL's fp32 parity cannot see this."""
    import math

    from lmforge.align.preference import log1mexp

    x = torch.tensor([-1e-10, -1e-6, -40.0, -0.5], dtype=torch.float64)
    expected = [math.log(1e-10) - 5e-11, math.log(1e-6) - 5e-7 - 1e-12 / 24, -math.exp(-40.0) - math.exp(-80.0) / 2,
                math.log(1 - math.exp(-0.5))]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- reward model


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_reward_model_loss_matches_trl(trl, with_margin, center):
    gen = torch.Generator().manual_seed(13)
    pairs = 7
    rewards = (3 * torch.randn(2 * pairs, generator=gen, dtype=torch.float64)).requires_grad_()
    margin = torch.rand(pairs, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, 50, (2 * pairs, SEQ), generator=gen)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if with_margin:
        inputs["margin"] = margin

    def model(**_):
        return SimpleNamespace(logits=rewards.unsqueeze(-1))

    trainer = _trainer(args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = trl.Reward.compute_loss(trainer, model, inputs)
    ours = bradley_terry_loss(
        rewards[:pairs], rewards[pairs:], margin=margin if with_margin else None, center_rewards_coefficient=center
    )
    _close(ours.loss, theirs)
    _close(_grad(ours.loss, rewards), _grad(theirs, rewards))
    metrics = trainer._metrics["train"]
    assert ours.accuracy.item() == pytest.approx(metrics["accuracy"][0], abs=TOL)
    assert ours.margin.item() == pytest.approx(metrics["margin"][0], abs=TOL)


# ----------------------------------------------------------------------------- GRPO (TRL parity lives in
# this module too, so TRL is imported once; the closed-form checks are in test_rl_maths.py)


@pytest.mark.parametrize(
    ("aggregation", "beta", "eps_low", "eps_high"),
    [("grpo", 0.04, 0.2, 0.2), ("dr_grpo", 0.0, 0.2, 0.2), ("dapo", 0.1, 0.2, 0.28), ("grpo", 0.0, 0.1, 0.3)],
)
def test_grpo_loss_matches_trl(trl, aggregation, beta, eps_low, eps_high):
    from lmforge.align.rl import grpo_loss

    gen = torch.Generator().manual_seed(17)
    rows, steps, max_len = 6, 7, 10
    mask = torch.zeros(rows, steps, dtype=torch.long)
    for i, length in enumerate([7, 3, 1, 5, 6, 2]):
        mask[i, :length] = 1
    logps = (-2 * torch.rand(rows, steps, generator=gen, dtype=torch.float64)).requires_grad_()
    # Off-policy by up to ±0.4 in log space, so both clip sides are reached.
    old_logps = logps.detach() + 0.8 * (torch.rand(rows, steps, generator=gen, dtype=torch.float64) - 0.5)
    ref_logps = logps.detach() + 0.5 * torch.randn(rows, steps, generator=gen, dtype=torch.float64)
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64)

    trainer = _trainer(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=aggregation,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        max_completion_length=max_len,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, steps, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": mask.sum().double(),
    }
    theirs = trl.GRPO._compute_loss(trainer, None, inputs)
    ours = grpo_loss(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logprobs=ref_logps if beta else None,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        aggregation=aggregation,
        max_len=max_len,
    )
    _close(ours.loss, theirs)
    _close(_grad(ours.loss, logps), _grad(theirs, logps))
    metrics = trainer._metrics["train"]
    assert ours.clip_low_fraction.item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=TOL)
    assert ours.clip_high_fraction.item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=TOL)
    assert ours.clip_low_fraction.item() > 0 and ours.clip_high_fraction.item() > 0
    if beta:
        assert ours.kl.item() == pytest.approx(metrics["kl"][0], abs=TOL)


# ----------------------------------------------------------------------------- user errors


def test_bad_settings_are_user_errors():
    from lmforge.errors import LmforgeError

    one = torch.tensor([-1.0], dtype=torch.float64)
    with pytest.raises(LmforgeError, match="unknown DPO loss_type"):
        dpo_loss(one, one, one, one, loss_type="sigmoidal")
    with pytest.raises(LmforgeError, match="robust DPO"):
        dpo_loss(one, one, one, one, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(LmforgeError, match="beta"):
        simpo_loss(one, one, beta=0.0)
    with pytest.raises(LmforgeError, match="1-D"):
        dpo_loss(one, torch.tensor([-1.0, -2.0]), one, one)
    with pytest.raises(LmforgeError, match="< 0"):
        orpo_loss(torch.tensor([0.0]), one)
    with pytest.raises(LmforgeError, match="shape"):
        bradley_terry_loss(one, one, margin=torch.zeros(2))
