"""A Bradley–Terry reward model as an objective on the shared training loop.

The reward of a sequence is a scalar head on the final hidden state of its last real token:
r = h_last . w, with w the weight of a separate nn.Linear(dim, 1, bias=False) (a bias cancels in
every Bradley–Terry difference). The objective attaches it to the model in `prepare_model` (after
LoRA, when the recipe asks for it: the head always trains), so the shared loop optimises and
checkpoints it; `finish_model` detaches it and writes it as `reward_head.safetensors`
({"weight": [1, dim]}) into the model folder, where `load_reward_model` reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.align.dpo import preference_examples
from lmforge.align.finetune_config import LoraHooks, LoraSettings
from lmforge.align.preference_data import PairExample, PairLoader, collate_pairs
from lmforge.align.reward import bradley_terry_loss
from lmforge.align.sft import pad_token_id
from lmforge.config import check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.outputs import atomic_write_bytes
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit

HEAD_FILE = "reward_head.safetensors"


@dataclass
class RMConfig:
    data: str = ""              # JSONL with prompt/chosen/rejected per line; "" -> stdlib real vs corrupted bodies
    val_data: str = ""
    tokenizer: str = ""
    max_examples: int = 1000
    val_examples: int = 64
    margin: float = 0.0         # Bradley–Terry margin m: -log sigma(r_c - r_r - m)
    center_rewards: float = 0.0  # coefficient of mean (r_c + r_r)^2; 0 = off
    data_seed: int = 0

    def __post_init__(self):
        check_positive(self, "rm", "max_examples", "val_examples")
        if self.center_rewards < 0:
            raise LmforgeError(f"rm.center_rewards must be >= 0, got {self.center_rewards}")


@dataclass
class RMRecipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


HEAD_ATTR = "reward_head"
RM_FILES = [*TRAIN_FILES, HEAD_FILE]


def attach_reward_head(model) -> nn.Linear:
    """A fresh trainable scalar head (nn.Linear default init, from the seeded RNG) on `model`."""
    w = model.lm_head.weight
    head = nn.Linear(w.shape[1], 1, bias=False, device=w.device, dtype=w.dtype)
    setattr(model, HEAD_ATTR, head)
    return head


def last_token_hidden(model, full: torch.Tensor, full_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The final hidden state [N, dim] of each row's last real token (right padding)."""
    hidden = model(full, attention_mask=full_mask, return_hidden=True)
    return hidden[torch.arange(full.shape[0], device=full.device), lengths.to(full.device) - 1]


def sequence_rewards(model, batch: dict[str, torch.Tensor], head: torch.Tensor) -> torch.Tensor:
    """[2B] rewards (chosen rows, then rejected) with head vector `head` [dim]."""
    h = last_token_hidden(model, batch["full"], batch["full_mask"], batch["lengths"])
    return h @ head.to(h.dtype)


class RewardObjective(LoraHooks):
    def __init__(self, tok: Tokenizer | None, train: list[PairExample], val: list[PairExample], cfg: RMConfig,
                 eval_batch: int, pad_id: int, vocab_size: int | None = None):
        self.tok, self.train, self.val, self.cfg, self.eval_batch, self.pad_id = tok, train, val, cfg, eval_batch, pad_id
        self.vocab_size = vocab_size if vocab_size is not None else tok.vocab_size

    def batches(self, micro_batch: int, seed: int) -> PairLoader:
        return PairLoader(self.train, micro_batch, seed, self.pad_id)

    def loss_tokens(self, batch) -> int:
        return batch["full"].shape[0] // 2

    def prepare_model(self, model):
        model = super().prepare_model(model)
        attach_reward_head(model)
        return model

    def finish_model(self, model, out: Path):
        """Detach the head, write it as out/reward_head.safetensors (copied into out/model), then
        the LoRA outputs (adapter + merged model) when there are adapters."""
        head = getattr(model, HEAD_ATTR)
        delattr(model, HEAD_ATTR)
        path = save_reward_head(out, head.weight[0])
        model, extra = super().finish_model(model, out)
        return model, {**extra, HEAD_FILE: path}

    def pair_loss(self, model, batch):
        head = getattr(model, HEAD_ATTR, None)
        if head is None:
            raise LmforgeError("the reward objective's model has no reward head (prepare_model attaches it)")
        r = sequence_rewards(model, batch, head.weight[0])
        b = r.shape[0] // 2
        margin = torch.full((b,), self.cfg.margin, dtype=r.dtype, device=r.device) if self.cfg.margin else None
        out = bradley_terry_loss(r[:b], r[b:], margin=margin,
                                 center_rewards_coefficient=self.cfg.center_rewards or None)
        return out, r.detach()

    def loss(self, model, batch):
        out, r = self.pair_loss(model, batch)
        return out.loss, {"accuracy": float(out.accuracy), "margin": float(out.margin),
                          "reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0}

    def evaluate(self, model, autocast) -> dict[str, float]:
        if not self.val:
            return {}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}
        with torch.no_grad(), autocast():
            for i in range(0, len(self.val), self.eval_batch):
                chunk = self.val[i:i + self.eval_batch]
                out, _ = self.pair_loss(model, {k: v.to(device) for k, v in collate_pairs(chunk, self.pad_id).items()})
                for k, v in (("val_loss", out.loss), ("val_accuracy", out.accuracy), ("val_margin", out.margin)):
                    sums[k] += float(v) * len(chunk)
        model.train(was_training)
        return {k: v / len(self.val) for k, v in sums.items()}

    def tokenizer(self) -> Tokenizer | None:
        return self.tok


def save_reward_head(directory: str | Path, head: torch.Tensor) -> Path:
    """Write head vector [dim] as directory/reward_head.safetensors ({"weight": [1, dim]}), atomically."""
    path = Path(directory) / HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({"weight": head.detach().cpu()[None].contiguous()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path


def load_reward_model(model_dir: str | Path, dtype=None, device=None) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model, head [dim]) of a trained reward model folder; reward = sequence_rewards(model, batch, head)."""
    path = Path(model_dir) / HEAD_FILE
    if not path.is_file():
        raise LmforgeError(f"{model_dir} is not a reward model (no {HEAD_FILE})")
    model = load(model_dir, dtype=dtype, device=device)
    with safe_open(str(path), "pt") as f:
        head = f.get_tensor("weight")[0]
    return model, head.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)


def finetune_rm(recipe: RMRecipe, model: str | None = None, resume: bool = False,
                console: Console | None = None) -> dict:
    """A reward model from MODEL (or train.init_from) into train.out; train.out/model holds the
    weights, the tokenizer and reward_head.safetensors (with LoRA: the merged weights; the adapter
    is in train.out/adapter)."""
    console = console or Console()
    tc, rc = recipe.train, recipe.rm
    path, tok = starting_point(tc, model, rc.tokenizer)
    pad_id = pad_token_id(tok)
    train, val = preference_examples(rc, "rm", tok, tc.seq_len + 1, console)
    objective = RewardObjective(tok, train, val, rc, tc.micro_batch, pad_id)
    objective.lora, objective.base_model = recipe.lora, str(path)
    return fit(objective, tc, to_dict(recipe), None, "finetune", RM_FILES, resume, console)
