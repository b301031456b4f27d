"""GRPO on the training loop's objective seam: every optimizer step trains on a fresh group rollout
of the current policy through the serving engine, scored by a verifiable reward (exact-match
arithmetic, or unit tests in the sandbox).

Rollouts are the batch loader's job (`RolloutLoader`): `prepare_model` hands the objective the live
model, and the loop asks for a step's micro-batches right after the previous optimizer update, so
the loader samples the whole step (train.micro_batch x grad_accum prompts, each group_size times)
from the weights being trained, in one engine pass (on-policy, one update per rollout batch).
Advantages are computed over the whole step (so `scale: batch` means the step's batch whatever the
accumulation) and each micro-batch carries its share. The prompts and sampling seeds derive from
the loader's counter and train.seed alone, so a resumed run (counter + weights from the checkpoint)
draws the same rollouts bit for bit, and how a step is split into micro-batches changes nothing.

The KL reference (beta > 0) is a frozen copy of the starting weights, reloaded from the starting
model's file, so it is also right after a resume. beta = 0 (the default, as in DAPO / Dr. GRPO)
needs no reference and loads none.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.console import Console

from lmforge.align.rl import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    group_advantages,
    grpo_loss,
    mask_truncated,
)
from lmforge.align.rollouts import completion_logprobs, greedy_rollouts, sample_groups
from lmforge.align.sft import pad_token_id
from lmforge.align.tasks import (
    Task,
    arithmetic_tasks,
    coding_tasks,
    exact_match_reward,
    unit_test_reward,
)
from lmforge.config import check_non_negative, check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit

TASKS = ("arithmetic", "code")


@dataclass
class GRPOConfig:
    group_size: int = 8           # completions per prompt (G); train.micro_batch is prompts per micro-batch
    max_tokens: int = 8           # completion limit
    temperature: float = 1.0
    scale: str = "group"          # advantages: group | batch | none
    aggregation: str = "grpo"     # grpo | dr_grpo | dapo
    eps_low: float = 0.2
    eps_high: float = 0.28        # > eps_low: DAPO's clip-higher
    beta: float = 0.0             # k3 KL to the starting weights; 0 loads no reference model
    mask_truncated: bool = True   # completions cut by max_tokens teach nothing
    train_tasks: int = 2000
    val_tasks: int = 64
    max_operand: int = 99
    ops: str = "+"
    task: str = "arithmetic"      # arithmetic (exact match) | code (small functions, unit tests in the eval sandbox)
    tokenizer: str = ""           # "" -> the model's own
    chat: bool = True             # prompts as a user turn when the tokenizer has a chat template

    def __post_init__(self):
        check_positive(self, "grpo", "max_tokens", "train_tasks", "val_tasks", "eps_low", "eps_high")
        check_non_negative(self, "grpo", "temperature", "beta")
        if self.group_size < 2:
            raise LmforgeError(f"grpo.group_size must be >= 2 (got {self.group_size})")
        if self.scale not in ADVANTAGE_SCALES:
            raise LmforgeError(f"grpo.scale must be one of {', '.join(ADVANTAGE_SCALES)} (got {self.scale!r})")
        if self.task not in TASKS:
            raise LmforgeError(f"grpo.task must be one of {', '.join(TASKS)} (got {self.task!r})")
        if self.aggregation not in AGGREGATIONS:
            raise LmforgeError(f"grpo.aggregation must be one of {', '.join(AGGREGATIONS)} (got {self.aggregation!r})")


@dataclass
class GRPORecipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


class RolloutLoader:
    """Micro-batches of rollouts. The first request of an optimizer step samples the whole step with
    the live policy and splits it into grad_accum micro-batches of micro_batch groups; the state is
    the number of steps sampled (taken between steps, when no micro-batch is pending)."""

    def __init__(self, objective: GRPOObjective, micro_batch: int, seed: int, grad_accum: int):
        self.objective, self.micro_batch, self.seed, self.grad_accum = objective, micro_batch, seed, grad_accum
        self.counter = 0
        self.pending: list[dict[str, torch.Tensor]] = []

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            step = self.objective.rollout_step(self.counter, self.seed, self.micro_batch * self.grad_accum)
            self.pending = split_micro_batches(step, self.grad_accum)
            self.counter += 1
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        if self.pending:  # the loop saves only between optimizer steps
            raise RuntimeError("GRPO loader state taken in the middle of an optimizer step")
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter, self.pending = int(state["counter"]), []


STEP_METRICS = ("rollout_tokens_per_s", "prefix_hit_tokens", "zero_variance_groups")  # one value per step
ROW_KEYS = ("tokens", "prompt_lens", "completion_ids", "completion_mask", "truncated", "rewards", "old_logprobs",
            "ref_logprobs", "advantages")


def split_micro_batches(step: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Rows split into `parts` equal runs of whole groups, each trimmed to its own longest row
    (right padding: the trim changes no log-prob); step-level scalars are copied into each."""
    n = step["tokens"].shape[0]
    size = n // parts
    micros = []
    for i in range(parts):
        m = {k: (v[i * size:(i + 1) * size] if k in ROW_KEYS else v) for k, v in step.items()}
        width = max(int(m["completion_mask"].sum(1).max()), 1)
        length = int((m["prompt_lens"] + m["completion_mask"].sum(1).long()).max())
        for k in ("completion_ids", "completion_mask", "old_logprobs", "ref_logprobs"):
            if k in m:
                m[k] = m[k][:, :width]
        m["tokens"] = m["tokens"][:, :length]
        micros.append(m)
    return micros


class GRPOObjective:
    def __init__(self, tok: Tokenizer, train: list[Task], val: list[Task], cfg: GRPOConfig, prompts_per_batch: int,
                 pad_id: int, reward_fn: Callable[[str, Task], float] = exact_match_reward,
                 reference: Callable[[torch.device], torch.nn.Module] | None = None,
                 eval_reward_fn: Callable[[str, Task], float] | None = None,
                 start: Callable[[torch.device], torch.nn.Module] | None = None):
        """`start` loads the starting weights: held-out evaluations then also log the win-rate against
        them (questions the policy gets right and the start wrong, and the reverse)."""
        if cfg.beta > 0 and reference is None:
            raise LmforgeError("grpo.beta > 0 needs a reference model")
        self.tok, self.train, self.val, self.cfg = tok, train, val, cfg
        self.prompts_per_batch, self.pad_id, self.reward_fn = prompts_per_batch, pad_id, reward_fn
        self.eval_reward_fn = eval_reward_fn or reward_fn  # a control run trains on another reward
        self.reference, self.ref_model, self.policy = reference, None, None
        self.start, self.start_right = start, None
        self.grad_accum = 1  # micro-batches per optimizer step (the loader samples a whole step at once)
        self.vocab_size = tok.vocab_size
        self.train_ids = [self.encode(t.prompt) for t in train]
        self.val_ids = [self.encode(t.prompt) for t in val]

    def encode(self, prompt: str) -> list[int]:
        """A chat model answers a user turn (given raw text, SmolLM2-Instruct ends at once)."""
        if self.cfg.chat and self.tok.chat_template:
            return self.tok.encode_chat([{"role": "user", "content": prompt}])
        return self.tok.encode(prompt)

    def prepare_model(self, model):
        """The loop's model after loading: the policy the loader samples from."""
        self.policy = model
        return model

    def batches(self, micro_batch: int, seed: int) -> RolloutLoader:
        self.prompts_per_batch = micro_batch
        return RolloutLoader(self, micro_batch, seed, self.grad_accum)

    def train_mask(self, batch) -> torch.Tensor:
        mask = batch["completion_mask"]
        return mask_truncated(mask, batch["truncated"]) if self.cfg.mask_truncated else mask

    def loss_tokens(self, batch) -> int:
        """What the aggregation averages over, so accumulated micro-batches weigh as one batch: trained
        tokens for dapo (a token mean), completions for grpo and dr_grpo (a mean over sequences)."""
        if self.cfg.aggregation == "dapo":
            return int(self.train_mask(batch).sum())
        return batch["tokens"].shape[0]

    def rollout_step(self, counter: int, seed: int, n_prompts: int) -> dict[str, torch.Tensor]:
        """One optimizer step's rollouts from the live policy, as tensors with advantages attached."""
        if self.policy is None:
            raise RuntimeError("GRPOObjective.prepare_model must hand it the policy before batches are drawn")
        rng = random.Random(f"grpo/{seed}/{counter}")
        picks = [rng.randrange(len(self.train)) for _ in range(n_prompts)]
        device = next(self.policy.parameters()).device
        if self.cfg.beta > 0 and self.ref_model is None:
            self.ref_model = self.reference(device).eval().requires_grad_(False)
        r = sample_groups(self.policy, self.tok, [self.train_ids[i] for i in picks], self.cfg.group_size,
                          max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                          seed=seed * 1_000_003 + counter, pad_id=self.pad_id,
                          tasks=[self.train[i] for i in picks], reward_fn=self.reward_fn,
                          ref_model=self.ref_model if self.cfg.beta > 0 else None)
        batch = with_advantages(r.to_dict(), self.cfg)
        n_new = float(r.completion_mask.sum())
        batch["rollout_tokens_per_s"] = torch.tensor(n_new / max(r.rollout_seconds, 1e-9))
        batch["prefix_hit_tokens"] = torch.tensor(float(r.prefix_hits))
        return batch

    def loss(self, model, batch):
        """GRPO loss on a micro-batch of rollouts (with advantages: `with_advantages`)."""
        metrics = {k: float(batch[k]) for k in STEP_METRICS if k in batch}
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        cfg = self.cfg
        t0 = time.perf_counter()
        logprobs, entropy = completion_logprobs(model, b["tokens"], b["prompt_lens"], b["completion_mask"],
                                                return_entropy=True)
        dtype = logprobs.dtype
        mask = b["completion_mask"].to(dtype)
        train_mask = self.train_mask(b).to(dtype)
        ref = b.get("ref_logprobs")
        out = grpo_loss(logprobs, b["old_logprobs"].to(dtype), b["advantages"].to(dtype), train_mask,
                        ref_logprobs=ref.to(dtype) if ref is not None else None, beta=cfg.beta,
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                        max_len=max(cfg.max_tokens, mask.shape[1]))
        rewards = b["rewards"].float()
        metrics.update({
            "train_tokens_per_s": float(b["tokens"].numel()) / max(time.perf_counter() - t0, 1e-9),  # forward only
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "kl": float(out.kl),
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
            "clip_low": float(out.clip_low_fraction), "clip_high": float(out.clip_high_fraction),
            "response_length": float(mask.sum(1).mean()), "truncated": float(b["truncated"].float().mean()),
        })
        return out.loss, metrics

    def evaluate(self, model, autocast) -> dict[str, float]:
        """Held-out reward (exact match, or unit tests passed) of greedy completions through the engine."""
        if not self.val:
            return {}
        right = self.held_out_rewards(model, autocast)
        name = "val_exact_match" if self.cfg.task == "arithmetic" else "val_pass_at_1"
        out = {name: float(right.mean())}
        if self.start is not None:
            if self.start_right is None:  # once per run, from the starting weights' file (right after a resume too)
                self.start_right = self.held_out_rewards(self.start(next(model.parameters()).device), autocast)
            out["val_win_rate"] = float((right * (1 - self.start_right)).mean())
            out["val_loss_rate"] = float((self.start_right * (1 - right)).mean())
        return out

    def held_out_rewards(self, model, autocast) -> torch.Tensor:
        """1/0 per held-out task: the greedy completion's reward."""
        return greedy_rollouts(model, self.tok, self.val_ids, self.val, max_tokens=self.cfg.max_tokens,
                               pad_id=self.pad_id, reward_fn=self.eval_reward_fn, autocast=autocast).rewards

    def tokenizer(self) -> Tokenizer | None:
        return self.tok


def with_advantages(batch: dict[str, torch.Tensor], cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    """The rollout tensors plus per-row advantages over the groups given (the whole step), and the
    share of those groups whose rewards are all equal (no learning signal)."""
    adv = group_advantages(batch["rewards"].double(), cfg.group_size, scale=cfg.scale)
    return {**batch, "advantages": adv.advantages, "zero_variance_groups": adv.zero_variance_fraction.double()}


def finetune_grpo(recipe: GRPORecipe, model: str | None = None, resume: bool = False,
                  console: Console | None = None, reward_fn: Callable | None = None) -> dict:
    """GRPO of MODEL (or train.init_from) on generated arithmetic with an exact-match reward, or small
    coding tasks rewarded by their unit tests in the sandbox; writes train.out/model.
    train.micro_batch is prompts per micro-batch (each sampled group_size times). `reward_fn`
    replaces the training reward (held-out scores keep the task's own), e.g. for a control run."""
    console = console or Console()
    tc, gc = recipe.train, recipe.grpo
    path, tok = starting_point(tc, model, gc.tokenizer)
    if gc.task == "code":
        train, val = coding_tasks(gc.train_tasks, tc.seed, "train"), coding_tasks(gc.val_tasks, 0, "val")
        task_reward = unit_test_reward
    else:
        train = arithmetic_tasks(gc.train_tasks, tc.seed, "train", gc.max_operand, gc.ops)
        val = arithmetic_tasks(gc.val_tasks, 0, "val", gc.max_operand, gc.ops)
        task_reward = exact_match_reward

    def reference(device):
        return load(path, dtype=torch.float32, device=device)
    objective = GRPOObjective(tok, train, val, gc, tc.micro_batch, pad_token_id(tok),
                              reward_fn=reward_fn or task_reward, reference=reference if gc.beta > 0 else None,
                              eval_reward_fn=task_reward, start=reference)
    objective.grad_accum = tc.grad_accum
    summary = fit(objective, tc, to_dict(recipe), None, "finetune", TRAIN_FILES, resume, console)
    return summary
