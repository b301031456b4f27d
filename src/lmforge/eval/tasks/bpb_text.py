"""Bits per byte and perplexity on held-out text: the tokenizer-independent headline.

Data: anything the corpus readers read (text/code files, a directory of them, JSONL or Parquet with
a text field); by default the validation split of the embedded stdlib corpus. Token log-likelihoods
come from the backend (locally: the one scorer, lmforge.model.scoring). Each document is scored
from its start; bpb = total bits / total UTF-8 bytes, with a delta-method standard error over
documents.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.corpus.readers import ReaderConfig, read_inputs
from lmforge.corpus.stdlib import stdlib_documents
from lmforge.errors import LmforgeError
from lmforge.eval.stats import ratio_and_stderr
from lmforge.eval.tasks.base import Task


@dataclass
class BpbConfig:
    path: str | None = None      # default: held-out stdlib source files
    text_field: str = "text"
    limit: int = 64              # documents (0: all)
    max_chars: int = 20000       # long documents are cut to keep a run bounded (0: no cut)


def read_texts(cfg: BpbConfig) -> list[str]:
    if cfg.path is None:
        return [d.text for d in stdlib_documents("val", limit=cfg.limit or None)]
    path = Path(cfg.path)
    if not path.exists():
        raise LmforgeError(f"task bpb: {path} not found")
    # the corpus readers `data clean` uses: text/code files, JSONL/Parquet with a text field, .gz/.zst
    texts = [d.text for d in read_inputs([path], ReaderConfig(text_field=cfg.text_field))]
    if not texts:
        raise LmforgeError(f"task bpb: no readable documents (text field {cfg.text_field!r}) in {path}")
    return texts


class BpbTask(Task):
    name = "bpb"
    config_class = BpbConfig
    chunk_size = 16

    def items(self) -> list[dict]:
        texts = [t for t in read_texts(self.config) if t.strip()]
        if self.config.limit:
            texts = texts[: self.config.limit]
        if self.config.max_chars:
            texts = [t[: self.config.max_chars] for t in texts]
        if not texts:
            raise LmforgeError("task bpb: no non-empty documents")
        return [{"key": f"{i}:{hashlib.sha1(t.encode()).hexdigest()[:12]}", "text": t} for i, t in enumerate(texts)]

    def evaluate(self, backend, items: list[dict]) -> list[dict]:
        scores = backend.loglikelihood_rolling([it["text"] for it in items])
        return [{"nats": nats, "tokens": tokens, "bytes": len(it["text"].encode("utf-8")),
                 "words": len(it["text"].split())} for it, (nats, tokens) in zip(items, scores)]

    def aggregate(self, items, results, out_dir) -> dict:
        bits = [-r["nats"] / math.log(2) for r in results]
        bpb, bpb_se = ratio_and_stderr(bits, [r["bytes"] for r in results])
        nats = -sum(r["nats"] for r in results)
        tokens, words = sum(r["tokens"] for r in results), sum(r["words"] for r in results)
        return {"metrics": {"bits_per_byte": bpb, "byte_perplexity": 2 ** bpb,
                            "token_perplexity": math.exp(nats / tokens),
                            "word_perplexity": math.exp(nats / max(words, 1))},
                "stderr": {"bits_per_byte": bpb_se},
                "details": {"documents": len(results), "tokens": tokens, "bytes": sum(r["bytes"] for r in results)}}
