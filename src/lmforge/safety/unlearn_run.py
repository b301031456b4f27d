"""`lmforge safety unlearn`: a model made to forget (prompt, answer) pairs through the training loop,
with forget / retain exact-match before and after."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console

from lmforge.config import check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.safety.unlearn import METHODS, UnlearnObjective
from lmforge.train.config import TrainConfig
from lmforge.train.epoch_loader import jsonl_rows
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit


@dataclass
class UnlearnConfig:
    method: str = "npo"        # ga, graddiff or npo
    forget: str = ""           # JSONL: {"prompt": ..., "answer": ...} per line, to be forgotten
    retain: str = ""           # JSONL of the same shape, to be kept (graddiff and npo train on it)
    beta: float = 0.1          # NPO's inverse temperature
    retain_weight: float = 1.0
    tokenizer: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise LmforgeError(f"unlearn.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_positive(self, "unlearn", "beta")


@dataclass
class UnlearnRecipe:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out="runs/unlearn", seq_len=128, micro_batch=4, global_batch_tokens=512, max_steps=20, lr=1e-5,
        schedule="cosine", warmup=0.0, weight_decay=0.0, eval_every=1000, ckpt_every=1000, log_every=5))
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)


def read_pairs(path: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for n, row in jsonl_rows(path, what):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            raise LmforgeError(f"{path}:{n}: each line must be an object with string 'prompt' and 'answer'")
        pairs.append((row["prompt"], row["answer"]))
    return pairs


def tokenize_pair(tok, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
    """prompt + answer (+ EOS): the answer tokens (and EOS) are the trained ones."""
    p, a = tok.encode(prompt), tok.encode(answer) + ([tok.eos_id] if tok.eos_id is not None else [])
    return p + a, [False] * len(p) + [True] * len(a)


def answer_hits(model, tok, prompt: str, answer: str) -> list[bool]:
    """For each answer token, whether it is the model's greedy choice given the gold tokens before it
    (one teacher-forced pass)."""
    ids, trained = tokenize_pair(tok, prompt, answer)
    start = trained.index(True)  # first answer token
    if start == 0:
        raise LmforgeError("a non-empty prompt must come before each answer")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    hit = (model(x[:, :-1])[0].argmax(-1) == x[0, 1:]).tolist()
    return [h for h, t in zip(hit, trained[1:]) if t]


@torch.no_grad()
def exact_match(model, tok, pairs: list[tuple[str, str]]) -> float:
    """Fraction of answers whose every token is the model's greedy choice given the gold prefix."""
    if not pairs:
        return float("nan")
    return sum(all(answer_hits(model, tok, p, a)) for p, a in pairs) / len(pairs)


@torch.no_grad()
def extraction_strength(model, tok, pairs: list[tuple[str, str]]) -> float:
    """Mean extraction strength (Carlini et al. 2021; the ES of TOFU-style unlearning reports): for an
    answer y after prompt x, ES = 1 - k/|y| with k the shortest gold prefix y[:k] from which greedy
    decoding reproduces the rest of y exactly. 1: the prompt alone extracts the answer; 0: not even
    the answer's last token is predicted. Greedy decoding from y[:k] reproduces y[k:] exactly when
    every token from k on is the argmax given the gold tokens before it (each greedy step then sees
    the gold context), so one teacher-forced pass gives k: one past the last mispredicted token."""
    if not pairs:
        return float("nan")
    total = 0.0
    for prompt, answer in pairs:
        hits = answer_hits(model, tok, prompt, answer)
        misses = [j for j, h in enumerate(hits) if not h]
        k = misses[-1] + 1 if misses else 0
        total += 1 - k / len(hits)
    return total / len(pairs)


def unlearn(recipe: UnlearnRecipe, model: str | None = None, resume: bool = False,
            console: Console | None = None) -> dict:
    console = console or Console()
    tc, uc = recipe.train, recipe.unlearn
    if not uc.forget:
        raise LmforgeError("unlearn.forget must name a JSONL file of {prompt, answer} pairs")
    forget_pairs = read_pairs(uc.forget, "forget set")
    retain_pairs = read_pairs(uc.retain, "retain set") if uc.retain else []
    path, tok = starting_point(tc, model, uc.tokenizer or None)
    pad = tok.eos_id if tok.eos_id is not None else 0
    forget = [tokenize_pair(tok, *p) for p in forget_pairs]
    retain = [tokenize_pair(tok, *p) for p in retain_pairs]
    if any(len(ids) > tc.seq_len + 1 for ids, _ in forget + retain):
        raise LmforgeError(f"a pair is longer than train.seq_len={tc.seq_len} tokens")
    before = load(path, dtype=torch.float32)
    metrics = {"forget_em_before": exact_match(before, tok, forget_pairs),
               "retain_em_before": exact_match(before, tok, retain_pairs),
               "forget_es_before": extraction_strength(before, tok, forget_pairs)}
    del before
    objective = UnlearnObjective(uc.method, forget, retain, pad, tok.vocab_size, uc.beta, uc.retain_weight, tok)
    summary = fit(objective, tc, to_dict(recipe), None, "finetune", TRAIN_FILES, resume, console)
    after = load(summary["model_dir"], dtype=torch.float32)
    metrics.update(forget_em_after=exact_match(after, tok, forget_pairs),
                   retain_em_after=exact_match(after, tok, retain_pairs),
                   forget_es_after=extraction_strength(after, tok, forget_pairs))
    return {**summary, **metrics}
