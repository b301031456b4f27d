"""Deterministic, vectorised hashing of words and word n-grams for a whole batch of texts.

Near-dup detection, decontamination and the repetition filters all need the hashes of every word
n-gram of every document. Doing that word by word in Python dominates their cost, so here a batch
of texts is joined into one byte array and every step is a numpy operation over the batch:

- a *word* is a maximal run of ASCII letters/digits/underscore or non-ASCII bytes (so `café` and
  `東京` are words), compared case-insensitively (ASCII);
- a word's hash is a polynomial rolling hash of its bytes (mod 2**64, via prefix sums and a table
  of powers of the base and of its inverse), passed through a 64-bit finaliser;
- an n-gram's hash chains the hashes of its n words; n-grams never cross a document boundary.

Hashes depend only on the text (no per-process salt), so every worker, machine and run agrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

U64 = np.uint64
_BASE = 0x100000001B3  # FNV-64 prime: odd, so it has an inverse mod 2**64
_CHAIN = U64(0x9E3779B97F4A7C15)

_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"]] = True
_WORD_BYTE[0x80:] = True  # every byte of a multi-byte UTF-8 character


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = np.asarray(x, dtype=np.uint64)
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


class _Powers:
    """BASE**i and BASE**-i mod 2**64 for i < n, grown on demand and shared within a process."""

    def __init__(self):
        self.up = self.down = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up), 1 << 16)
            self.up = self._table(_BASE, size)
            self.down = self._table(pow(_BASE, -1, 2**64), size)
        return self.up[:n], self.down[:n]

    @staticmethod
    def _table(base: int, size: int) -> np.ndarray:
        t = np.full(size, base, dtype=np.uint64)
        t[0] = 1
        return np.cumprod(t, dtype=np.uint64)  # uint64 products wrap, i.e. are taken mod 2**64


_POWERS = _Powers()


class _Scratch:
    """Work arrays reused from call to call: fresh multi-megabyte arrays for every batch would
    cost a page fault per 4 KiB, which on a virtual machine dominates the hashing itself."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or a.size < n:
            a = self.arrays[name] = np.empty(max(n, 1 << 16), dtype=dtype)
        return a[:n]


_SCRATCH = _Scratch()


@dataclass
class Words:
    """Every word of a batch: its hash, its document (index in the batch) and its byte length."""
    hashes: np.ndarray  # uint64
    doc: np.ndarray  # int64, non-decreasing
    length: np.ndarray  # int64 bytes
    n_docs: int
    first_byte: np.ndarray | None = None  # uint8: the word's first byte (digits mark numbers)

    def counts(self) -> np.ndarray:
        return np.bincount(self.doc, minlength=self.n_docs)


def per_text_counts(buf: np.ndarray, starts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """How many bytes of each joined text have table[byte] set."""
    cum = np.concatenate([[0], np.cumsum(table[buf], dtype=np.int64)])
    ends = np.r_[starts[1:] - 1, buf.size] if starts.size else starts
    return cum[ends] - cum[starts]


def join_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all texts separated by a NUL (not a word byte), and each text's start offset."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    starts = np.zeros(len(encoded), dtype=np.int64)
    if encoded:
        starts[1:] = np.cumsum([len(e) + 1 for e in encoded[:-1]])
    return np.frombuffer(b"\x00".join(encoded), dtype=np.uint8), starts


def _is_word_byte(buf: np.ndarray) -> np.ndarray:
    """Same as _WORD_BYTE[buf], by arithmetic (a table lookup converts every index to int64)."""
    letter = ((buf | np.uint8(32)) - np.uint8(ord("a"))) < 26  # uint8 arithmetic wraps below 'a'
    return letter | (buf >= 0x80) | ((buf - np.uint8(ord("0"))) < 10) | (buf == ord("_"))


def words(texts: list[str]) -> Words:
    buf, doc_starts = join_texts(texts)
    if buf.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Words(np.zeros(0, dtype=np.uint64), empty, empty, len(texts), np.zeros(0, dtype=np.uint8))
    n = buf.size
    is_word = _is_word_byte(buf).view(np.int8)
    edges = _SCRATCH.get("edges", n + 1, np.int8)  # +1 where a word starts, -1 just after it ends
    edges[0], edges[n] = is_word[0], -is_word[n - 1]
    np.subtract(is_word[1:], is_word[:-1], out=edges[1:n])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    up, down = _POWERS.get(n + 1)
    weighted = _SCRATCH.get("weighted", n, np.uint64)  # byte value + 1, ASCII upper case folded to lower
    np.add(buf, 1, out=weighted, dtype=np.uint64, casting="unsafe")
    np.add(weighted, 32, out=weighted, where=(buf - np.uint8(ord("A"))) < 26)
    np.multiply(weighted, up[:n], out=weighted)
    prefix = _SCRATCH.get("prefix", n + 1, np.uint64)
    prefix[0] = 0
    np.cumsum(weighted, out=prefix[1:])
    # sum of byte*BASE**i over the word, shifted to start at BASE**0 so equal words hash equally
    hashes = mix64((prefix[ends] - prefix[starts]) * down[starts])
    doc = np.searchsorted(doc_starts, starts, side="right") - 1
    return Words(hashes, doc.astype(np.int64), (ends - starts).astype(np.int64), len(texts), buf[starts])


def _chain(parts: list[np.ndarray]) -> np.ndarray:
    h = parts[0] * _CHAIN
    for p in parts[1:]:
        h = (h ^ p) * _CHAIN
    return mix64(h)


def ngrams(w: Words, n: int, short_docs: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashes of every word n-gram, the document of each, and the index of its first word.

    A document with fewer than n words (but at least one) gets a single n-gram made of all its
    words when `short_docs` is true, so that short documents can still be compared."""
    m = len(w.hashes) - n + 1
    if m > 0:
        h = _chain([w.hashes[j:j + m] for j in range(n)])
        first = np.arange(m, dtype=np.int64)
        same_doc = w.doc[:m] == w.doc[n - 1:]
        h, first = h[same_doc], first[same_doc]
    else:
        h, first = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    if short_docs:
        counts = w.counts()
        short = np.flatnonzero((counts > 0) & (counts < n))
        if short.size:
            offsets = np.concatenate([[0], np.cumsum(counts)])
            extra = [_chain([w.hashes[i:i + 1] for i in range(offsets[d], offsets[d + 1])])[0] for d in short]
            h = np.concatenate([h, np.array(extra, dtype=np.uint64)])
            first = np.concatenate([first, offsets[short]])
            order = np.argsort(first, kind="stable")
            h, first = h[order], first[order]
    return h, w.doc[first], first
