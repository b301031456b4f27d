"""Corpora with planted near-duplicates at known Jaccard similarity, to measure near-dup
detection (tests, `benchmarks/dedup.py`) and to tune thresholds on your own base documents.

A copy of a base document is edited step by step (word substitutions, inserted lines, swapped
lines, or a mix) and the number of edits is chosen by bisection so that the exact Jaccard
similarity of the two word-shingle sets lands just at or above the target. Similarities are
computed here with plain Python sets, independently of the vectorised hashing under test.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from lmforge.corpus.document import Document

_WORD = re.compile(r"[A-Za-z0-9_\x80-\U0010ffff]+")  # the same word definition as lmforge.data.hashing


def shingle_set(text: str, k: int = 5) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < k:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def random_vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(size)]


def random_document(rng: random.Random, vocab: list[str], words: int) -> str:
    weights = [1.0 / (i + 1) for i in range(len(vocab))]  # Zipf-like, as in real text
    tokens = rng.choices(vocab, weights=weights, k=words)
    lines, i = [], 0
    while i < len(tokens):
        n = rng.randint(6, 14)
        lines.append(" ".join(tokens[i:i + n]))
        i += n
    return "\n".join(lines) + "\n"


def _edit(lines: list[str], kind: str, rng: random.Random, vocab: list[str]) -> None:
    kind = rng.choice(["edit", "insert", "reorder"]) if kind == "mixed" else kind
    if kind == "edit":
        i = rng.randrange(len(lines))
        tokens = lines[i].split(" ")
        tokens[rng.randrange(len(tokens))] = rng.choice(vocab)
        lines[i] = " ".join(tokens)
    elif kind == "insert":
        lines.insert(rng.randrange(len(lines) + 1), " ".join(rng.choices(vocab, k=rng.randint(3, 8))))
    elif kind == "reorder" and len(lines) > 2:
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]


def plant(text: str, target: float, kind: str, rng: random.Random, vocab: list[str], k: int = 5) -> tuple[str, float]:
    """An edited copy of text whose shingle Jaccard with text is >= target and as close as
    bisection over the number of edits gets; returns (copy, exact Jaccard)."""
    base = shingle_set(text, k)
    seed = rng.random()

    def edited(n: int) -> str:
        r = random.Random(seed)
        lines = text.rstrip("\n").split("\n")
        for _ in range(n):
            _edit(lines, kind, r, vocab)
        return "\n".join(lines) + "\n"

    lo, hi = 1, 2  # at least one edit, so that a copy is never an exact duplicate
    if jaccard(base, shingle_set(edited(1), k)) < target:
        hi = 1
    while jaccard(base, shingle_set(edited(hi), k)) >= target and hi < 1 << 14:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: J(lo) >= target > J(hi) (J falls, roughly, with each edit)
        mid = (lo + hi) // 2
        if jaccard(base, shingle_set(edited(mid), k)) >= target:
            lo = mid
        else:
            hi = mid
    copy = edited(lo)
    return copy, jaccard(base, shingle_set(copy, k))


@dataclass
class PlantedCorpus:
    documents: list[Document]
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (base, copy, exact Jaccard)

    def true_pairs(self, threshold: float) -> set[tuple[int, int]]:
        return {(a, b) for a, b, j in self.pairs if j >= threshold}


def planted_corpus(bases: list[str] | None = None, n_bases: int = 600, words: tuple[int, int] = (300, 800),
                   levels: dict[float, int] | None = None, kinds=("edit", "insert", "reorder", "mixed"),
                   seed: int = 0, k: int = 5) -> PlantedCorpus:
    """Base documents (given, or random text) plus, for `levels[j]` of them each, one copy edited
    down to Jaccard ~j. Each base gets at most one copy, so true duplicate pairs never chain."""
    rng = random.Random(seed)
    vocab = random_vocabulary(rng)
    levels = levels if levels is not None else {1.0: 30, 0.95: 60, 0.9: 60, 0.85: 60, 0.7: 40, 0.6: 40, 0.5: 40}
    texts = list(bases) if bases is not None else [random_document(rng, vocab, rng.randint(*words))
                                                   for _ in range(n_bases)]
    if sum(levels.values()) > len(texts):
        raise ValueError("more planted copies than base documents")
    docs = [Document(f"base-{i}", t, "base") for i, t in enumerate(texts)]
    chosen = rng.sample(range(len(texts)), sum(levels.values()))
    pairs = []
    targets = [lvl for lvl, n in levels.items() for _ in range(n)]
    for base, target in zip(chosen, targets):
        kind = kinds[len(pairs) % len(kinds)]
        if target >= 1.0:  # same shingles, different bytes: case and spacing changes only
            copy = texts[base].upper().replace("\n", " \n")
            j = jaccard(shingle_set(texts[base], k), shingle_set(copy, k))
        else:
            copy, j = plant(texts[base], target, kind, rng, vocab, k)
        pairs.append((base, len(docs), j))
        docs.append(Document(f"copy-{base}-{target}", copy, "planted", {"target": target, "kind": kind}))
    order = list(range(len(docs)))
    rng.shuffle(order)  # copies are not simply at the end
    position = {old: new for new, old in enumerate(order)}
    return PlantedCorpus([docs[i] for i in order],
                         [(min(position[a], position[b]), max(position[a], position[b]), j) for a, b, j in pairs])


def evaluate_pairs(predicted: set[tuple[int, int]], corpus: PlantedCorpus, threshold: float, k: int = 5) -> dict:
    """Precision (predicted pairs whose exact Jaccard >= threshold) and recall (true pairs found)."""
    truth = corpus.true_pairs(threshold)
    cache: dict[int, set] = {}

    def sh(i: int) -> set:
        if i not in cache:
            cache[i] = shingle_set(corpus.documents[i].text, k)
        return cache[i]

    correct = sum(1 for a, b in predicted if (a, b) in truth or jaccard(sh(a), sh(b)) >= threshold)
    found = len(truth & predicted)
    return {"precision": correct / len(predicted) if predicted else 1.0,
            "recall": found / len(truth) if truth else 1.0, "predicted_pairs": len(predicted),
            "true_pairs": len(truth)}


def remaining_duplicate_rate(keep, corpus: PlantedCorpus, threshold: float) -> float:
    """Share of kept documents that still have a kept true near-duplicate (planted pairs)."""
    kept = int(sum(bool(x) for x in keep))
    left = sum(1 for a, b in corpus.true_pairs(threshold) if keep[a] and keep[b])
    return left / kept if kept else 0.0
