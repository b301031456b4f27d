"""Pluggable scorers for the guard: `score(analyses) -> probabilities of attack`.

- `RuleClassifier`: the strongest heuristic's weight (no training).
- `NgramClassifier`: logistic regression in torch over hashed character n-grams of the normalised
  text and its decoded payloads, plus one feature per rule (hit in the text / in a decoded view)
  and per normalisation trick. Trained in seconds on the generated attack and benign sets.
- `HFClassifier`: any Hugging Face sequence classifier saved on disk (e.g. a Prompt-Guard-style
  model), maximised with the rules' score so the normalisation still counts.
"""
from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.safety.analysis import Analysis
from lmforge.safety.heuristics import FINDING_WEIGHTS, RULES


class Classifier(Protocol):
    name: str
    threshold: float   # the score at or above which a prompt counts as an attack

    def score(self, analyses: list[Analysis]) -> np.ndarray: ...


class RuleClassifier:
    name = "rules"
    threshold = 0.5

    def score(self, analyses: list[Analysis]) -> np.ndarray:
        return np.array([a.rule_score for a in analyses], dtype=np.float64)


_DENSE = [f"rule:{r}" for r in RULES] + [f"hidden:{r}" for r in RULES] + [f"finding:{f}" for f in FINDING_WEIGHTS]


def _dense(a: Analysis) -> list[float]:
    on = {f"rule:{h.rule}" if h.view == "text" else f"hidden:{h.rule}" for h in a.hits}
    on |= {f"finding:{f}" for f in a.norm.findings}
    return [1.0 if k in on else 0.0 for k in _DENSE]


def _ngrams(text: str, buckets: int, sizes=(2, 3, 4, 5)) -> list[int]:
    s = " ".join(text.lower().split())
    grams = {s[i:i + n] for n in sizes for i in range(len(s) - n + 1)}
    return sorted({zlib.crc32(g.encode("utf-8")) % buckets for g in grams}) or [0]


class NgramClassifier:
    name = "ngram-logreg"
    RULE_PRIOR = 4.0  # a rule's weight starts at (and is pulled towards) this times its hand-set weight

    def __init__(self, buckets: int = 1 << 18, threshold: float = 0.5):
        self.buckets, self.threshold = buckets, threshold
        self.w = torch.zeros(buckets)
        # a rule or trick can only raise the score (weights >= 0); one absent from training keeps
        # its prior instead of being unlearnt, which is what lets a held-out family still be caught
        self.prior = torch.tensor([self.RULE_PRIOR * (RULES[k.split(":")[1]][0] if not k.startswith("finding:")
                                                      else FINDING_WEIGHTS[k.split(":")[1]]) for k in _DENSE])
        self.v = self.prior.clone()
        self.b = torch.tensor(-2.0)

    def _inputs(self, analyses: list[Analysis]):
        """A sparse (n, buckets) matrix of n-gram indicators (rows of unit length), and the (n, rules) indicator matrix."""
        rows, cols, vals = [], [], []
        for i, a in enumerate(analyses):
            g = _ngrams(a.norm.joined(), self.buckets)
            rows += [i] * len(g)
            cols += g
            vals += [len(g) ** -0.5] * len(g)  # unit-length rows, as tf-idf vectors are
        x = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals), (len(analyses), self.buckets),
                                    check_invariants=True)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": matrix-vector products are all we use
            warnings.simplefilter("ignore", UserWarning)
            csr = x.coalesce().to_sparse_csr()
        return csr, torch.tensor([_dense(a) for a in analyses], dtype=torch.float32)

    def _logits(self, x, dense, w=None, v=None, b=None) -> torch.Tensor:
        w, v, b = (self.w, self.v, self.b) if w is None else (w, v, b)
        return (x @ w[:, None]).squeeze(-1) + dense @ v + b

    def fit(self, analyses: list[Analysis], labels: list[int], steps: int = 100, lr: float = 0.5,
            l2: float = 1e-4) -> NgramClassifier:
        """Full-batch Adam on the class-balanced logistic loss (deterministic: no sampling)."""
        x, dense = self._inputs(analyses)
        y = torch.tensor(labels, dtype=torch.float32)
        pos = float(y.sum())
        if pos == 0 or pos == len(y):
            raise LmforgeError("the guard classifier needs both attack and benign examples to train")
        weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos)))
        w, v, b = (t.clone() for t in (self.w, self.v, self.b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            xt = x.t().to_sparse_csr()
        opt = torch.optim.Adam([w, v, b], lr=lr)
        # the gradient of the weighted mean logistic loss, by hand: autograd through a sparse
        # product is ~100x slower on CPU
        for _ in range(steps):
            g = weight * (torch.sigmoid(self._logits(x, dense, w, v, b)) - y) / len(y)
            w.grad = (xt @ g[:, None]).squeeze(-1) + 2 * l2 * w
            v.grad = dense.t() @ g + 2 * l2 * (v - self.prior)
            b.grad = g.sum()
            opt.step()
            v.clamp_(min=0.0)
        self.w, self.v, self.b = w, v, b
        return self

    @torch.no_grad()
    def score(self, analyses: list[Analysis]) -> np.ndarray:
        if not analyses:
            return np.zeros(0)
        return torch.sigmoid(self._logits(*self._inputs(analyses))).double().numpy()

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save

        from lmforge.outputs import atomic_write_bytes, atomic_write_text
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "guard.safetensors", save({"w": self.w, "v": self.v, "b": self.b.reshape(1)}))
        atomic_write_text(d / "guard.json", json.dumps({"kind": self.name, "buckets": self.buckets,
                                                        "threshold": self.threshold, "dense": _DENSE}, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> NgramClassifier:
        from safetensors.torch import load_file
        d = Path(directory)
        meta = json.loads((d / "guard.json").read_text(encoding="utf-8"))
        if meta.get("dense") != _DENSE:
            raise LmforgeError(f"{d}: this guard classifier was trained with other rules; retrain it")
        c = cls(int(meta["buckets"]), float(meta["threshold"]))
        t = load_file(str(d / "guard.safetensors"))
        if t["w"].shape != (c.buckets,) or t["v"].shape != (len(_DENSE),):
            raise LmforgeError(f"{d}: guard.safetensors does not match guard.json")
        c.w, c.v, c.b = t["w"], t["v"], t["b"][0]
        return c


class HFClassifier:
    """A transformers sequence classifier directory; the attack label is the one named like
    injection/jailbreak/unsafe, else label 1."""
    name = "hf"

    def __init__(self, directory: str | Path, threshold: float = 0.5, max_length: int = 512):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise LmforgeError("an HF guard classifier needs transformers: pip install lmforge[hf-classifiers]") from None
        self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(directory), local_files_only=True).eval()
        labels = {i: str(n).lower() for i, n in self.model.config.id2label.items()}
        hit = [i for i, n in labels.items() if any(w in n for w in ("inject", "jailbreak", "unsafe", "malicious", "attack"))]
        self.positive = hit or [1]
        self.threshold, self.max_length = threshold, max_length

    @torch.no_grad()
    def score(self, analyses: list[Analysis]) -> np.ndarray:
        batch = self.tok([a.norm.joined() for a in analyses], truncation=True, max_length=self.max_length,
                         padding=True, return_tensors="pt")
        probs = self.model(**batch).logits.softmax(-1)[:, self.positive].sum(-1).double().numpy()
        return np.maximum(probs, [a.rule_score for a in analyses])
