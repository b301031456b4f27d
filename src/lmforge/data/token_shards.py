"""Tokenise documents into the train/val token shards the pretraining loader reads.

Split: a document's `meta['split']` when it is 'train' or 'val', else a hash of its id (the same
rule as the stdlib corpus). Mixing weights up/down-sample *training* documents by domain; the
validation split is never resampled, so evaluation sees the natural distribution. Repeated
copies are written in later passes over the corpus, not next to the original.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from lmforge.corpus.document import Document
from lmforge.data.mixing import MixingConfig, assign_clusters, copies, domain_of, weight_of
from lmforge.data.shards import INDEX, SHARD_FILES, TOKENIZER_DIR, ShardWriter, read_index, shard_tokenizer_dir
from lmforge.corpus.stdlib import stdlib_split
from lmforge.outputs import atomic_write_json, claim_output_dir


def doc_split(doc: Document, val_fraction: float = 0.05) -> str:
    split = doc.meta.get("split")
    return split if split in ("train", "val") else stdlib_split(doc.id, val_fraction)


def _tokenizer_id(tokenizer) -> str:
    hf = getattr(tokenizer, "hf", None)
    text = hf.to_str() if hf is not None else repr((tokenizer.vocab_size, tokenizer.eos_id))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_token_shards(documents: Iterable[Document], tokenizer, out_dir: str | Path, *,
                       val_fraction: float = 0.05, shard_tokens: int = 50_000_000,
                       mixing: MixingConfig | None = None, batch_docs: int = 256, resume: bool = True,
                       input_id: str = "", progress: bool = False, console=None, overwrite: bool = False) -> dict:
    """Write `{split}_NNNNN.bin` + `index.json` into out_dir and return a summary.

    With resume, a finished shard set written with the same tokenizer, settings and `input_id`
    is kept as is, and an interrupted one continues after its last finished shard. The tokenizer
    is saved in out_dir/tokenizer, so that training can write a self-contained model."""
    mixing = mixing or MixingConfig()
    out = claim_output_dir(out_dir, "shards", SHARD_FILES, overwrite)
    report_input = getattr(documents, "report", None)
    input_id = input_id or (report_input or {}).get("fingerprint", "")
    meta = {"tokenizer": _tokenizer_id(tokenizer), "val_fraction": val_fraction, "input": input_id,
            "mixing": {"domain": mixing.domain, "weights": mixing.weights, "default_weight": mixing.default_weight,
                       "seed": mixing.seed}}
    if resume and (out / INDEX).exists():
        index = read_index(out)
        if index.get("lmforge_data") == json.loads(json.dumps(meta)) and input_id:
            if shard_tokenizer_dir(out) is None:  # written before shard folders carried it
                tokenizer.write_files(_fresh_dir(out / TOKENIZER_DIR))
            return {**index.get("summary", {}), "reused": True}

    t0 = time.perf_counter()
    passes = max([1] + [math.ceil(w) for w in [mixing.default_weight, *mixing.weights.values()]])
    if passes > 1 or mixing.domain == "cluster":
        if iter(documents) is documents:  # a one-shot iterator cannot be read twice
            documents = list(documents)
    clusters = assign_clusters(list(documents), mixing) if mixing.domain == "cluster" else None

    writer = ShardWriter(out, tokenizer.vocab_size, tokenizer.eos_id, shard_tokens,
                         meta={"lmforge_data": meta}, resume=resume)
    resumed = writer.resumed_documents
    splits: dict[str, dict] = {}
    domains: dict[str, dict] = {}
    from rich.progress import Progress
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenise", total=None)
        for p in range(passes):
            batch: list[tuple[str, str, Document]] = []
            for doc in documents:
                split = doc_split(doc, val_fraction)
                domain = domain_of(doc, mixing, clusters)
                n = 1 if split == "val" else copies(doc.id, weight_of(domain, mixing), mixing.seed)
                if n > p:
                    batch.append((split, domain, doc))
                if len(batch) >= batch_docs:
                    _encode(batch, tokenizer, writer, splits, domains)
                    bar.advance(task, len(batch))
                    batch = []
            _encode(batch, tokenizer, writer, splits, domains)
            bar.advance(task, len(batch))
    tokenizer.write_files(_fresh_dir(out / TOKENIZER_DIR))  # before the index: it marks the set finished
    writer.close()
    index = read_index(out)
    for split, shards in index["splits"].items():  # from the index, which includes resumed shards
        splits[split] = {"documents": sum(e["documents"] for e in shards),
                         "tokens": sum(e["tokens"] for e in shards), "shards": len(shards)}
    seconds = time.perf_counter() - t0
    summary = {"dir": str(out), "splits": splits, "domains": domains, "passes": passes,
               "resumed_documents": resumed, "seconds": round(seconds, 3),
               "tokens_per_s": sum(s["tokens"] for s in splits.values()) / seconds if seconds else 0.0}
    index["summary"] = summary
    atomic_write_json(out / INDEX, index)
    return summary


def _fresh_dir(path: Path) -> Path:
    """An empty out_dir/tokenizer (it is ours: inside a claimed shard folder)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    return path


def _encode(batch, tokenizer, writer: ShardWriter, splits: dict, domains: dict) -> None:
    todo = [(split, domain, doc) for split, domain, doc in batch if not writer.skip(split)]
    if not todo:
        return
    for (split, domain, _), ids in zip(todo, tokenizer.encode_batch([doc.text for _, _, doc in todo])):
        writer.add(split, ids)
        s = splits.setdefault(split, {"documents": 0, "tokens": 0})
        s["documents"] += 1
        s["tokens"] += len(ids) + 1
        d = domains.setdefault(domain, {"documents": 0, "tokens": 0})
        d["documents"] += 1
        d["tokens"] += len(ids) + 1
