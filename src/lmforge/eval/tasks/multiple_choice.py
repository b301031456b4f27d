"""Multiple choice by log-likelihood with k-shot prompts (MMLU / C-Eval / ARC style).

Each choice is a continuation of the same prompt; the model's answer is the choice with the
highest log-likelihood (accuracy) or the highest log-likelihood per byte of the continuation
(length-normalised accuracy, fairer when choices differ in length).
Prompt styles: "letters" (MMLU: the choices are listed, the continuation is " A"/" B"/...) and
"cloze" (ARC: the continuation is the choice text itself).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.stats import mean_and_stderr
from lmforge.eval.tasks.base import Task, require_path
from lmforge.eval.tasks.mc_formats import LETTERS, read_multiple_choice


@dataclass
class MultipleChoiceConfig:
    path: str | None = None
    shots: int = 5
    fewshot_path: str | None = None  # default: other questions of the same subject in the same data
    style: str = "letters"           # letters | cloze
    limit: int = 0                   # questions (0: all)

    def __post_init__(self):
        if self.style not in ("letters", "cloze"):
            raise ValueError(f"style must be letters or cloze, got {self.style!r}")
        if self.shots < 0:
            raise ValueError("shots must be >= 0")


def format_question(q: dict, style: str) -> str:
    if style == "cloze":
        return f"Question: {q['question']}\nAnswer:"
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"]))
    return f"{q['question']}{options}\nAnswer:"


def continuations(q: dict, style: str) -> list[str]:
    return [f" {c}" if style == "cloze" else f" {LETTERS[i]}" for i, c in enumerate(q["choices"])]


def build_prompt(q: dict, shots: list[dict], style: str) -> str:
    header = f"The following are multiple choice questions (with answers) about {q['subject']}.\n\n" \
        if style == "letters" and q.get("subject") else ""
    examples = "".join(format_question(s, style) + continuations(s, style)[s["answer"]] + "\n\n" for s in shots)
    return header + examples + format_question(q, style)


class MultipleChoiceTask(Task):
    name = "mc"
    config_class = MultipleChoiceConfig
    chunk_size = 64

    def items(self) -> list[dict]:
        cfg = self.config
        questions, self.skipped = read_multiple_choice(require_path(cfg.path, "mc", "MMLU/C-Eval CSV or ARC JSONL"))
        pool = read_multiple_choice(cfg.fewshot_path)[0] if cfg.fewshot_path else questions
        by_subject = defaultdict(list)
        for q in pool:
            by_subject[q["subject"]].append(q)
        if cfg.limit:
            questions = questions[: cfg.limit]
        items = []
        for i, q in enumerate(questions):
            candidates = by_subject.get(q["subject"]) or pool
            shots = [s for s in candidates if s is not q][: cfg.shots]
            if len(shots) < cfg.shots:
                raise LmforgeError(f"task mc: only {len(shots)} few-shot examples for subject {q['subject']!r} "
                                   f"(shots={cfg.shots}); lower shots or give fewshot_path")
            prompt = build_prompt(q, shots, cfg.style)
            key = hashlib.sha1((prompt + "\x00".join(q["choices"])).encode()).hexdigest()[:16]
            items.append({"key": f"{i}:{key}", "prompt": prompt, "continuations": continuations(q, cfg.style),
                          "answer": q["answer"], "subject": q["subject"]})
        return items

    def evaluate(self, backend, items: list[dict]) -> list[dict]:
        requests = [(it["prompt"], c) for it in items for c in it["continuations"]]
        scores = iter(backend.loglikelihood(requests))
        results = []
        for it in items:
            pairs = [next(scores) for _ in it["continuations"]]
            results.append({"logprobs": [lp for lp, _ in pairs], "greedy": [g for _, g in pairs]})
        return results

    def aggregate(self, items, results, out_dir) -> dict:
        acc, acc_norm, per_subject = [], [], defaultdict(list)
        for it, r in zip(items, results):
            lp = np.array(r["logprobs"])
            lengths = np.array([len(c.encode("utf-8")) for c in it["continuations"]])
            acc.append(float(np.argmax(lp) == it["answer"]))
            acc_norm.append(float(np.argmax(lp / lengths) == it["answer"]))
            per_subject[it["subject"]].append(acc[-1])
        (a, a_se), (n, n_se) = mean_and_stderr(acc), mean_and_stderr(acc_norm)
        return {"metrics": {"acc": a, "acc_norm": n}, "stderr": {"acc": a_se, "acc_norm": n_se},
                "details": {"questions": len(items), "skipped_rows": getattr(self, "skipped", 0),
                            "chance": float(np.mean([1 / len(it["continuations"]) for it in items])),
                            "acc_by_subject": {s: float(np.mean(v)) for s, v in sorted(per_subject.items())}}}
