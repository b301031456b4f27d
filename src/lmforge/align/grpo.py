"""GRPO on the training loop's objective seam: every batch is a fresh group rollout of the current
policy through the serving engine, scored by a verifiable reward (exact-match arithmetic).

Rollouts happen lazily inside `loss()`: the loop hands the objective its model only there, and a
micro-batch's loss is computed before the optimizer update that follows it, so the completions are
always sampled from the weights being trained (on-policy, one update per rollout batch). The loader
only carries a counter; the prompts and sampling seeds are derived from it, so a resumed run draws
the same prompts with the same seeds.

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
from lmforge.align.rollouts import RolloutBatch, completion_logprobs, sample_groups
from lmforge.align.sft import pad_token_id
from lmforge.align.tasks import Task, arithmetic_tasks, exact_match_reward
from lmforge.config import check_non_negative, check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit


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
    tokenizer: str = ""           # "" -> the model's own
    chat: bool = True             # prompts as a user turn when the tokenizer has a chat template

    def __post_init__(self):
        check_positive(self, "grpo", "max_tokens", "train_tasks", "val_tasks", "eps_low", "eps_high")
        check_non_negative(self, "grpo", "temperature", "beta")
        if self.group_size < 2:
            raise LmforgeError(f"grpo.group_size must be >= 2 (got {self.group_size})")
        if self.scale not in ADVANTAGE_SCALES:
            raise LmforgeError(f"grpo.scale must be one of {', '.join(ADVANTAGE_SCALES)} (got {self.scale!r})")
        if self.aggregation not in AGGREGATIONS:
            raise LmforgeError(f"grpo.aggregation must be one of {', '.join(AGGREGATIONS)} (got {self.aggregation!r})")


@dataclass
class GRPORecipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


class RolloutCounter:
    """The loader: batch k is {counter: k, seed}; its whole state is the counter."""

    def __init__(self, seed: int):
        self.seed, self.counter = seed, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.counter += 1
        return {"counter": torch.tensor(self.counter - 1), "seed": torch.tensor(self.seed)}

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])


class GRPOObjective:
    def __init__(self, tok: Tokenizer, train: list[Task], val: list[Task], cfg: GRPOConfig, prompts_per_batch: int,
                 pad_id: int, reward_fn: Callable[[str, Task], float] = exact_match_reward,
                 reference: Callable[[torch.device], torch.nn.Module] | None = None):
        if cfg.beta > 0 and reference is None:
            raise LmforgeError("grpo.beta > 0 needs a reference model")
        self.tok, self.train, self.val, self.cfg = tok, train, val, cfg
        self.prompts_per_batch, self.pad_id, self.reward_fn = prompts_per_batch, pad_id, reward_fn
        self.reference, self.ref_model = reference, None
        self.vocab_size = tok.vocab_size
        self.train_ids = [self.encode(t.prompt) for t in train]
        self.val_ids = [self.encode(t.prompt) for t in val]

    def encode(self, prompt: str) -> list[int]:
        """A chat model answers a user turn (given raw text, SmolLM2-Instruct ends at once)."""
        if self.cfg.chat and self.tok.chat_template:
            return self.tok.encode_chat([{"role": "user", "content": prompt}])
        return self.tok.encode(prompt)

    def batches(self, micro_batch: int, seed: int) -> RolloutCounter:
        self.prompts_per_batch = micro_batch
        return RolloutCounter(seed)

    def loss_tokens(self, batch) -> int:
        # completions per micro-batch: the same for every micro-batch, so micro-batches weigh equally
        return batch["tokens"].shape[0] if "tokens" in batch else self.prompts_per_batch * self.cfg.group_size

    def rollout(self, model, counter: int, seed: int) -> RolloutBatch:
        rng = random.Random(f"grpo/{seed}/{counter}")
        picks = [rng.randrange(len(self.train)) for _ in range(self.prompts_per_batch)]
        device = next(model.parameters()).device
        if self.cfg.beta > 0 and self.ref_model is None:
            self.ref_model = self.reference(device).eval().requires_grad_(False)
        return sample_groups(model, self.tok, [self.train_ids[i] for i in picks], self.cfg.group_size,
                             max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                             seed=seed * 1_000_003 + counter, pad_id=self.pad_id,
                             tasks=[self.train[i] for i in picks], reward_fn=self.reward_fn,
                             ref_model=self.ref_model if self.cfg.beta > 0 else None)

    def loss(self, model, batch):
        """GRPO loss on a rollout batch (a RolloutBatch's to_dict()), or on a fresh rollout of the
        current policy when the batch is the loader's counter."""
        metrics = {}
        if "tokens" not in batch:
            rollouts = self.rollout(model, int(batch["counter"]), int(batch["seed"]))
            n_new = float(rollouts.completion_mask.sum())
            metrics["rollout_tokens_per_s"] = n_new / max(rollouts.rollout_seconds, 1e-9)
            metrics["prefix_hit_tokens"] = float(rollouts.prefix_hits)
            batch = rollouts.to_dict()
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        cfg = self.cfg
        t0 = time.perf_counter()
        logprobs, entropy = completion_logprobs(model, b["tokens"], b["prompt_lens"], b["completion_mask"],
                                                return_entropy=True)
        dtype = logprobs.dtype
        mask = b["completion_mask"].to(dtype)
        adv = group_advantages(b["rewards"].to(dtype), cfg.group_size, scale=cfg.scale)
        train_mask = mask_truncated(mask, b["truncated"]) if cfg.mask_truncated else mask
        ref = b.get("ref_logprobs")
        out = grpo_loss(logprobs, b["old_logprobs"].to(dtype), adv.advantages, train_mask,
                        ref_logprobs=ref.to(dtype) if ref is not None else None, beta=cfg.beta,
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                        max_len=max(cfg.max_tokens, mask.shape[1]))
        rewards = b["rewards"].float()
        metrics.update({
            "train_tokens_per_s": float(b["tokens"].numel()) / max(time.perf_counter() - t0, 1e-9),  # forward only
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "zero_variance_groups": float(adv.zero_variance_fraction), "kl": float(out.kl),
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
            "clip_low": float(out.clip_low_fraction), "clip_high": float(out.clip_high_fraction),
            "response_length": float(mask.sum(1).mean()), "truncated": float(b["truncated"].float().mean()),
        })
        return out.loss, metrics

    def evaluate(self, model, autocast) -> dict[str, float]:
        """Held-out exact match, greedy completions through the engine."""
        if not self.val:
            return {}
        was_training = model.training
        model.eval()
        with autocast():
            r = sample_groups(model, self.tok, self.val_ids, 1, max_tokens=self.cfg.max_tokens, temperature=0.0,
                              seed=0, pad_id=self.pad_id, tasks=self.val, reward_fn=exact_match_reward)
        model.train(was_training)
        return {"val_exact_match": float(r.rewards.mean())}

    def tokenizer(self) -> Tokenizer | None:
        return self.tok


def finetune_grpo(recipe: GRPORecipe, model: str | None = None, resume: bool = False,
                  console: Console | None = None) -> dict:
    """GRPO of MODEL (or train.init_from) on generated arithmetic with an exact-match reward; writes
    train.out/model. train.micro_batch is prompts per micro-batch (each sampled group_size times)."""
    console = console or Console()
    tc, gc = recipe.train, recipe.grpo
    path, tok = starting_point(tc, model, gc.tokenizer)
    train = arithmetic_tasks(gc.train_tasks, tc.seed, "train", gc.max_operand, gc.ops)
    val = arithmetic_tasks(gc.val_tasks, 0, "val", gc.max_operand, gc.ops)

    def reference(device):
        return load(path, dtype=torch.float32, device=device)
    objective = GRPOObjective(tok, train, val, gc, tc.micro_batch, pad_token_id(tok),
                              reference=reference if gc.beta > 0 else None)
    summary = fit(objective, tc, to_dict(recipe), None, "finetune", TRAIN_FILES, resume, console)
    return summary
