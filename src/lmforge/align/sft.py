"""Supervised finetuning: chats with the loss on assistant tokens only, through the shared
training loop (`lmforge.train.trainer.fit`) and the model's fused cross-entropy."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console

from lmforge.align.data import read_chat_jsonl, stdlib_chats, tokenize_chat
from lmforge.align.finetune_config import LoraHooks, LoraSettings
from lmforge.config import check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.tokenizer import PAD
from lmforge.train.config import TrainConfig
from lmforge.train.epoch_loader import EpochLoader
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit

IGNORE = -100  # the fused cross-entropy's ignore_index

Example = tuple[list[int], list[bool]]  # token ids, trained flag per token


@dataclass
class SFTConfig:
    data: str = ""              # JSONL with `messages` per line; "" -> stdlib functions (signature+docstring -> body)
    val_data: str = ""          # held-out JSONL; "" -> the stdlib val split when data is "", else no held-out loss
    tokenizer: str = ""         # "" -> the model's own (beside it, in its run, or inside the .gguf)
    max_examples: int = 2000    # training chats kept (the first that fit train.seq_len + 1 tokens)
    val_examples: int = 128

    def __post_init__(self):
        check_positive(self, "sft", "max_examples", "val_examples")


@dataclass
class SFTRecipe:
    """train.global_batch_tokens / (micro_batch * seq_len) is the accumulation: an optimizer step
    sees micro_batch * grad_accum chats, each right-padded to the longest in its micro-batch.
    The SFT settings (lr, schedule, sizes) live in recipes/sft-tiny.yaml, the CLI's default recipe."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


def build_examples(tok: Tokenizer, chats, max_len: int, limit: int) -> tuple[list[Example], int]:
    """The first `limit` chats that fit max_len tokens, tokenised with their mask; -> (examples, n too long)."""
    kept, too_long = [], 0
    for messages in chats:
        ids, trained = tokenize_chat(tok, messages)
        if len(ids) > max_len:
            too_long += 1
            continue
        kept.append((ids, trained))
        if len(kept) >= limit:
            break
    return kept, too_long


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs [B, T] and shifted labels [B, T]; a label is kept where the token it
    predicts is trained. Padding is masked by position (past each chat's length), never by token
    id, so an end-of-turn or EOS token that equals the pad token is still trained."""
    width = max(len(ids) for ids, _ in examples) - 1
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, trained) in enumerate(examples):
        n = len(ids) - 1
        tokens[row, :n] = torch.tensor(ids[:-1])
        labels[row, :n] = torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])])
    return {"tokens": tokens, "labels": labels}


class ChatLoader(EpochLoader):
    """Micro-batches of chats, right-padded (see `collate`)."""

    what = "SFT examples"

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id)


def pad_token_id(tok: Tokenizer) -> int:
    """The tokenizer's pad token, else EOS (as in many chat models: then pad == eos)."""
    pad = tok.hf.token_to_id(PAD)
    pad = pad if pad is not None else tok.eos_id
    if pad is None:
        raise LmforgeError("the tokenizer has neither a pad nor an EOS token to pad with")
    return pad


def mean_masked_loss(model, batches) -> float:
    """Mean loss per trained token over `batches` (each weighted by its trained-token count)."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != IGNORE).sum())
        total += float(model(batch["tokens"], targets=batch["labels"])) * n
        count += n
    return total / max(count, 1)


class SFTObjective(LoraHooks):
    def __init__(self, tok: Tokenizer, train: list[Example], val: list[Example], eval_batch: int):
        self.tok, self.train, self.val, self.eval_batch = tok, train, val, eval_batch
        self.pad_id = pad_token_id(tok)
        self.vocab_size = tok.vocab_size

    def batches(self, micro_batch: int, seed: int) -> ChatLoader:
        return ChatLoader(self.train, micro_batch, seed, self.pad_id)

    def loss_tokens(self, batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch):
        return model(batch["tokens"], targets=batch["labels"]), {}

    def evaluate(self, model, autocast) -> dict[str, float]:
        if not self.val:
            return {}
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in collate(self.val[i:i + self.eval_batch], self.pad_id).items()}
                   for i in range(0, len(self.val), self.eval_batch)]
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast():
            loss = mean_masked_loss(model, batches)
        model.train(was_training)
        return {"val_loss": loss}

    def tokenizer(self) -> Tokenizer:
        return self.tok


def sft_objective(recipe: SFTRecipe, tok: Tokenizer, console: Console) -> SFTObjective:
    tc, sc = recipe.train, recipe.sft
    max_len = tc.seq_len + 1  # inputs and labels are the chat shifted by one
    if sc.data:
        train_chats, val_chats = read_chat_jsonl(sc.data), read_chat_jsonl(sc.val_data) if sc.val_data else []
    else:
        if sc.val_data:
            raise LmforgeError("sft.val_data needs sft.data (the default data has its own val split)")
        train_chats, val_chats = stdlib_chats("train"), stdlib_chats("val")
    train, dropped = build_examples(tok, train_chats, max_len, sc.max_examples)
    val, val_dropped = build_examples(tok, val_chats, max_len, sc.val_examples)
    if not train:
        raise LmforgeError(f"no SFT chat fits train.seq_len={tc.seq_len} tokens")
    console.print(f"SFT data: {len(train)} train chats, {len(val)} held-out "
                  f"({dropped + val_dropped} longer than {max_len} tokens skipped)", highlight=False)
    return SFTObjective(tok, train, val, tc.micro_batch)


def finetune_sft(recipe: SFTRecipe, model: str | None = None, resume: bool = False,
                 console: Console | None = None) -> dict:
    """SFT of MODEL (or train.init_from; default the bundled SmolLM2-135M-Instruct) into train.out;
    the finished model folder train.out/model holds the weights and the tokenizer."""
    console = console or Console()
    tc = recipe.train
    path, tok = starting_point(tc, model, recipe.sft.tokenizer)
    if not tok.chat_template:
        raise LmforgeError("the tokenizer has no chat template; SFT formats chats with it")
    objective = sft_objective(recipe, tok, console)
    objective.lora, objective.base_model = recipe.lora, str(path)
    return fit(objective, tc, to_dict(recipe), None, "finetune", TRAIN_FILES, resume, console)
