"""Near-duplicate detection: lmforge's near-dup stage vs datasketch configured for speed.

Corpus: the stdlib's source files plus copies of some of them edited (substitutions, inserted
lines, swapped lines) to known Jaccard similarities 0.5-1.0 of their 5-word shingle sets.
Sides, all with 128 permutations, the same 5-word shingles, the same LSH band layout and the same
verification (estimated Jaccard >= threshold), on the same corpus:
  lmforge             the pipeline's near-dup stage (batched vectorised signatures, LSH, union-find)
  datasketch (tuned)  what datasketch's docs recommend for speed: `MinHash.bulk` (one set of
                      permutations reused), a fast hashfunc (xxhash's xxh32), `LeanMinHash` sketches,
                      bulk insertion through `MinHashLSH.insertion_session`, then one query per document
  datasketch (loop)   secondary line: the plain per-document MinHash/query/insert loop with the
                      default SHA-1 hash (what one writes from the README example)
Warm: every side runs once per round, the order rotating each round, for --repeat rounds in one
process; medians and min-max are printed. Cold: each side's first call in a fresh process (imports
done and corpus loaded, not timed), again interleaved over --cold-repeat processes per side (the
secondary loop is measured warm only).
Scored against the exact Jaccard: recall over the planted pairs (same cluster), precision over the
pairs each method verified; peak memory from one more run of each under tracemalloc.

    .venv/bin/python benchmarks/dedup.py                     # ~1,000 stdlib files + 400 planted copies
    .venv/bin/python benchmarks/dedup.py --repeat 7 --json dedup.json
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from common import fmt, interleave, inverse, ratios, spread, write_json
from lmforge.data.dedup_near import NearDupConfig, UnionFind, batch_signatures, find_near_duplicates
from lmforge.data.planted import evaluate_pairs, planted_corpus
from lmforge.corpus.stdlib import stdlib_documents

WORD = re.compile(r"[A-Za-z0-9_\x80-\U0010ffff]+")  # the word definition all sides use


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


def shingles(text: str, k: int) -> set[bytes]:
    words = [w.lower() for w in WORD.findall(text)]
    return {" ".join(words[j:j + k]).encode() for j in range(max(1, len(words) - k + 1))} if words else set()


def datasketch_tuned(texts: list[str], cfg: NearDupConfig):
    """datasketch as its docs recommend for speed: bulk sketches, xxh32, LeanMinHash, insertion session."""
    bands, rows = cfg.band_layout()
    keys: list[int] = []

    def sets():  # streamed, so only the sketches stay in memory
        for i, t in enumerate(texts):
            if s := shingles(t, cfg.shingle_size):
                keys.append(i)
                yield s

    sketches = [LeanMinHash(m) for m in MinHash.generator(sets(), num_perm=cfg.num_perm, seed=1,
                                                           hashfunc=xxhash.xxh32_intdigest)]
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows))
    with lsh.insertion_session() as session:
        for i, m in zip(keys, sketches):
            session.insert(i, m, check_duplication=False)
    by_key = dict(zip(keys, sketches))
    edges = [(j, i) for i, m in zip(keys, sketches) for j in lsh.query(m)
             if j < i and m.jaccard(by_key[j]) >= cfg.threshold]
    return _cluster_pairs(len(texts), edges), set(edges)


def datasketch_loop(texts: list[str], cfg: NearDupConfig):
    """The plain loop: per document, shingle, MinHash (default SHA-1 hash), query, verify, insert."""
    bands, rows = cfg.band_layout()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows))
    sketches, edges = {}, []
    for i, text in enumerate(texts):
        sh = shingles(text, cfg.shingle_size)
        if not sh:
            continue
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch(list(sh))
        for j in lsh.query(m):
            if m.jaccard(sketches[j]) >= cfg.threshold:
                edges.append((j, i))
        lsh.insert(i, m)
        sketches[i] = m
    return _cluster_pairs(len(texts), edges), set(edges)


SIDES = {"lmforge": ours, "datasketch (tuned)": datasketch_tuned, "datasketch (loop)": datasketch_loop}


def _cluster_pairs(n: int, edges) -> set[tuple[int, int]]:
    uf = UnionFind(n)
    for a, b in edges:
        uf.union(a, b)
    return _pairs_of(uf.roots().tolist())


def estimation_error(corpus, cfg: NearDupConfig) -> dict[str, tuple[float, float]]:
    """(bias, standard deviation) of each method's Jaccard estimate over the planted pairs."""
    index = sorted({i for a, b, _ in corpus.pairs for i in (a, b)})
    row = {i: k for k, i in enumerate(index)}
    sig, _ = batch_signatures([corpus.documents[i].text for i in index], cfg)
    sets = [shingles(corpus.documents[i].text, cfg.shingle_size) for i in index]
    sketches = dict(zip(index, MinHash.bulk(sets, num_perm=cfg.num_perm, seed=1, hashfunc=xxhash.xxh32_intdigest)))
    ours_err = [float((sig[row[a]] == sig[row[b]]).mean()) - j for a, b, j in corpus.pairs]
    theirs_err = [sketches[a].jaccard(sketches[b]) - j for a, b, j in corpus.pairs]
    return {"lmforge": (float(np.mean(ours_err)), float(np.std(ours_err))),
            "datasketch": (float(np.mean(theirs_err)), float(np.std(theirs_err)))}


def _pairs_of(cluster: list[int]) -> set[tuple[int, int]]:
    members = defaultdict(list)
    for i, root in enumerate(cluster):
        members[root].append(i)
    return {(m[a], m[b]) for m in members.values() if len(m) > 1 for a in range(len(m)) for b in range(a + 1, len(m))}


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def cold_times(corpus_file: Path, threshold: float, names: list[str], repeat: int) -> dict[str, list[float]]:
    """Each side's first call in a fresh process; processes interleaved, order rotating per round."""
    times = {n: [] for n in names}
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out = subprocess.run([sys.executable, __file__, "--cold-side", name, "--corpus-file", str(corpus_file),
                                  "--threshold", str(threshold)], capture_output=True, text=True, check=True)
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return times


def cold_child(args) -> None:
    """Runs in the fresh process: load the corpus, then time exactly one call of one side."""
    texts = pickle.loads(Path(args.corpus_file).read_bytes())
    cfg = NearDupConfig(threshold=args.threshold)
    start = time.perf_counter()
    SIDES[args.cold_side](texts, cfg)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=400, help="planted near-duplicate copies")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=3, help="warm rounds (each side once per round)")
    ap.add_argument("--cold-repeat", type=int, default=3, help="fresh processes per side for the cold figure")
    ap.add_argument("--no-loop", action="store_true", help="skip the secondary per-document datasketch loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write config, raw timings and summary here")
    ap.add_argument("--cold-side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--corpus-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold_side:
        return cold_child(args)

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
    print(f"all sides: {cfg.num_perm} permutations, {bands} bands x {rows} rows, {cfg.shingle_size}-word shingles, "
          f"verified at estimated Jaccard >= {args.threshold}")
    names = [n for n in SIDES if not (args.no_loop and n == "datasketch (loop)")]
    warm, results = interleave({n: (lambda f=SIDES[n]: f(texts, cfg)) for n in names}, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "texts.pkl"
        corpus_file.write_bytes(pickle.dumps(texts))
        cold = cold_times(corpus_file, args.threshold, names[:2], args.cold_repeat)

    n_docs = len(texts)
    summary, quality = {}, {}
    print(f"\nwarm: {args.repeat} interleaved rounds; cold: {args.cold_repeat} fresh processes per side; "
          f"median (min-max)")
    print(f"{'method':20s} {'warm docs/s':>22s} {'cold s':>18s} {'recall':>7s} {'precision':>9s} {'peak MB':>8s}")
    for name in names:
        clustered, verified = results[name]
        recall = evaluate_pairs(clustered, corpus, args.threshold)
        precision = evaluate_pairs(verified, corpus, args.threshold)["precision"]
        peak = peak_mb(SIDES[name], texts, cfg)
        w, c = spread(warm[name]), spread(cold[name]) if name in cold else None
        summary[name] = {"warm_s": w, "warm_docs_per_s": inverse(w, n_docs), "cold_s": c,
                         "cold_docs_per_s": inverse(c, n_docs) if c else None}
        quality[name] = {"recall": recall["recall"], "true_pairs": recall["true_pairs"], "precision": precision,
                         "peak_mb": peak}
        print(f"{name:20s} {fmt(inverse(w, n_docs), digits=0):>22s} {fmt(c) if c else '-':>18s} {recall['recall']:7.3f} "
              f"{precision:9.3f} {peak:8.1f}")
    err = estimation_error(corpus, cfg)
    print(f"Jaccard estimate vs exact over the {len(corpus.pairs)} planted pairs: lmforge bias "
          f"{err['lmforge'][0]:+.4f} sd {err['lmforge'][1]:.4f}; datasketch bias {err['datasketch'][0]:+.4f} "
          f"sd {err['datasketch'][1]:.4f}")
    speedups = {}
    for peer in names[1:]:
        speedups[peer] = {"warm": ratios(warm[peer], warm["lmforge"])}
        line = f"speed-up of lmforge over {peer}: {fmt(speedups[peer]['warm'], digits=1, unit='x')} warm"
        if peer in cold:
            speedups[peer]["cold"] = ratios(cold[peer], cold["lmforge"])
            line += f", {fmt(speedups[peer]['cold'], digits=1, unit='x')} cold"
        print(line + " (per-round ratios, median (min-max))")
    write_json(args.json, "dedup",
               {"documents": n_docs, "megabytes": mb, "copies": args.copies, "threshold": args.threshold,
                "num_perm": cfg.num_perm, "bands": bands, "rows": rows, "shingle_size": cfg.shingle_size,
                "repeat": args.repeat, "cold_repeat": args.cold_repeat, "seed": args.seed},
               {"warm_s": warm, "cold_s": cold},
               {"sides": summary, "quality": quality, "speedup": speedups,
                "jaccard_error": {k: {"bias": b, "sd": sd} for k, (b, sd) in err.items()}})


if __name__ == "__main__":
    main()
