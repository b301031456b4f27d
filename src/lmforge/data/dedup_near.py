"""Near-duplicate removal: MinHash-LSH candidates, verified, joined into clusters with union-find.

Keep rule: in every cluster the longest document (most UTF-8 bytes) is kept; ties go to the one
that came first in the input. Longest, because near-duplicates are usually a document and its
truncated, partially edited or older copies, and the fullest version is the most useful one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.data import hashing
from lmforge.data.minhash import band_keys, candidate_pairs, jaccard_estimate, optimal_bands, signatures
from lmforge.errors import LmforgeError


@dataclass
class NearDupConfig:
    enabled: bool = True
    threshold: float = 0.8  # Jaccard similarity of word-shingle sets
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128
    bands: int = 0  # 0: chosen from threshold, num_perm and the two weights below
    rows: int = 0
    # LSH misses are lost for good while false candidates are removed by verification, so the
    # band layout is chosen to weigh misses (false negatives) far more than false candidates
    fp_weight: float = 0.1
    fn_weight: float = 0.9
    verify: bool = True  # keep only candidate pairs whose estimated Jaccard >= threshold
    max_bucket: int = 64
    seed: int = 0
    recheck: bool = True  # measure the duplicate rate left after dedup with an independent seed
    backend: str = "numpy"  # numpy: vectorised one-permutation MinHash; datasketch: datasketch.MinHash

    def band_layout(self) -> tuple[int, int]:
        if self.bands and self.rows:
            return self.bands, self.rows
        return optimal_bands(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)


def batch_signatures(texts: list[str], cfg: NearDupConfig, seed: int | None = None):
    """Signatures of a batch of texts: ((n, num_perm) uint32, mask of texts with any word)."""
    seed = cfg.seed if seed is None else seed
    w = hashing.words(texts)
    shingles, doc, _ = hashing.ngrams(w, cfg.shingle_size)
    if cfg.backend == "datasketch":
        return _datasketch_signatures(shingles, doc, len(texts), cfg.num_perm, seed)
    if cfg.backend != "numpy":
        raise LmforgeError(f"near.backend must be numpy or datasketch, got {cfg.backend!r}")
    return signatures(shingles, doc, len(texts), cfg.num_perm, seed)


def _datasketch_signatures(shingles: np.ndarray, doc: np.ndarray, n: int, num_perm: int, seed: int):
    """The same shingles through datasketch's K-permutation MinHash (slower; for comparison)."""
    from datasketch import MinHash
    sig = np.zeros((n, num_perm), dtype=np.uint32)
    valid = np.zeros(n, dtype=bool)
    bounds = np.searchsorted(doc, np.arange(n + 1))
    for i in range(n):
        hs = np.unique(shingles[bounds[i]:bounds[i + 1]])
        if hs.size:
            m = MinHash(num_perm=num_perm, seed=seed + 1, hashfunc=int)
            m.update_batch((hs >> np.uint64(32)).tolist())  # datasketch's hashes are 32-bit
            sig[i], valid[i] = m.hashvalues.astype(np.uint32), True
    return sig, valid


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller index becomes the root, so roots do not depend on edge order
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def similar_pairs(sig: np.ndarray, valid: np.ndarray, cfg: NearDupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs from LSH (only documents with a signature), and their estimated Jaccard."""
    bands, rows = cfg.band_layout()
    index = np.flatnonzero(valid)
    keys = band_keys(sig[index], bands, rows)
    pairs = index[candidate_pairs(keys, cfg.max_bucket)]
    est = np.empty(len(pairs))
    for s in range(0, len(pairs), 65536):
        chunk = pairs[s:s + 65536]
        est[s:s + 65536] = jaccard_estimate(sig[chunk[:, 0]], sig[chunk[:, 1]])
    if cfg.verify:
        keep = est >= cfg.threshold
        pairs, est = pairs[keep], est[keep]
    return pairs, est


@dataclass
class NearDupResult:
    keep: np.ndarray  # bool per document
    cluster: np.ndarray  # int64 root per document (itself when not a duplicate)
    pairs: np.ndarray  # (m, 2) pairs joined
    clusters: int  # clusters with more than one document

    def largest(self, ids: list[str], top: int = 5, members: int = 6) -> list[dict]:
        roots, sizes = np.unique(self.cluster, return_counts=True)
        out = []
        for r in roots[np.argsort(-sizes, kind="stable")][:top]:
            idx = np.flatnonzero(self.cluster == r)
            if len(idx) < 2:
                break
            kept = idx[self.keep[idx]]
            out.append({"size": int(len(idx)), "kept": ids[kept[0]] if len(kept) else None,
                        "members": [ids[i] for i in idx[:members]]})
        return out


def find_near_duplicates(sig: np.ndarray, valid: np.ndarray, lengths: np.ndarray,
                         cfg: NearDupConfig) -> NearDupResult:
    n = len(sig)
    pairs, _ = similar_pairs(sig, valid, cfg)
    uf = UnionFind(n)
    for a, b in pairs.tolist():
        uf.union(a, b)
    roots = uf.roots()
    # keeper per cluster: longest, then earliest -> sort by (root, -length, index), take firsts
    order = np.lexsort((np.arange(n), -np.asarray(lengths, dtype=np.int64), roots))
    first = np.r_[True, roots[order][1:] != roots[order][:-1]]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    sizes = np.bincount(roots, minlength=n)
    return NearDupResult(keep, roots, pairs, int((sizes > 1).sum()))
