"""The two per-batch jobs the executors run, and the files they exchange.

Phase A (`normalize_batch`): normalise a batch, then compute what global deduplication needs
(exact-text key, URL key, byte length, MinHash signatures); the normalised documents are spilled
to `work/norm_NNNNN.jsonl.zst` and the keys to `work/keys_NNNNN.npz`.

Phase B (`filter_batch`): read a spill back, drop what deduplication removed, then run quality ->
PII redaction -> toxicity -> decontamination and write `docs/part_NNNNN.jsonl.zst` with its
statistics in `work/part_NNNNN.json`.

Every file is written to a temporary name and renamed, so a crash never leaves a file that looks
finished; a batch whose files exist (with matching hashes) is skipped on resume.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data import report as rep
from lmforge.data.config import PipelineConfig
from lmforge.data.decontam import EvalIndex, overlaps
from lmforge.data.dedup_exact import text_key, url_key
from lmforge.data.dedup_near import batch_signatures
from lmforge.corpus.document import Document
from lmforge.data.normalize import normalize_text, url_dedup_key
from lmforge.data.pii import redact
from lmforge.data.quality import quality_reasons
from lmforge.corpus.readers import kind_of_path
from lmforge.data.toxicity import make_scorer

RECHECK_SEED_OFFSET = 7919  # an independent hash family for measuring duplicates left after dedup


@dataclass
class Context:
    config: PipelineConfig
    work_dir: str
    docs_dir: str
    eval_index: EvalIndex | None = None
    scorer: object | None = None  # a custom toxicity scorer; None: from config


def spill_path(work_dir, i: int) -> Path:
    return Path(work_dir) / f"norm_{i:05d}.jsonl.zst"


def keys_path(work_dir, i: int) -> Path:
    return Path(work_dir) / f"keys_{i:05d}.npz"


def part_path(docs_dir, i: int) -> Path:
    return Path(docs_dir) / f"part_{i:05d}.jsonl.zst"


def part_stats_path(work_dir, i: int) -> Path:
    return Path(work_dir) / f"part_{i:05d}.json"


# --- files ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_documents(path: Path, docs: list[Document], level: int = 3) -> None:
    import zstandard
    lines = "".join(json.dumps({"id": d.id, "text": d.text, "source": d.source, "meta": d.meta},
                               ensure_ascii=False) + "\n" for d in docs)
    _atomic_write(path, zstandard.ZstdCompressor(level=level).compress(lines.encode("utf-8", "surrogatepass")))


def read_documents(path: Path) -> list[Document]:
    import zstandard
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    out = []
    for line in data.decode("utf-8", "surrogatepass").splitlines():
        r = json.loads(line)
        out.append(Document(r["id"], r["text"], r.get("source", ""), r.get("meta", {})))
    return out


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- phase A ----------------------------------------------------------------------------------------
def normalize_batch(ctx: Context, item) -> dict:
    index, docs, content_hash = item
    cfg = ctx.config
    out, bytes_in, modified = [], 0, 0
    for d in docs:
        kind = d.meta.get("kind") or kind_of_path(str(d.meta.get("path") or d.id))
        text = normalize_text(d.text, cfg.normalize, is_code=kind == "code") if cfg.normalize.enabled else d.text
        modified += text != d.text
        bytes_in += _utf8_len(d.text)
        out.append(Document(d.id, text, d.source, {**d.meta, "kind": kind}))
    texts = [d.text for d in out]
    lengths = np.array([_utf8_len(t) for t in texts], dtype=np.int64)
    exact = np.frombuffer(b"".join(text_key(t) for t in texts), dtype=np.uint8).reshape(len(out), 16)
    urls = [url_key(url_dedup_key(d.meta["url"], cfg.normalize)) if isinstance(d.meta.get("url"), str) else None
            for d in out]
    arrays = {"lengths": lengths, "exact": exact, "has_url": np.array([u is not None for u in urls], dtype=bool),
              "url": np.frombuffer(b"".join(u or bytes(16) for u in urls), dtype=np.uint8).reshape(len(out), 16)}
    if cfg.near.enabled:
        arrays["sig"], arrays["valid"] = batch_signatures(texts, cfg.near)
        if cfg.near.recheck:
            arrays["sig2"], arrays["valid2"] = batch_signatures(texts, cfg.near, cfg.near.seed + RECHECK_SEED_OFFSET)
    stats: dict = {"normalize_modified": modified}
    rep.record(stats, "normalize", len(docs), len(out), bytes_in, int(lengths.sum()))
    write_documents(spill_path(ctx.work_dir, index), out, cfg.engine.zstd_level)
    buf = io.BytesIO()
    np.savez(buf, content_hash=np.array(content_hash), stats=np.array(json.dumps(stats)),
             ids=np.array([d.id for d in out], dtype=str), **arrays)
    _atomic_write(keys_path(ctx.work_dir, index), buf.getvalue())  # written last: marks the batch done
    return stats


# --- phase B ----------------------------------------------------------------------------------------
def filter_batch(ctx: Context, item) -> dict:
    index, drops, decision_hash = item  # drops: {position in batch: dedup reason}
    cfg = ctx.config
    docs = [d for j, d in enumerate(read_documents(spill_path(ctx.work_dir, index))) if j not in drops]
    stats: dict = {}

    def stage(name: str, keep: list[bool], reasons: list[str | None], before: list[Document],
              after: list[Document] | None = None) -> list[Document]:
        after = after if after is not None else before
        kept = [d for d, k in zip(after, keep) if k]
        removed = Counter(r for r, k in zip(reasons, keep) if not k and r)
        rep.record(stats, name, len(before), len(kept), sum(_utf8_len(d.text) for d in before),
                   sum(_utf8_len(d.text) for d in kept), removed)
        return kept

    if cfg.quality.enabled:
        reasons = quality_reasons([d.text for d in docs], [d.meta.get("kind", "text") for d in docs], cfg.quality)
        docs = stage("quality", [r is None for r in reasons], reasons, docs)
    if cfg.pii.enabled:
        redacted, pii_counts, docs_with_pii = [], Counter(), 0
        for d in docs:
            text, counts = redact(d.text, cfg.pii)
            meta = {**d.meta, "pii": dict(counts)} if counts else d.meta
            redacted.append(Document(d.id, text, d.source, meta))
            pii_counts += counts
            docs_with_pii += bool(counts)
        docs = stage("pii", [True] * len(docs), [None] * len(docs), docs, redacted)
        stats["pii_types"], stats["pii_documents"] = dict(pii_counts), docs_with_pii
    if cfg.toxicity.enabled and docs:
        scorer = ctx.scorer or make_scorer(cfg.toxicity)
        scores = scorer.score([d.text for d in docs])
        keep = [s <= cfg.toxicity.threshold for s in scores]
        docs = stage("toxicity", keep, ["toxic"] * len(docs), docs)
    if cfg.decontam.enabled and ctx.eval_index is not None and docs:
        hits = overlaps([d.text for d in docs], ctx.eval_index)
        keep = [int(h) < cfg.decontam.min_overlaps for h in hits]
        docs = stage("decontam", keep, [f"{cfg.decontam.ngram}-gram overlap"] * len(docs), docs)
    write_documents(part_path(ctx.docs_dir, index), docs, cfg.engine.zstd_level)
    stats["documents_out"] = len(docs)
    stats["bytes_out"] = sum(_utf8_len(d.text) for d in docs)
    record = {"decision_hash": decision_hash, "stats": stats}
    _atomic_write(part_stats_path(ctx.work_dir, index), json.dumps(record).encode())
    return stats
