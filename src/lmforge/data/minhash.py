"""MinHash signatures for a whole batch at once, and LSH banding to find candidate pairs.

Signatures use one-permutation hashing with optimal densification (Li, Owen & Zhang 2012;
Shrivastava 2017) instead of K independent permutations: each shingle is hashed once, the high
bits pick one of K bins and the low bits are its value, and a bin keeps its minimum. Bins left
empty (short documents) borrow the value of a non-empty bin found by a probe sequence that
depends only on the bin, so equal sets still get equal signatures. As with classic MinHash,
P[sig_a[k] == sig_b[k]] = Jaccard(a, b), but the cost is O(shingles + K) per document instead
of O(shingles * K), which is what makes the near-dup stage fast.
"""
from __future__ import annotations

import functools

import numpy as np

from lmforge.data.hashing import U64, mix64

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
_SENTINEL = U64(1 << 32)  # larger than any 32-bit bin value: marks an empty bin


def _seed_key(seed: int) -> np.uint64:
    return mix64(np.array([seed + 0x5EED], dtype=np.uint64))[0]


def signatures(shingles: np.ndarray, doc: np.ndarray, n_docs: int, num_perm: int = 128,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n_docs, num_perm) uint32 signatures and a mask of documents that had any shingle."""
    h = mix64(shingles ^ _seed_key(seed))
    bins = ((h >> U64(32)) * U64(num_perm)) >> U64(32)  # high bits -> bin (any num_perm, no modulo bias)
    values = h & U64(0xFFFFFFFF)
    flat = np.full(n_docs * num_perm, _SENTINEL, dtype=np.uint64)
    np.minimum.at(flat, doc.astype(np.int64) * num_perm + bins.astype(np.int64), values)
    sig = flat.reshape(n_docs, num_perm)
    filled = sig != _SENTINEL
    has_any = filled.any(axis=1)
    _densify(sig, filled, has_any, seed)
    sig[~has_any] = 0
    return sig.astype(np.uint32), has_any


def _densify(sig: np.ndarray, filled: np.ndarray, has_any: np.ndarray, seed: int) -> None:
    """Fill each empty bin i from bin probe(i, t) for t = 1, 2, ... until that bin was non-empty."""
    num_perm = sig.shape[1]
    rows, cols = np.nonzero(~filled & has_any[:, None])
    key = _seed_key(seed + 1)
    block = 16  # probes tried per numpy pass: a nearly empty signature needs ~num_perm probes per bin
    first_attempt = 1
    while rows.size:
        attempts = np.arange(first_attempt, first_attempt + block, dtype=np.uint64)
        probe = mix64((cols.astype(np.uint64)[:, None] << U64(32)) + attempts[None, :] + key)
        probe = (probe % U64(num_perm)).astype(np.int64)
        hit = filled[rows[:, None], probe]
        ok = hit.any(axis=1)
        first_hit = probe[ok, hit[ok].argmax(axis=1)]
        sig[rows[ok], cols[ok]] = sig[rows[ok], first_hit]
        rows, cols = rows[~ok], cols[~ok]
        first_attempt += block


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal positions, row by row."""
    return (sig_a == sig_b).mean(axis=-1)


# --- LSH banding ---------------------------------------------------------------------------------
def _collision_probability(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    return 1.0 - (1.0 - s ** rows) ** bands


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted areas of false positives
    (collision probability below the threshold) and false negatives (its complement above)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    best, best_cost = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _trapezoid(_collision_probability(below, bands, rows), below)
            fn = _trapezoid(1.0 - _collision_probability(above, bands, rows), above)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: one hash of each band's `rows` signature values."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands*rows = {bands * rows} exceeds num_perm = {sig.shape[1]}")
    keys = np.empty((sig.shape[0], bands), dtype=np.uint64)
    s = sig.astype(np.uint64)
    for b in range(bands):
        h = mix64(np.array([b + 1], dtype=np.uint64))[0]
        for r in range(rows):
            h = mix64(h ^ s[:, b * rows + r])
        keys[:, b] = h
    return keys


def candidate_pairs(keys: np.ndarray, max_bucket: int = 64) -> np.ndarray:
    """(m, 2) int64 array of distinct pairs i < j sharing at least one band key.

    Buckets of up to `max_bucket` documents contribute all their pairs; bigger buckets (many
    near-identical documents) contribute each member paired with the first and with the previous
    member, which keeps the cost linear and still connects the cluster when they verify."""
    found = []
    n = keys.shape[0]
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, n])
        pairs_of_two = starts[sizes == 2]  # by far the commonest bucket: no Python loop
        found.append(np.stack([order[pairs_of_two], order[pairs_of_two + 1]], axis=1))
        for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
            members = order[start:start + size]
            if size <= max_bucket:
                i, j = np.triu_indices(size, k=1)
                found.append(np.stack([members[i], members[j]], axis=1))
            else:
                found.append(np.stack([members[1:], np.full(size - 1, members[0])], axis=1))
                found.append(np.stack([members[1:], members[:-1]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)
