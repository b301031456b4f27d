"""Training Medusa heads by self-distillation: the target writes its own greedy continuations of a
set of prompts (through the serving engine, batched), its final hidden states over those texts are
computed once (the target stays frozen), and head i learns to predict, from h_t, the token the
target wrote at t+1+i (cross-entropy through the target's own LM head). Training on the target's
outputs rather than on other text teaches the heads what the target will actually say, which is
what verification accepts. 10 % of the sequences are held out to report the loss and each head's
top-1 accuracy before and after."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.serve.speculative.medusa import MedusaHeads

TEMPLATES = ["Explain {} to a beginner.", "Write a short paragraph about {}.", "List five facts about {}.",
             "What are the pros and cons of {}?", "Write a Python function related to {} and explain it.",
             "Give step-by-step instructions involving {}.", "Summarise the history of {} in a few sentences.",
             "Write a short poem about {}.", "Answer briefly: why does {} matter?",
             "Compare {} with something similar.", "Describe {} in simple terms.",
             "Write a Python class that models {} and show how to use it.",
             "What are common misconceptions about {}?", "Explain {} to a ten-year-old.",
             "Give three questions a student might ask about {}, with answers.",
             "Write a short dialogue between two friends about {}.",
             "Write a product description for something related to {}.",
             "Summarise the key ideas of {} as bullet points.", "Write a Python script that prints facts about {}.",
             "Write a haiku about {}, then explain it."]
TOPICS = ["photosynthesis", "sorting algorithms", "the French Revolution", "volcanoes", "machine learning",
          "coffee", "the water cycle", "prime numbers", "electric cars", "the Moon", "recursion", "bread baking",
          "climate change", "the human heart", "chess", "JSON files", "the Roman Empire", "black holes",
          "gardening", "the internet", "honeybees", "the Olympic Games", "earthquakes", "linked lists",
          "solar panels", "the stock market", "jazz music", "vaccines", "the Amazon rainforest", "hash tables",
          "mountain climbing", "the printing press", "ocean tides", "regular expressions", "tea",
          "the immune system", "bicycles", "dinosaurs", "unit testing", "the Pythagorean theorem"]


def default_prompts(n: int, seed: int = 0) -> list[str]:
    """n instructions from the templates x topics grid (800), shuffled deterministically."""
    grid = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    if n > len(grid):
        raise LmforgeError(f"the built-in prompt set has {len(grid)} instructions, not {n}: pass a file of your own")
    random.Random(seed).shuffle(grid)
    return grid[:n]


@dataclass
class MedusaTrainConfig:
    num_heads: int = 4
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64            # positions per step (each trains every head)
    max_tokens: int = 128           # greedy tokens the target writes per prompt
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_heads", "steps", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"medusa {name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.lr < 1:
            raise LmforgeError(f"medusa lr must be in (0, 1) (got {self.lr})")


def self_distill(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                 progress=lambda message: None, chunk: int = 128) -> list[tuple[list[int], int]]:
    """-> (prompt + the target's greedy continuation, prompt length) per prompt; progress is told
    after every `chunk` prompts."""
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.sequence import SamplingParams
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_mb=256, max_num_seqs=32))
    room = [min(max_tokens, engine.max_model_len - len(p)) for p in prompts]
    kept = [(p, n) for p, n in zip(prompts, room) if n > 0]
    if not kept:
        raise LmforgeError("no prompt leaves room for generated tokens in the model's context")
    sequences = []
    for i in range(0, len(kept), chunk):
        part = kept[i:i + chunk]
        outs = engine.generate([p for p, _ in part], [SamplingParams(max_tokens=n, temperature=0) for _, n in part])
        sequences += [(p + o["token_ids"], len(p)) for (p, _), o in zip(part, outs)]
        progress(f"answered {len(sequences)}/{len(kept)} prompts "
                 f"({sum(len(t) - n for t, n in sequences)} tokens)")
    return sequences


@torch.no_grad()
def training_pairs(model, sequences: list[tuple[list[int], int]], num_heads: int):
    """-> hidden [N, dim] (float32) at every position from the last prompt token on, and targets
    [N, K]: the token at t+1+i for head i (-100 past the end)."""
    device = next(model.parameters()).device
    hs, ys = [], []
    for tokens, prompt_len in sequences:
        h = model(torch.tensor([tokens], device=device), return_hidden=True)[0].float()
        ids = torch.tensor(tokens + [-100] * (num_heads + 1))
        start = prompt_len - 1
        pos = torch.arange(start, len(tokens) - 2)     # at least one head has a target
        if len(pos) == 0:
            continue
        hs.append(h[start:len(tokens) - 2].cpu())
        ys.append(torch.stack([ids[pos + 1 + i] for i in range(1, num_heads + 1)], 1))
    if not hs:
        raise LmforgeError("the generated sequences are too short to train medusa heads on")
    return torch.cat(hs), torch.cat(ys)


def head_loss(heads: MedusaHeads, lm_weight: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(heads(h), lm_weight)               # [B, K, V]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(heads: MedusaHeads, lm_weight: torch.Tensor, h: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> dict:
    """Mean loss and each head's top-1 accuracy on (h, y)."""
    total, count = 0.0, 0
    hits, seen = torch.zeros(heads.num_heads), torch.zeros(heads.num_heads)
    for i in range(0, len(h), chunk):
        hb, yb = h[i:i + chunk], y[i:i + chunk]
        logits = F.linear(heads(hb), lm_weight).float()
        mask = yb != -100
        total += float(F.cross_entropy(logits[mask], yb[mask], reduction="sum"))
        count += int(mask.sum())
        hits += ((logits.argmax(-1) == yb) & mask).sum(0).float()
        seen += mask.sum(0).float()
    return {"loss": total / max(count, 1), "top1": [round(float(a), 4) for a in hits / seen.clamp_min(1)]}


def train_heads(model, h: torch.Tensor, y: torch.Tensor, config: MedusaTrainConfig,
                heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                progress=lambda message: None) -> tuple[MedusaHeads, dict]:
    """Fit fresh heads to (h, y) with AdamW; the target's LM head is read, never changed."""
    config.validate()
    torch.manual_seed(config.seed)
    lm_weight = model.lm_head.weight.detach().float().to(h.device)
    heads = MedusaHeads(model.cfg.dim, config.num_heads, model.cfg.vocab_size).to(h.device)
    report = {"before": evaluate(heads, lm_weight, *heldout)} if heldout else {}
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / config.steps))
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in range(config.steps):
        idx = torch.randint(0, len(h), (min(config.batch_size, len(h)),), generator=g)
        loss = head_loss(heads, lm_weight, h[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, config.steps // 10) == 0:
            progress(f"step {step + 1}/{config.steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    report["train_loss"] = {"first": sum(losses[:10]) / len(losses[:10]), "last": sum(losses[-10:]) / len(losses[-10:])}
    if heldout:
        report["after"] = evaluate(heads, lm_weight, *heldout)
    return heads.eval(), report


def train_medusa(model, tokenizer, prompts: list[list[int]], config: MedusaTrainConfig,
                 progress=lambda message: None) -> tuple[MedusaHeads, dict]:
    """Self-distillation end to end: generate, compute hidden states, train, report."""
    config.validate()
    if len(prompts) < 2:
        raise LmforgeError("medusa training needs at least 2 prompts (one is held out)")
    progress(f"generating the model's greedy answers to {len(prompts)} prompts (<= {config.max_tokens} tokens each)")
    sequences = self_distill(model, tokenizer, prompts, config.max_tokens, progress)
    progress(f"training {config.num_heads} heads for {config.steps} steps")
    n_held = max(1, len(sequences) // 10)
    train_h, train_y = training_pairs(model, sequences[n_held:], config.num_heads)
    held = training_pairs(model, sequences[:n_held], config.num_heads)
    heads, report = train_heads(model, train_h, train_y, config, held, progress)
    report.update(sequences=len(sequences), positions=len(train_h),
                  generated_tokens=sum(len(t) - n for t, n in sequences))
    return heads, report
