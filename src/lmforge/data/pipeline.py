"""`clean_corpus`: normalise -> URL dedup -> exact dedup -> near-dup dedup -> quality -> PII
redaction -> toxicity -> decontamination, with a report of what each stage removed and why.

The per-batch work runs on an executor (local processes or Ray, see `stages`); the driver only
batches the input, holds the small per-document dedup keys, and makes the global dedup decisions.
Output in `out_dir`: `docs/part_NNNNN.jsonl.zst` (one JSON document per line) and `report.json`.
A run that stops half-way resumes: batches whose files are complete and unchanged are skipped.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data import report as rep
from lmforge.data import stages
from lmforge.data.config import PipelineConfig
from lmforge.data.decontam import build_index
from lmforge.data.dedup_exact import first_occurrences
from lmforge.data.dedup_near import UnionFind, find_near_duplicates, similar_pairs
from lmforge.corpus.document import Document
from lmforge.data.executors import make_executor
from lmforge.corpus.readers import ReadStats
from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_write_json, claim_output_dir

CLEAN_FILES = ["report.json", "work", "docs"]  # what a clean output folder consists of
RUN_FILE = re.compile(r"^(norm_\d+\.jsonl\.zst|keys_\d+\.npz|part_\d+\.json(l\.zst)?|manifest\.json)$")


@dataclass
class CleanResult:
    out_dir: Path
    report: dict
    parts: list[Path]

    def documents(self) -> Iterator[Document]:
        """The kept documents, in input order, streamed from the output parts."""
        for p in self.parts:
            yield from stages.read_documents(p)

    def __iter__(self) -> Iterator[Document]:
        return self.documents()

    def __len__(self) -> int:
        return int(self.report["documents_out"])


def _batches(documents: Iterable[Document], cfg: PipelineConfig) -> Iterator[list[Document]]:
    batch, size = [], 0
    for d in documents:
        if not isinstance(d, Document):
            raise LmforgeError(f"clean_corpus expects Document objects, got {type(d).__name__}")
        batch.append(d)
        size += len(d.text)
        if len(batch) >= cfg.engine.batch_docs or size >= cfg.engine.batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _content_hash(batch: list[Document]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for d in batch:
        for part in (d.id, d.source, json.dumps(d.meta, sort_keys=True, default=str), d.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()


def _load_keys(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class _Run:
    """State of one clean_corpus call (kept out of the public function to keep it readable)."""

    def __init__(self, out_dir: Path, cfg: PipelineConfig, progress: bool, console, overwrite: bool):
        claim_output_dir(out_dir, "clean", CLEAN_FILES, overwrite)  # refuses a file or a user's folder
        self.cfg, self.out_dir = cfg, out_dir
        self.work, self.docs_dir = out_dir / "work", out_dir / "docs"
        self.progress_on, self.console = progress, console
        self.notes: list[str] = []
        self._prepare_dirs()

    def _prepare_dirs(self) -> None:
        manifest = self.work / "manifest.json"
        fingerprint = self.cfg.fingerprint()
        if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
            for folder, pattern in ((self.work, "*"), (self.docs_dir, "part_*.jsonl.zst")):
                for f in folder.glob(pattern):  # only what this pipeline writes there
                    if f.is_file() and RUN_FILE.match(f.name):
                        f.unlink()
            self.notes.append("configuration changed since the last run: started over")
        self.work.mkdir(parents=True, exist_ok=True)
        self.docs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, {"fingerprint": fingerprint})

    def progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, disable=not self.progress_on, transient=True)

    # --- phase A: normalise and hash, in parallel --------------------------------------------------
    def phase_a(self, documents, executor) -> tuple[list[str], int, int]:
        hashes: list[str] = []
        skipped = [0]

        def items():
            for i, batch in enumerate(_batches(documents, self.cfg)):
                h = _content_hash(batch)
                hashes.append(h)
                kp = stages.keys_path(self.work, i)
                if kp.exists() and stages.spill_path(self.work, i).exists():
                    try:
                        if str(_load_keys(kp)["content_hash"]) == h:
                            skipped[0] += 1
                            continue
                    except (OSError, ValueError, KeyError):
                        pass  # unreadable leftovers: redo the batch
                yield i, batch, h

        with self.progress() as bar:
            task = bar.add_task("normalise + hash", total=None)
            done = 0
            for _ in executor.map(stages.normalize_batch, items()):
                done += 1
                bar.update(task, completed=done)
        return hashes, skipped[0], done

    # --- global deduplication ---------------------------------------------------------------------
    def dedup(self, n_batches: int) -> tuple[list[dict], dict, dict]:
        keys = [_load_keys(stages.keys_path(self.work, i)) for i in range(n_batches)]
        counts = [len(k["lengths"]) for k in keys]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cat = {name: np.concatenate([k[name] for k in keys]) for name in keys[0]
               if name not in ("content_hash", "stats")} if keys else {}
        n = int(offsets[-1])
        lengths = cat.get("lengths", np.zeros(0, dtype=np.int64))
        alive = np.ones(n, dtype=bool)
        reason = np.full(n, "", dtype=object)
        stats: dict = {}
        cfg = self.cfg

        def apply(stage: str, keep: np.ndarray, why: str) -> None:
            removed = alive & ~keep
            rep.record(stats, stage, int(alive.sum()), int((alive & keep).sum()), int(lengths[alive].sum()),
                       int(lengths[alive & keep].sum()), {why: int(removed.sum())} if removed.any() else {})
            reason[removed] = why
            alive[:] = alive & keep

        if n and cfg.normalize.url_dedup:
            url_keys = [bytes(u) if has else None for u, has in zip(cat["url"], cat["has_url"])]
            apply("url_dedup", first_occurrences(url_keys, alive), "duplicate URL")
        if n and cfg.exact.enabled:
            apply("exact_dedup", first_occurrences((bytes(k) for k in cat["exact"]), alive), "exact duplicate")
        dup_info: dict = {"documents": n}
        if n and cfg.near.enabled:
            idx = np.flatnonzero(alive)
            res = find_near_duplicates(cat["sig"][idx], cat["valid"][idx], lengths[idx], cfg.near)
            keep = np.ones(n, dtype=bool)
            keep[idx[~res.keep]] = False
            apply("near_dedup", keep, "near duplicate")
            bands, rows = cfg.near.band_layout()
            ids = [str(x) for x in cat["ids"][idx]]
            dup_info.update({"near_clusters": res.clusters, "near_pairs": int(len(res.pairs)),
                             "bands": bands, "rows": rows, "largest_clusters": res.largest(ids)})
            if cfg.near.recheck:
                dup_info["rate_after"] = self._recheck(cat, alive)
        removed = int((reason != "").sum())
        dup_info["rate_before"] = removed / n if n else 0.0
        drops = []
        for b in range(n_batches):
            lo, hi = offsets[b], offsets[b + 1]
            drops.append({int(j): str(reason[lo + j]) for j in np.flatnonzero(reason[lo:hi] != "")})
        return drops, stats, dup_info

    def _recheck(self, cat: dict, alive: np.ndarray) -> float:
        """Share of kept documents that an independent MinHash family still pairs with another."""
        idx = np.flatnonzero(alive)
        if len(idx) < 2:
            return 0.0
        pairs, _ = similar_pairs(cat["sig2"][idx], cat["valid2"][idx], self.cfg.near)
        uf = UnionFind(len(idx))
        for a, b in pairs.tolist():
            uf.union(a, b)
        roots = uf.roots()
        redundant = len(roots) - len(np.unique(roots))
        return redundant / len(idx)

    # --- phase B: filter, redact, write --------------------------------------------------------------
    def phase_b(self, hashes: list[str], drops: list[dict], executor) -> tuple[list[dict], int]:
        results: list[dict | None] = [None] * len(hashes)
        fingerprint = self.cfg.fingerprint()

        def items():
            for i, (h, d) in enumerate(zip(hashes, drops)):
                decision = hashlib.sha256(f"{fingerprint}|{h}|{sorted(d.items())}".encode()).hexdigest()[:32]
                sp, pp = stages.part_stats_path(self.work, i), stages.part_path(self.docs_dir, i)
                if sp.exists() and pp.exists():
                    try:
                        record = json.loads(sp.read_text())
                        if record.get("decision_hash") == decision:
                            results[i] = record["stats"]
                            continue
                    except (OSError, ValueError):
                        pass
                yield i, d, decision

        with self.progress() as bar:
            task = bar.add_task("filter + redact", total=len(hashes))
            bar.update(task, completed=0)
            todo = list(items())
            bar.update(task, completed=len(hashes) - len(todo))
            for (i, _, _), stats in zip(todo, executor.map(stages.filter_batch, todo)):
                results[i] = stats
                bar.advance(task)
        return results, len(hashes) - len(todo)


def clean_corpus(documents: Iterable[Document], out_dir: str | Path, config: PipelineConfig | None = None, *,
                 executor=None, read_stats: ReadStats | None = None, progress: bool = False, console=None,
                 toxicity_scorer=None, keep_work: bool = False, overwrite: bool = False) -> CleanResult:
    """Clean `documents` into `out_dir` (see the module docstring); returns the kept documents
    (streamed from disk) and the report, which is also written to `out_dir/report.json`.
    `out_dir` follows the lmforge.outputs rule (a user's non-empty folder needs overwrite=True);
    input readers skip it, so an output inside an input folder is never read back as input."""
    cfg = config or PipelineConfig()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    run = _Run(out_dir, cfg, progress, console, overwrite)
    eval_index = build_index(cfg.decontam) if cfg.decontam.enabled else None
    context = stages.Context(cfg, str(run.work), str(run.docs_dir), eval_index, toxicity_scorer)
    owned = executor is None
    hf_scorer = cfg.toxicity.enabled and cfg.toxicity.scorer != "lexicon"
    executor = executor or make_executor(cfg.engine.engine, cfg.engine.workers, cfg.engine.ray_address,
                                         cfg.engine.start_method, safe_start=hf_scorer)
    executor.open(context)  # workers start before any progress display thread exists
    ok = False
    try:
        hashes, skipped_a, _ = run.phase_a(documents, executor)
        t_a = time.perf_counter()
        drops, dedup_stats, dup_info = run.dedup(len(hashes))
        t_dedup = time.perf_counter()
        part_stats, skipped_b = run.phase_b(hashes, drops, executor)
        t_b = time.perf_counter()
        ok = True
    finally:
        if owned:
            executor.close() if ok else executor.terminate()
    stats: dict = {}
    phase_a_stats = [_phase_a_stats(run.work, i) for i in range(len(hashes))]
    for s in phase_a_stats + [dedup_stats] + [p for p in part_stats if p]:
        rep.merge(stats, s)
    seconds = time.perf_counter() - t0
    docs_in = stats.get("normalize", {}).get("docs_in", 0)
    bytes_in = stats.get("normalize", {}).get("bytes_in", 0)
    report = {
        "out_dir": str(out_dir), "fingerprint": cfg.fingerprint(), "engine": getattr(executor, "name", "custom"),
        "workers": getattr(executor, "workers", None), "batches": len(hashes),
        "resumed": {"normalize_batches_skipped": skipped_a, "filter_batches_skipped": skipped_b},
        "documents_in": docs_in, "documents_out": stats.get("documents_out", 0),
        "bytes_in": bytes_in, "bytes_out": stats.get("bytes_out", 0),
        "stages": {k: stats[k] for k in rep.STAGES if k in stats},
        "normalize_modified": stats.get("normalize_modified", 0),
        "duplicates": dup_info, "pii": stats.get("pii_types", {}), "pii_documents": stats.get("pii_documents", 0),
        "decontam_sets": eval_index.sets if eval_index is not None else {},
        "read": read_stats.as_dict() if read_stats is not None else {},
        "seconds": round(seconds, 3),
        "phase_seconds": {"normalize_hash": round(t_a - t0, 3), "dedup": round(t_dedup - t_a, 3),
                          "filter_write": round(t_b - t_dedup, 3)},
        "throughput": {"docs_per_s": docs_in / seconds if seconds else 0.0,
                       "mb_per_s": bytes_in / 1e6 / seconds if seconds else 0.0},
        "notes": run.notes,
    }
    atomic_write_json(out_dir / "report.json", report)
    if not keep_work:
        for i in range(len(hashes)):
            stages.spill_path(run.work, i).unlink(missing_ok=True)
    parts = [stages.part_path(run.docs_dir, i) for i in range(len(hashes))]
    for stale in sorted(run.docs_dir.glob("part_*.jsonl.zst")):
        if stale not in parts:  # from an earlier, longer run
            stale.unlink()
    return CleanResult(out_dir, report, parts)


def _phase_a_stats(work: Path, i: int) -> dict:
    keys = _load_keys(stages.keys_path(work, i))
    return json.loads(str(keys["stats"])) if "stats" in keys else {}
