"""The seam between the training loop and what is being trained.

The loop (`lmforge.train.trainer.fit`) owns schedules, accumulation, clipping, logging, checkpoints
and exact resume; an objective owns the data and the loss. Pretraining is one objective; SFT, reward
models, DPO, PPO and GRPO are others (`lmforge.align`).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from lmforge.data.shards import TokenShards, shard_tokenizer_dir
from lmforge.errors import LmforgeError
from lmforge.model.scoring import score_tokens
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.train.loader import ShardLoader


class BatchLoader(Protocol):
    """Deterministic batches whose whole position is `state_dict()` (saved in every checkpoint)."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Objective(Protocol):
    vocab_size: int  # token ids the data uses; the model must have at least this many

    def batches(self, micro_batch: int, seed: int) -> BatchLoader: ...

    def loss_tokens(self, batch) -> int:
        """How many tokens the batch's loss averages over. The loop weights each micro-batch by its
        share of the step's loss tokens, so an accumulated step's loss is the mean over all of them
        whatever the split into micro-batches."""
        ...

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """-> (mean loss over the batch's loss tokens, extra metrics: token-weighted means, logged)."""
        ...

    def evaluate(self, model, autocast) -> dict[str, float]:
        """Held-out metrics (e.g. {"val_loss": ...}); {} when there is no held-out data."""
        ...

    def tokenizer(self) -> Tokenizer | None:
        """Saved beside the final model, so the model folder is self-contained."""
        ...

    # Optional hooks (looked up with getattr; see `prepare_model` / `finish_model` below):
    #   prepare_model(model) -> model: after the starting weights are loaded and before the optimizer
    #     is built: freeze weights, wrap layers (LoRA), attach heads. Only parameters left with
    #     requires_grad train; a model it changes is checkpointed by its trainable parameters alone.
    #   finish_model(model, out_dir) -> (plain Transformer, {file name: path}): after the last step;
    #     writes run-level outputs (e.g. out_dir/adapter) and returns the model saved as out_dir/model
    #     with the extra files copied beside it.


def prepare_model(objective, model):
    hook = getattr(objective, "prepare_model", None)
    return hook(model) if hook is not None else model


def finish_model(objective, model, out_dir):
    hook = getattr(objective, "finish_model", None)
    return hook(model, out_dir) if hook is not None else (model, {})


def to_device(batch, device: torch.device):
    """A tensor, or a dict of tensors, moved to `device`."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def evaluate_loss(model, shards: TokenShards, seq_len: int, n_tokens: int, batch: int, autocast) -> float:
    """Mean next-token loss over the first n_tokens of a split, in windows of seq_len (the one scorer)."""
    tokens = shards.slice(0, min(n_tokens, len(shards) - 1) + 1)
    return score_tokens(model, tokens, window=seq_len, batch_size=batch, autocast=autocast).loss


class PretrainObjective:
    """Next-token prediction on windows of token shards, through the model's fused LM loss."""

    def __init__(self, data: str, seq_len: int, eval_tokens: int, eval_batch: int):
        if not data:
            raise LmforgeError("train.data must point to a token shard directory (see `lmforge data shards`)")
        self.data, self.seq_len, self.eval_tokens, self.eval_batch = data, seq_len, eval_tokens, eval_batch
        self.shards = TokenShards(data, "train")
        try:
            self.val = TokenShards(data, "val")
        except LmforgeError:
            self.val = None
        self.vocab_size = self.shards.vocab_size

    def batches(self, micro_batch: int, seed: int) -> ShardLoader:
        return ShardLoader(self.shards, self.seq_len, micro_batch, seed)

    def loss_tokens(self, batch: torch.Tensor) -> int:
        return batch[:, 1:].numel()

    def loss(self, model, batch: torch.Tensor):
        return model(batch[:, :-1], targets=batch[:, 1:]), {}

    def evaluate(self, model, autocast) -> dict[str, float]:
        if self.val is None:
            return {}
        return {"val_loss": evaluate_loss(model, self.val, self.seq_len, self.eval_tokens, self.eval_batch, autocast)}

    def tokenizer(self) -> Tokenizer | None:
        tok_dir = shard_tokenizer_dir(self.data)
        return load_tokenizer(tok_dir) if tok_dir else None
