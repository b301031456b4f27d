"""Generative math (GSM8K style): k-shot chain-of-thought prompts, answer extraction, exact match,
and maj@k (the most common extracted answer over k samples).

Data: JSONL with "question" and "answer", where the reference answer ends in "#### <number>"
(GSM8K's format); a bare number is accepted too. Extraction from the model's text: "strict" takes
the number after "####" (or "The answer is"), "flexible" takes the last number in the text.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from lmforge.errors import LmforgeError
from lmforge.eval.backend import GenerationRequest
from lmforge.eval.stats import mean_and_stderr
from lmforge.eval.tasks.base import Task, read_jsonl, require_path

NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"
STRICT = re.compile(r"(?:####|[Tt]he (?:final )?answer is:?)\s*(" + NUMBER + ")")
ANY_NUMBER = re.compile(NUMBER)
STOP = ("\n\nQuestion:", "Question:", "\n\n\n")


def normalize_number(text: str | None) -> str | None:
    """'$1,234.50' -> '1234.5'; exact decimal arithmetic so 3 == 3.0 == 3.00."""
    if text is None:
        return None
    cleaned = text.replace("$", "").replace(",", "").rstrip(".")
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    strict = STRICT.findall(text)
    if strict:
        return normalize_number(strict[0])
    if mode == "strict":
        return None
    numbers = ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(answer) -> str | None:
    text = str(answer)
    return normalize_number(text.split("####")[-1].strip()) if "####" in text else extract_answer(text)


@dataclass
class MathConfig:
    path: str | None = None
    shots: int = 4
    fewshot_path: str | None = None   # default: the first `shots` problems of the file (then not scored)
    max_new_tokens: int = 256
    samples: int = 1                  # k of maj@k; > 1 samples at `temperature`
    temperature: float = 0.6
    chat: bool = False                # send as a chat message (instruct models)
    limit: int = 0
    seed: int = 1234


class MathTask(Task):
    name = "gsm8k"
    config_class = MathConfig
    chunk_size = 16

    def items(self) -> list[dict]:
        cfg = self.config
        rows, self.skipped = read_jsonl(require_path(cfg.path, "gsm8k", "JSONL with question/answer"), "task gsm8k")
        rows = [r for r in rows if isinstance(r.get("question"), str) and "answer" in r]
        if cfg.fewshot_path:
            shots = read_jsonl(cfg.fewshot_path, "task gsm8k")[0][: cfg.shots]
        else:
            shots, rows = rows[: cfg.shots], rows[cfg.shots:]
        if len(shots) < cfg.shots or not rows:
            raise LmforgeError(f"task gsm8k: need {cfg.shots} few-shot examples and at least one problem")
        prefix = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        if cfg.limit:
            rows = rows[: cfg.limit]
        items = []
        for i, r in enumerate(rows):
            prompt = f"{prefix}Question: {r['question']}\nAnswer:"
            items.append({"key": f"{i}:{hashlib.sha1(prompt.encode()).hexdigest()[:16]}", "prompt": prompt,
                          "reference": reference_answer(r["answer"])})
        return items

    def evaluate(self, backend, items: list[dict]) -> list[dict]:
        cfg = self.config
        requests = []
        for it in items:
            requests.append(GenerationRequest(it["prompt"], cfg.max_new_tokens, 0.0, stop=STOP, chat=cfg.chat))
            requests += [GenerationRequest(it["prompt"], cfg.max_new_tokens, cfg.temperature, stop=STOP,
                                           seed=cfg.seed + s, chat=cfg.chat) for s in range(cfg.samples if cfg.samples > 1 else 0)]
        texts = iter(backend.generate(requests))
        results = []
        for _ in items:
            greedy = next(texts)
            sampled = [next(texts) for _ in range(cfg.samples if cfg.samples > 1 else 0)]
            results.append({"greedy": greedy, "samples": sampled})
        return results

    def aggregate(self, items, results, out_dir) -> dict:
        strict, flexible, majority = [], [], []
        for it, r in zip(items, results):
            ref = it["reference"]
            strict.append(float(ref is not None and extract_answer(r["greedy"], "strict") == ref))
            flexible.append(float(ref is not None and extract_answer(r["greedy"], "flexible") == ref))
            if r["samples"]:
                votes = Counter(a for a in (extract_answer(t) for t in r["samples"]) if a is not None)
                majority.append(float(bool(votes) and votes.most_common(1)[0][0] == ref))
        metrics, stderr = {}, {}
        for name, values in (("exact_match_strict", strict), ("exact_match_flexible", flexible),
                             (f"maj@{self.config.samples}", majority)):
            if values:
                metrics[name], stderr[name] = mean_and_stderr(values)
        return {"metrics": metrics, "stderr": stderr, "details": {"problems": len(items)}}
