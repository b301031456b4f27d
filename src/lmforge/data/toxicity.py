"""Toxicity scoring: a scorer maps texts to scores in [0, 1]; documents above the threshold are
dropped. Two scorers ship:

- `lexicon` (default, offline, fast): weighted hits of a small built-in English lexicon of
  profanity, insults and threats, as a density per 100 words squashed to [0, 1]. It carries no
  identity-based slurs; add your own terms with `lexicon_path` (lines of `term<TAB>weight`).
- a local Hugging Face text-classification model directory (`scorer: path/to/model`): the
  probability of its toxic label. transformers is imported only when this scorer is used.

Anything with a `score(texts) -> list[float]` method can be passed to the pipeline instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.data import hashing
from lmforge.errors import LmforgeError

# weight 1: profanity; 2: insults; 3: threats and harassment
LEXICON = {
    1: ["fuck", "fucking", "fucked", "fucker", "shit", "shitty", "bullshit", "crap", "damn", "piss", "pissed",
        "bloody hell", "wtf", "stfu"],
    2: ["idiot", "idiots", "idiotic", "stupid", "moron", "morons", "moronic", "imbecile", "dumbass", "jackass",
        "asshole", "assholes", "bastard", "bitch", "bitches", "loser", "scum", "scumbag", "worthless", "pathetic",
        "retard", "retarded", "slut", "whore", "shut up", "screw you", "piece of shit", "motherfucker", "cunt",
        "twat", "dickhead", "douchebag", "go to hell", "nobody likes you", "you suck"],
    3: ["kill yourself", "kys", "i will kill you", "i'll kill you", "i am going to kill you", "hope you die",
        "you should die", "go die", "i will hurt you", "i will find you", "rape you", "burn in hell",
        "you deserve to die"],
}


@dataclass
class ToxicityConfig:
    enabled: bool = True
    scorer: str = "lexicon"  # 'lexicon' or a local HF text-classification model directory
    threshold: float = 0.5
    lexicon_path: str = ""  # extra terms, 'term<TAB>weight' per line
    scale: float = 3.0  # lexicon: weighted hits per 100 words giving a score of 1 - 1/e
    min_words: int = 20  # lexicon: shorter texts count as this long (one word is not a 100% rate)
    label: str = ""  # HF: the toxic label's name (default: guessed from the model's labels)
    device: str = "cpu"
    batch_size: int = 16
    max_length: int = 512


class ToxicityScorer(Protocol):
    def score(self, texts: list[str]) -> list[float]: ...


class LexiconScorer:
    """Matches terms as word sequences on the vectorised word hashes of `lmforge.data.hashing`
    (case-insensitive, punctuation ignored: "i'll kill you" is the words i, ll, kill, you)."""

    def __init__(self, terms: dict[str, float] | None = None, scale: float = 3.0, min_words: int = 20):
        if terms is None:
            terms = {t: float(w) for w, ts in LEXICON.items() for t in ts}
        self.scale, self.min_words = scale, min_words
        by_length: dict[int, dict[int, float]] = {}
        words = hashing.words(list(terms))
        offsets = np.concatenate([[0], np.cumsum(words.counts())])
        for i, weight in enumerate(terms.values()):
            n = int(offsets[i + 1] - offsets[i])
            if n:
                h = hashing.ngrams(hashing.Words(words.hashes[offsets[i]:offsets[i + 1]], np.zeros(n, np.int64),
                                                 words.length[offsets[i]:offsets[i + 1]], 1), n)[0][0]
                by_length.setdefault(n, {})[int(h)] = float(weight)
        self.tables = {n: (np.array(sorted(t), dtype=np.uint64), np.array([t[k] for k in sorted(t)]))
                       for n, t in by_length.items()}

    @classmethod
    def from_config(cls, cfg: ToxicityConfig) -> LexiconScorer:
        terms = {t: float(w) for w, ts in LEXICON.items() for t in ts}
        if cfg.lexicon_path:
            terms.update(load_lexicon(cfg.lexicon_path))
        return cls(terms, cfg.scale, cfg.min_words)

    def hits(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(weighted hits, words) per text."""
        w = hashing.words(texts)
        weight = np.zeros(len(texts))
        for n, (keys, weights) in self.tables.items():
            h, doc, _ = hashing.ngrams(w, n, short_docs=False)
            if h.size == 0:
                continue
            idx = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
            found = keys[idx] == h
            weight += np.bincount(doc[found], weights=weights[idx[found]], minlength=len(texts))
        return weight, w.counts()

    def score(self, texts: list[str]) -> list[float]:
        weight, words = self.hits(texts)
        density = 100.0 * weight / np.maximum(words, self.min_words)
        return (1.0 - np.exp(-density / self.scale)).tolist()


def load_lexicon(path: str | Path) -> dict[str, float]:
    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"toxicity lexicon not found: {path}")
    terms = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        term, _, weight = line.partition("\t")
        try:
            terms[term.strip().lower()] = float(weight) if weight.strip() else 1.0
        except ValueError as e:
            raise LmforgeError(f"{path}:{n}: weight must be a number, got {weight!r}") from e
    return terms


_TOXIC_WORDS = ("toxic", "offens", "hate", "abus", "insult", "obscen", "harass")


class HFClassifierScorer:
    """The toxic-label probability of a local Hugging Face sequence-classification model."""

    def __init__(self, model_dir: str | Path, label: str = "", device: str = "cpu", batch_size: int = 16,
                 max_length: int = 512):
        path = Path(model_dir)
        if not (path / "config.json").exists():
            raise LmforgeError(f"toxicity scorer: {model_dir} is neither 'lexicon' nor a local HF model directory")
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise LmforgeError("the HF toxicity scorer needs transformers (pip install 'lmforge[dev]')") from e
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.index = self._toxic_index(label)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    def _toxic_index(self, label: str) -> int:
        names = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        if label:
            found = [i for i, n in names.items() if n.lower() == label.lower()]
            if not found:
                raise LmforgeError(f"label {label!r} not in the model's labels {sorted(names.values())}")
            return found[0]
        for i, n in sorted(names.items()):
            low = n.lower()
            if any(w in low for w in _TOXIC_WORDS) and not low.startswith(("non", "not")):
                return i
        if len(names) == 2:
            return 1  # binary classifiers conventionally put the positive (toxic) class second
        raise LmforgeError(f"cannot tell which label is toxic among {sorted(names.values())}; set toxicity.label")

    def score(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        with self.torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
                out += probs[:, self.index].tolist()
        return out


_CACHE: dict = {}


def make_scorer(cfg: ToxicityConfig) -> ToxicityScorer:
    """One scorer per configuration and process (a model is loaded once per worker)."""
    key = (cfg.scorer, cfg.lexicon_path, cfg.scale, cfg.min_words, cfg.label, cfg.device)
    if key not in _CACHE:
        if cfg.scorer == "lexicon":
            _CACHE[key] = LexiconScorer.from_config(cfg)
        else:
            _CACHE[key] = HFClassifierScorer(cfg.scorer, cfg.label, cfg.device, cfg.batch_size, cfg.max_length)
    return _CACHE[key]
