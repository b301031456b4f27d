"""Near-duplicate detection: lmforge's near-dup stage vs a plain per-document datasketch loop.

Corpus: the stdlib's source files plus copies of some of them edited (substitutions, inserted
lines, swapped lines) to known Jaccard similarities 0.5-1.0 of their 5-word shingle sets. Both
methods use 128 permutations, the same LSH band layout and the same verification (estimated
Jaccard >= threshold), run in one process on the same corpus, and are scored against the exact
Jaccard: recall over the planted pairs (same cluster), precision over the pairs each method
verified. Throughput is the best of --repeat runs (the first run of a process also pays for
page-faulting its work arrays, reported as "cold"); peak memory is measured in one more run of
each under tracemalloc (numpy buffers included).

    .venv/bin/python benchmarks/dedup.py            # ~1,000 stdlib files + 400 planted copies
    .venv/bin/python benchmarks/dedup.py --copies 800 --repeat 5
"""
from __future__ import annotations

import argparse
import re
import time
import tracemalloc
from collections import defaultdict

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmforge.data.dedup_near import NearDupConfig, UnionFind, batch_signatures, find_near_duplicates
from lmforge.data.planted import evaluate_pairs, planted_corpus
from lmforge.corpus.stdlib import stdlib_documents

WORD = re.compile(r"[A-Za-z0-9_\x80-\U0010ffff]+")  # the word definition both methods use


def ours(texts: list[str], cfg: NearDupConfig, batch_bytes: int = 2 << 20):
    """The pipeline's near-dup stage: batched vectorised signatures, LSH, verification, union-find."""
    sigs, valid, batch, size = [], [], [], 0
    for t in texts + [None]:
        if t is not None:
            batch.append(t)
            size += len(t)
        if batch and (t is None or size >= batch_bytes):
            s, v = batch_signatures(batch, cfg)
            sigs.append(s)
            valid.append(v)
            batch, size = [], 0
    res = find_near_duplicates(np.concatenate(sigs), np.concatenate(valid), np.array([len(t) for t in texts]), cfg)
    return _pairs_of(res.cluster.tolist()), {tuple(p) for p in res.pairs.tolist()}


def datasketch_loop(texts: list[str], cfg: NearDupConfig):
    """What one writes with datasketch: per document, shingle, MinHash, query, verify, insert."""
    bands, rows = cfg.band_layout()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows))
    sketches, edges = {}, []
    k = cfg.shingle_size
    for i, text in enumerate(texts):
        words = [w.lower() for w in WORD.findall(text)]
        if not words:
            continue
        shingles = {" ".join(words[j:j + k]).encode() for j in range(max(1, len(words) - k + 1))}
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch(list(shingles))
        for j in lsh.query(m):
            if m.jaccard(sketches[j]) >= cfg.threshold:
                edges.append((j, i))
        lsh.insert(i, m)
        sketches[i] = m
    uf = UnionFind(len(texts))
    for a, b in edges:
        uf.union(a, b)
    return _pairs_of(uf.roots().tolist()), set(edges)


def estimation_error(corpus, cfg: NearDupConfig) -> dict[str, tuple[float, float]]:
    """(bias, standard deviation) of each method's Jaccard estimate over the planted pairs."""
    index = sorted({i for a, b, _ in corpus.pairs for i in (a, b)})
    row = {i: k for k, i in enumerate(index)}
    sig, _ = batch_signatures([corpus.documents[i].text for i in index], cfg)
    k = cfg.shingle_size

    def sketch(text):
        words = [w.lower() for w in WORD.findall(text)]
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch(list({" ".join(words[j:j + k]).encode() for j in range(max(1, len(words) - k + 1))}))
        return m

    sketches = {i: sketch(corpus.documents[i].text) for i in index}
    ours_err = [float((sig[row[a]] == sig[row[b]]).mean()) - j for a, b, j in corpus.pairs]
    theirs_err = [sketches[a].jaccard(sketches[b]) - j for a, b, j in corpus.pairs]
    return {"ours": (float(np.mean(ours_err)), float(np.std(ours_err))),
            "datasketch": (float(np.mean(theirs_err)), float(np.std(theirs_err)))}


def _pairs_of(cluster: list[int]) -> set[tuple[int, int]]:
    members = defaultdict(list)
    for i, root in enumerate(cluster):
        members[root].append(i)
    return {(m[a], m[b]) for m in members.values() if len(m) > 1 for a in range(len(m)) for b in range(a + 1, len(m))}


def timed(fn, *args, repeat: int = 1):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t)
    return result, min(times), times[0]


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=400, help="planted near-duplicate copies")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    bases = [d.text for d in stdlib_documents() if 2_000 <= len(d.text) <= 60_000]
    shares = {1.0: 0.1, 0.95: 0.15, 0.9: 0.15, 0.85: 0.15, 0.7: 0.15, 0.6: 0.15, 0.5: 0.15}
    levels = {j: round(args.copies * s) for j, s in shares.items()}
    t = time.perf_counter()
    corpus = planted_corpus(bases, levels=levels, seed=args.seed)
    texts = [d.text for d in corpus.documents]
    mb = sum(len(x.encode()) for x in texts) / 1e6
    print(f"corpus: {len(bases)} stdlib files + {sum(levels.values())} planted copies = {len(texts)} documents, "
          f"{mb:.1f} MB ({time.perf_counter() - t:.0f} s to plant); threshold {args.threshold}")

    cfg = NearDupConfig(threshold=args.threshold)
    bands, rows = cfg.band_layout()
    print(f"both: {cfg.num_perm} permutations, {bands} bands x {rows} rows, {cfg.shingle_size}-word shingles, "
          f"verified at estimated Jaccard >= {args.threshold}")
    rows_out = []
    for name, fn in [("lmforge near-dup stage", ours), ("datasketch per-document loop", datasketch_loop)]:
        (clustered, verified), best, cold = timed(fn, texts, cfg, repeat=args.repeat)
        recall = evaluate_pairs(clustered, corpus, args.threshold)
        precision = evaluate_pairs(verified, corpus, args.threshold)["precision"]
        rows_out.append((name, best, cold, recall, precision, peak_mb(fn, texts, cfg)))
    print(f"\n{'method':30s} {'docs/s':>9s} {'seconds':>8s} {'cold s':>7s} {'recall':>7s} {'precision':>9s} "
          f"{'peak MB':>8s}")
    for name, best, cold, r, precision, peak in rows_out:
        print(f"{name:30s} {len(texts) / best:9,.0f} {best:8.2f} {cold:7.2f} {r['recall']:7.3f} {precision:9.3f} "
              f"{peak:8.1f}")
    ours_row, theirs_row = rows_out
    err = estimation_error(corpus, cfg)
    print(f"Jaccard estimate vs exact over the {len(corpus.pairs)} planted pairs: lmforge bias "
          f"{err['ours'][0]:+.4f} sd {err['ours'][1]:.4f}; datasketch bias {err['datasketch'][0]:+.4f} "
          f"sd {err['datasketch'][1]:.4f}")
    print(f"\nspeed-up: {theirs_row[1] / ours_row[1]:.1f}x warm, {theirs_row[2] / ours_row[2]:.1f}x cold "
          f"(target >= 5x); recall {ours_row[3]['recall']:.3f} vs {theirs_row[3]['recall']:.3f} on "
          f"{ours_row[3]['true_pairs']} planted pairs with Jaccard >= {args.threshold}")


if __name__ == "__main__":
    main()
