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
from lmforge.train.examples import IGNORE, Example, collate
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit


@dataclass
class SFTConfig:
    data: str = ""              # JSONL with `messages` per line; "" -> stdlib functions (signature+docstring -> body)
    val_data: str = ""          # held-out JSONL; "" -> the stdlib val split when data is "", else no held-out loss
    tokenizer: str = ""         # "" -> the model's own (beside it, in its run, or inside the .gguf)
    max_examples: int = 2000    # training chats kept (the first that fit train.seq_len + 1 tokens)
    val_examples: int = 128
    pack: bool = False          # pack each micro-batch's chats into as few rows of train.seq_len as fit (no cross-attention)

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


def collate_packed(examples: list[Example], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """The chats of `collate`, first-fit packed into rows of at most `width` positions, plus doc_ids
    [R, T]: each chat's run of positions has its own id (padding -1), so the model's attention never
    crosses a chat boundary and positions restart at 0 in each; no label crosses one either, since
    each chat is shifted on its own. Same loss tokens as `collate`, fewer padded positions."""
    rows: list[list[int]] = []  # example indices per row
    used: list[int] = []
    for e, (ids, _) in enumerate(examples):
        n = len(ids) - 1
        if n > width:
            raise LmforgeError(f"an SFT example of {n + 1} tokens does not fit a packed row of {width + 1}")
        r = next((r for r, u in enumerate(used) if u + n <= width), None)
        if r is None:
            r = len(rows)
            rows.append([])
            used.append(0)
        rows[r].append(e)
        used[r] += n
    t = max(used)
    tokens = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    doc_ids = torch.full((len(rows), t), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for doc, e in enumerate(members):
            one = collate([examples[e]], pad_id)
            n = one["tokens"].shape[1]
            tokens[r, pos:pos + n], labels[r, pos:pos + n] = one["tokens"][0], one["labels"][0]
            doc_ids[r, pos:pos + n] = doc
            pos += n
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}


class ChatLoader(EpochLoader):
    """Micro-batches of chats, right-padded (see `collate`), or packed into rows of `pack_width`
    positions (see `collate_packed`) when it is set."""

    what = "SFT examples"
    pack_width: int | None = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        chats = [self.examples[i] for i in self.next_indices()]
        if self.pack_width:
            return collate_packed(chats, self.pad_id, self.pack_width)
        return collate(chats, self.pad_id)


def sft_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's trained labels (fused with the LM head); a packed batch
    carries doc_ids, a left-padded one an attention_mask."""
    return model(batch["tokens"], targets=batch["labels"], doc_ids=batch.get("doc_ids"),
                 attention_mask=batch.get("attention_mask"))


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
        total += float(sft_loss(model, batch)) * n
        count += n
    return total / max(count, 1)


class SFTObjective(LoraHooks):
    def __init__(self, tok: Tokenizer, train: list[Example], val: list[Example], eval_batch: int,
                 pack_width: int | None = None):
        self.tok, self.train, self.val, self.eval_batch, self.pack_width = tok, train, val, eval_batch, pack_width
        self.pad_id = pad_token_id(tok)
        self.vocab_size = tok.vocab_size

    def batches(self, micro_batch: int, seed: int) -> ChatLoader:
        loader = ChatLoader(self.train, micro_batch, seed, self.pad_id)
        loader.pack_width = self.pack_width
        return loader

    def loss_tokens(self, batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch):
        return sft_loss(model, batch), {}

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
    return SFTObjective(tok, train, val, tc.micro_batch, pack_width=tc.seq_len if sc.pack else None)


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
