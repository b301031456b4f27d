"""Exact deduplication on a hash of the normalised text, and URL-level deduplication.

Both keep the first occurrence in input order. Keys are 16-byte BLAKE2b digests, so the
driver holds 16 bytes per document, not the documents.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class ExactDedupConfig:
    enabled: bool = True


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def url_key(normalized_url: str | None) -> bytes | None:
    return None if normalized_url is None else hashlib.blake2b(normalized_url.encode(), digest_size=16).digest()


def first_occurrences(keys: Iterable[bytes | None], active: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask: True for the first document with each key (and for documents without a key).
    Documents where `active` is False are ignored: they neither count as seen nor get dropped."""
    keys = list(keys)
    keep = np.ones(len(keys), dtype=bool)
    seen: set[bytes] = set()
    for i, k in enumerate(keys):
        if k is None or (active is not None and not active[i]):
            continue
        if k in seen:
            keep[i] = False
        else:
            seen.add(k)
    return keep
