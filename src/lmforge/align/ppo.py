"""PPO (RLHF as in Ziegler et al. 2019 / Ouyang et al. 2022) on the training loop's objective seam.

Per rollout: the actor samples one completion per prompt through the serving engine (`sample_groups`
with a group of 1, a fresh engine on the current weights); the sequence is scored by a reward
function (exact-match arithmetic) or a trained reward model (`lmforge finetune rm` output); one
forward of the actor gives the old log-probs and, from the same hidden states, the value head's
values; the frozen reference gives its log-probs. The per-token reward is -beta * KL (k1/k2/k3) plus
the score on the last token (optionally whitened, without shifting its mean); GAE (gamma, lambda)
gives advantages (whitened) and returns. Every completion is treated as terminated: a cut one gets
its score on its last token like the rest (no bootstrap), as TRL's PPO did.

Then `ppo.ppo_epochs` optimizer steps train on that rollout, each on the clipped policy loss plus
`vf_coef` times the clipped value loss, so the ratios move off 1 and the clipping acts. A micro-batch
counter drives it: with A = train.grad_accum and E = ppo_epochs, micro-batch m belongs to rollout
(m // (A*E)) * A + m % A at epoch (m // A) % E. A rollout is made at its epoch 0 and kept in the
loader's state (saved in every checkpoint, floats written exactly), as is the adaptive KL
coefficient, so a run stopped between epochs resumes bit for bit.

The reference is the model with its LoRA adapters switched off (lora.r > 0: no second copy) or, in a
full finetune, a frozen copy reloaded from the starting model's file (also right after a resume).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lmforge.align.finetune_config import LoraHooks, LoraSettings
from lmforge.align.lora import adapters_disabled, lora_layers
from lmforge.align.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    gae,
    kl_penalised_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from lmforge.align.rollouts import (
    completion_logprobs,
    completion_positions,
    greedy_rollouts,
    sample_groups,
)
from lmforge.align.sft import pad_token_id
from lmforge.align.tasks import Task, arithmetic_tasks, exact_match_reward
from lmforge.align.value_head import (
    VALUE_HEAD_FILE,
    attach_value_head,
    detach_value_head,
    save_value_head,
    value_head_of,
)
from lmforge.config import (
    check_choice,
    check_non_negative,
    check_positive,
    require,
    to_dict,
)
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit

PPO_FILES = [*TRAIN_FILES, VALUE_HEAD_FILE]
# what a rollout keeps for its training epochs (all [N, C] but tokens [N, L] and the [N] ones)
ROLLOUT_KEYS = ("tokens", "prompt_lens", "mask", "old_logprobs", "old_values", "advantages", "returns",
                "scores", "kl")


@dataclass
class PPOConfig:
    max_tokens: int = 8           # completion limit
    temperature: float = 1.0
    reward_model: str = ""        # a `lmforge finetune rm` model folder; "" -> exact-match arithmetic
    beta: float = 0.1             # KL coefficient (the adaptive controller's start)
    kl_estimator: str = "k1"      # k1 | k2 | k3, per token
    adaptive_kl: bool = False     # Ziegler et al.'s proportional controller towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2         # policy ratio clip
    value_clip: float = 0.2       # value clip around the rollout's values
    vf_coef: float = 0.1
    ppo_epochs: int = 2           # optimizer steps on each rollout
    whiten_rewards: bool = True   # per-token rewards scaled to unit variance (mean kept)
    train_tasks: int = 2000
    val_tasks: int = 64
    max_operand: int = 99
    ops: str = "+"
    tokenizer: str = ""           # "" -> the model's own
    chat: bool = True             # prompts as a user turn when the tokenizer has a chat template

    def __post_init__(self):
        check_positive(self, "ppo", "max_tokens", "kl_target", "kl_horizon", "clip_eps", "value_clip",
                       "ppo_epochs", "train_tasks", "val_tasks")
        check_non_negative(self, "ppo", "temperature", "beta", "vf_coef")
        check_choice(self, "ppo", "kl_estimator", KL_ESTIMATORS)
        require(0 <= self.gamma <= 1, "ppo.gamma", "in [0, 1]", self.gamma)
        require(0 <= self.lam <= 1, "ppo.lam", "in [0, 1]", self.lam)
        require(not (self.adaptive_kl and self.beta == 0), "ppo.beta", "> 0 with ppo.adaptive_kl", self.beta)


@dataclass
class PPORecipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


# --- tensors <-> the loader's JSON state (exact: a float32 or int64 survives a float/int list) --------
def _pack(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.tolist()}


def _unpack(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"]))


class PPOLoader:
    """Micro-batch counter plus what must survive a resume: the rollouts of the current group and the
    KL coefficient. The objective fills `rollouts` and `kl_coef`; this only keeps and restores them."""

    def __init__(self, seed: int, kl_coef: float):
        self.seed, self.counter, self.kl_coef = seed, 0, kl_coef
        self.rollouts: dict[int, dict[str, torch.Tensor]] = {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.counter += 1
        return {"counter": torch.tensor(self.counter - 1), "seed": torch.tensor(self.seed)}

    def state_dict(self) -> dict:
        return {"counter": self.counter, "kl_coef": self.kl_coef,
                "rollouts": {str(k): {n: _pack(t) for n, t in r.items()} for k, r in self.rollouts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counter, self.kl_coef = int(state["counter"]), float(state["kl_coef"])
        self.rollouts = {int(k): {n: _unpack(t) for n, t in r.items()} for k, r in state["rollouts"].items()}


def policy_forward(model, tokens: torch.Tensor, prompt_lens: torch.Tensor, mask: torch.Tensor):
    """One forward -> (log-probs, entropies, values), each [N, C] at the completion positions (0 off
    the mask). Value t is read at the position whose logits score completion token t (the state
    before it); log-probs come chunked from the same hidden states (no [N, L, V] tensor)."""
    targets = tokens[:, 1:].clone()
    col = torch.arange(targets.shape[1], device=tokens.device).unsqueeze(0)
    start = prompt_lens.unsqueeze(1) - 1
    targets[(col < start) | (col >= start + mask.sum(1, keepdim=True).long())] = -100
    hidden = model(tokens[:, :-1], return_hidden=True)
    lp, ent = getattr(model, "_orig_mod", model).logprobs_from_hidden(hidden, targets, return_entropy=True)
    values = value_head_of(model)(hidden).squeeze(-1)
    grid = completion_positions(prompt_lens, mask.shape[1]).clamp(max=targets.shape[1] - 1)
    m = mask.to(lp.dtype)
    return lp.gather(1, grid) * m, ent.gather(1, grid) * m, values.gather(1, grid).to(lp.dtype) * m


class PPOObjective(LoraHooks):
    def __init__(self, tok: Tokenizer, train: list[Task], val: list[Task], cfg: PPOConfig, prompts_per_batch: int,
                 pad_id: int, grad_accum: int = 1,
                 reward_fn: Callable[[str, Task], float] | None = exact_match_reward,
                 reward_model: tuple[torch.nn.Module, torch.Tensor] | None = None,
                 reference: Callable[[torch.device], torch.nn.Module] | None = None):
        if (reward_fn is None) == (reward_model is None):
            raise LmforgeError("PPO needs exactly one of a reward function and a reward model")
        self.tok, self.train, self.val, self.cfg = tok, train, val, cfg
        self.prompts_per_batch, self.pad_id, self.grad_accum = prompts_per_batch, pad_id, grad_accum
        self.reward_fn, self.reward_model, self.reference, self.ref_model = reward_fn, reward_model, reference, None
        self.vocab_size = tok.vocab_size
        self.loader: PPOLoader | None = None
        self._encoded: dict[str, list[int]] = {}

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids, encoded when first drawn (rendering a chat template costs ms per prompt)."""
        if prompt not in self._encoded:
            if self.cfg.chat and self.tok.chat_template:
                self._encoded[prompt] = self.tok.encode_chat([{"role": "user", "content": prompt}])
            else:
                self._encoded[prompt] = self.tok.encode(prompt)
        return self._encoded[prompt]

    def batches(self, micro_batch: int, seed: int) -> PPOLoader:
        self.prompts_per_batch = micro_batch
        self.loader = PPOLoader(seed, self.cfg.beta)
        return self.loader

    def loss_tokens(self, batch) -> int:
        return self.prompts_per_batch  # completions per micro-batch: every micro-batch weighs the same

    # --- hooks: the value head trains with the policy and is saved beside the model ----------------
    def prepare_model(self, model):
        model = super().prepare_model(model)
        attach_value_head(model)
        return model

    def finish_model(self, model, out: Path):
        path = save_value_head(out, detach_value_head(model))
        model, extra = super().finish_model(model, out)
        return model, {**extra, VALUE_HEAD_FILE: path}

    # --- rollouts ---------------------------------------------------------------------------------
    def reference_logprobs(self, model, tokens, prompt_lens, mask) -> torch.Tensor:
        """The frozen reference: the adapters switched off, else the starting weights' copy."""
        if lora_layers(model):
            with adapters_disabled(model):
                return completion_logprobs(model, tokens, prompt_lens, mask)
        if self.ref_model is None:
            if self.reference is None:
                raise LmforgeError("PPO without LoRA needs a reference model")
            self.ref_model = self.reference(tokens.device).eval().requires_grad_(False)
        return completion_logprobs(self.ref_model, tokens, prompt_lens, mask)

    def scores(self, rollout, tasks: list[Task]) -> torch.Tensor:
        if self.reward_model is None:
            return rollout.rewards.double()
        from lmforge.align.reward_model import sequence_rewards
        rm, head = self.reward_model
        lengths = rollout.prompt_lens + rollout.completion_mask.sum(1).long()
        full_mask = (torch.arange(rollout.tokens.shape[1])[None] < lengths[:, None]).long()
        device = head.device
        with torch.no_grad():
            r = sequence_rewards(rm, {"full": rollout.tokens.to(device), "full_mask": full_mask.to(device),
                                      "lengths": lengths.to(device)}, head)
        return r.double().cpu()

    @torch.no_grad()
    def rollout(self, model, key: int, seed: int) -> dict[str, torch.Tensor]:
        """Sample, score and turn rewards into advantages and returns for rollout `key`."""
        cfg = self.cfg
        rng = random.Random(f"ppo/{seed}/{key}")
        picks = [rng.randrange(len(self.train)) for _ in range(self.prompts_per_batch)]
        tasks = [self.train[i] for i in picks]
        plain = getattr(model, "_orig_mod", model)
        was_training = plain.training
        plain.eval()  # no adapter dropout while sampling and scoring the old policy
        try:
            r = sample_groups(plain, self.tok, [self.encode(t.prompt) for t in tasks], 1, max_tokens=cfg.max_tokens,
                              temperature=cfg.temperature, seed=seed * 1_000_003 + key, pad_id=self.pad_id,
                              tasks=tasks, reward_fn=self.reward_fn)
            device = next(plain.parameters()).device
            tokens, prompt_lens, mask = r.tokens.to(device), r.prompt_lens.to(device), r.completion_mask.to(device)
            old_lp, _, old_values = policy_forward(plain, tokens, prompt_lens, mask)
            ref_lp = self.reference_logprobs(plain, tokens, prompt_lens, mask)
        finally:
            plain.train(was_training)
        scores = self.scores(r, tasks).to(device=device, dtype=old_lp.dtype)
        m = mask.to(old_lp.dtype)
        rewards, kl = kl_penalised_rewards(scores, old_lp, ref_lp.to(old_lp.dtype), m, kl_coef=self.loader.kl_coef,
                                           kind=cfg.kl_estimator)
        if cfg.whiten_rewards and m.sum() >= 2:
            rewards = whiten(rewards, m, shift_mean=False) * m
        advantages, returns = gae(rewards, old_values, m, gamma=cfg.gamma, lam=cfg.lam)
        if m.sum() >= 2:
            advantages = whiten(advantages, m) * m
        seq_kl = kl.sum(1)
        if cfg.adaptive_kl:  # Ziegler et al.: n_steps = the rollout's batch size; the value lives in the loader
            ctl = AdaptiveKLController(self.loader.kl_coef, cfg.kl_target, cfg.kl_horizon)
            self.loader.kl_coef = ctl.update(float(seq_kl.mean()), len(picks))
        out = {"tokens": tokens, "prompt_lens": prompt_lens, "mask": m, "old_logprobs": old_lp,
               "old_values": old_values, "advantages": advantages, "returns": returns, "scores": scores,
               "kl": seq_kl}
        return {k: v.detach().cpu() for k, v in out.items()}

    def position(self, counter: int) -> tuple[int, int]:
        """micro-batch counter -> (rollout key, epoch)."""
        a, e = self.grad_accum, self.cfg.ppo_epochs
        return (counter // (a * e)) * a + counter % a, (counter // a) % e

    def loss(self, model, batch):
        """Clipped policy loss + vf_coef * clipped value loss on the micro-batch's rollout (made now,
        with the current weights, at its first epoch; read back from the loader's state after)."""
        if self.loader is None:
            raise LmforgeError("the PPO objective's batches() must be called before loss()")
        key, epoch = self.position(int(batch["counter"]))
        if epoch == 0 or key not in self.loader.rollouts:
            if epoch != 0:
                raise LmforgeError(f"rollout {key} is missing from the loader state at epoch {epoch}")
            if key % self.grad_accum == 0:  # a new group: the previous group's rollouts are done
                self.loader.rollouts.clear()
            self.loader.rollouts[key] = self.rollout(model, key, int(batch["seed"]))
        device = next(model.parameters()).device
        r = {k: v.to(device) for k, v in self.loader.rollouts[key].items()}
        cfg = self.cfg
        logprobs, entropy, values = policy_forward(model, r["tokens"], r["prompt_lens"], r["mask"])
        dtype = logprobs.dtype
        mask = r["mask"].to(dtype)
        policy = ppo_policy_loss(logprobs, r["old_logprobs"].to(dtype), r["advantages"].to(dtype), mask,
                                 clip_eps=cfg.clip_eps)
        value = ppo_value_loss(values, r["old_values"].to(dtype), r["returns"].to(dtype), mask,
                               clip_range=cfg.value_clip)
        loss = policy.loss + cfg.vf_coef * value.loss
        scores = r["scores"].float()
        return loss, {
            "policy_loss": float(policy.loss.detach()), "value_loss": float(value.loss.detach()),
            "clip_fraction": float(policy.clip_fraction), "value_clip_fraction": float(value.clip_fraction),
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "kl": float(r["kl"].mean()), "kl_coef": self.loader.kl_coef,
            "entropy": float(masked_mean(entropy.detach(), mask)), "response_length": float(mask.sum(1).mean()),
        }

    def evaluate(self, model, autocast) -> dict[str, float]:
        """Held-out score of greedy completions (exact match, or the reward model's mean score)."""
        if not self.val:
            return {}
        r = greedy_rollouts(model, self.tok, [self.encode(t.prompt) for t in self.val], self.val,
                            max_tokens=self.cfg.max_tokens, pad_id=self.pad_id, reward_fn=self.reward_fn,
                            autocast=autocast)
        name = "val_exact_match" if self.reward_fn is exact_match_reward else "val_reward"
        return {name: float(self.scores(r, self.val).mean())}

    def tokenizer(self) -> Tokenizer | None:
        return self.tok


def finetune_ppo(recipe: PPORecipe, model: str | None = None, resume: bool = False,
                 console: Console | None = None) -> dict:
    """PPO of MODEL (or train.init_from) on generated arithmetic prompts, rewarded by exact match or
    by ppo.reward_model; writes train.out/model (with value_head.safetensors). train.micro_batch is
    prompts per micro-batch; each rollout trains ppo.ppo_epochs optimizer steps."""
    console = console or Console()
    tc, pc = recipe.train, recipe.ppo
    path, tok = starting_point(tc, model, pc.tokenizer)
    train = arithmetic_tasks(pc.train_tasks, tc.seed, "train", pc.max_operand, pc.ops)
    val = arithmetic_tasks(pc.val_tasks, 0, "val", pc.max_operand, pc.ops)
    reward_model = None
    if pc.reward_model:
        from lmforge.align.reward_model import load_reward_model
        from lmforge.train.trainer import resolve_device
        rm, head = load_reward_model(pc.reward_model, dtype=torch.float32, device=resolve_device(tc.device))
        if rm.cfg.vocab_size < tok.vocab_size:
            raise LmforgeError(f"ppo.reward_model has vocab_size {rm.cfg.vocab_size} < the policy tokenizer's "
                               f"{tok.vocab_size}: it must share the policy's tokenizer")
        reward_model = (rm.eval().requires_grad_(False), head)

    def reference(device):
        return load(path, dtype=torch.float32, device=device)
    objective = PPOObjective(tok, train, val, pc, tc.micro_batch, pad_token_id(tok), tc.grad_accum,
                             reward_fn=None if reward_model else exact_match_reward, reward_model=reward_model,
                             reference=reference)
    objective.lora, objective.base_model = recipe.lora, str(path)
    return fit(objective, tc, to_dict(recipe), None, "finetune", PPO_FILES, resume, console)
