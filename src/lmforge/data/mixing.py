"""Domain mixing: per-domain weights that up- or down-sample documents when token shards are
written. A weight w gives each document floor(w) copies plus one more with probability
frac(w), decided by a hash of (seed, document id), so the mix is deterministic; 0 drops a domain.

Domains are the document's `source` (default), a metadata field (`meta:lang`), or k-means
clusters of document embeddings (`cluster`): by default a hashed bag-of-words embedding that
needs nothing, or a local sentence-transformers model directory (`embedder: path`) when the
`sentence-transformers` package is installed.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from lmforge.data import hashing
from lmforge.corpus.document import Document
from lmforge.errors import LmforgeError


@dataclass
class MixingConfig:
    domain: str = "source"  # source | meta:KEY | cluster
    weights: dict = field(default_factory=dict)  # domain -> weight
    default_weight: float = 1.0
    seed: int = 0
    clusters: int = 8
    embedder: str = "hashing"  # hashing | path to a local sentence-transformers model
    embed_dim: int = 512


def unit_hash(seed: int, key: str) -> float:
    """A deterministic number in [0, 1) for (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def copies(doc_id: str, weight: float, seed: int = 0) -> int:
    if weight < 0 or math.isnan(weight):
        raise LmforgeError(f"mixing weights must be >= 0, got {weight}")
    whole = int(weight)
    return whole + (1 if unit_hash(seed, doc_id) < weight - whole else 0)


def weight_of(domain: str, cfg: MixingConfig) -> float:
    return float(cfg.weights.get(domain, cfg.default_weight))


def domain_of(doc: Document, cfg: MixingConfig, clusters: dict[str, int] | None = None) -> str:
    if cfg.domain == "source":
        return doc.source or "unknown"
    if cfg.domain.startswith("meta:"):
        return str(doc.meta.get(cfg.domain[5:], "unknown"))
    if cfg.domain == "cluster":
        if clusters is None:
            raise LmforgeError("cluster domains need assign_clusters() first")
        return f"cluster{clusters[doc.id]}"
    raise LmforgeError(f"mixing.domain must be source, meta:KEY or cluster, got {cfg.domain!r}")


# --- embedding clusters ---------------------------------------------------------------------------
def hashing_embed(texts: list[str], dim: int = 512) -> np.ndarray:
    """L2-normalised hashed bag of words with sublinear term frequency."""
    w = hashing.words(texts)
    out = np.zeros((len(texts), dim), dtype=np.float32)
    np.add.at(out, (w.doc, (w.hashes % np.uint64(dim)).astype(np.int64)), 1.0)
    out = np.log1p(out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def sentence_transformer_embed(texts: list[str], model_dir: str) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise LmforgeError("mixing.embedder is a model path but sentence-transformers is not installed; "
                           "use embedder=hashing or pip install sentence-transformers") from e
    model = SentenceTransformer(model_dir, local_files_only=True)
    return np.asarray(model.encode(texts, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Cluster labels by Lloyd's algorithm from a k-means++ start (deterministic for a seed)."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    centres = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        d2 = (x ** 2).sum(1)[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None, :]
        new = d2.argmin(1)
        if _ and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels


def assign_clusters(docs: list[Document], cfg: MixingConfig) -> dict[str, int]:
    texts = [d.text for d in docs]
    if cfg.embedder == "hashing":
        x = hashing_embed(texts, cfg.embed_dim)
    else:
        x = sentence_transformer_embed(texts, cfg.embedder)
    labels = kmeans(x, cfg.clusters, cfg.seed)
    return {d.id: int(c) for d, c in zip(docs, labels)}
