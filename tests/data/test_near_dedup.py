"""Must-show: planted near-duplicates at known Jaccard similarity are found with recall and
precision >= 0.95 at threshold 0.8, and fewer than 5% duplicates remain."""
from collections import defaultdict

import numpy as np
import pytest

from lmforge.data.dedup_near import NearDupConfig, batch_signatures, find_near_duplicates
from lmforge.data.planted import evaluate_pairs, planted_corpus, remaining_duplicate_rate


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(n_bases=500, seed=11)


def _clusters_to_pairs(cluster: np.ndarray) -> set[tuple[int, int]]:
    members = defaultdict(list)
    for i, root in enumerate(cluster.tolist()):
        members[root].append(i)
    return {(m[i], m[j]) for m in members.values() for i in range(len(m)) for j in range(i + 1, len(m))}


def test_planted_near_duplicates_recall_precision_and_final_rate(corpus):
    cfg = NearDupConfig(threshold=0.8)
    texts = [d.text for d in corpus.documents]
    sig, valid = [], []
    for i in range(0, len(texts), 128):  # batched as the pipeline does: results must not depend on it
        s, v = batch_signatures(texts[i:i + 128], cfg)
        sig.append(s)
        valid.append(v)
    res = find_near_duplicates(np.concatenate(sig), np.concatenate(valid), np.array([len(t) for t in texts]), cfg)
    scores = evaluate_pairs(_clusters_to_pairs(res.cluster), corpus, 0.8)
    before = len(corpus.true_pairs(0.8)) / len(texts)
    after = remaining_duplicate_rate(res.keep, corpus, 0.8)
    print(f"\nnear-dup @0.8: precision {scores['precision']:.3f} recall {scores['recall']:.3f} "
          f"({scores['true_pairs']} true pairs); duplicate rate {before:.1%} -> {after:.2%}")
    assert scores["true_pairs"] >= 200
    assert scores["recall"] >= 0.95
    assert scores["precision"] >= 0.95
    assert after < 0.05 < before


def test_detection_rate_by_planted_similarity(corpus):
    """The S-curve: copies well above the threshold are caught, well below are left alone."""
    cfg = NearDupConfig(threshold=0.8)
    texts = [d.text for d in corpus.documents]
    sig, valid = batch_signatures(texts, cfg)
    res = find_near_duplicates(sig, valid, np.array([len(t) for t in texts]), cfg)
    by_level = defaultdict(list)
    for a, b, _ in corpus.pairs:
        level = corpus.documents[a if corpus.documents[a].source == "planted" else b].meta["target"]
        by_level[level].append(res.cluster[a] == res.cluster[b])
    rate = {level: float(np.mean(v)) for level, v in by_level.items()}
    assert rate[1.0] == 1.0 and rate[0.95] == 1.0 and rate[0.9] >= 0.95
    assert rate[0.5] == 0.0 and rate[0.6] <= 0.05 and rate[0.7] <= 0.15


def test_bands_and_threshold_are_configurable(corpus):
    texts = [d.text for d in corpus.documents[:300]]
    loose = NearDupConfig(threshold=0.5)
    strict = NearDupConfig(threshold=0.95, bands=8, rows=16)
    assert strict.band_layout() == (8, 16)
    n_loose = find_near_duplicates(*batch_signatures(texts, loose), np.ones(len(texts)), loose).keep.sum()
    n_strict = find_near_duplicates(*batch_signatures(texts, strict), np.ones(len(texts)), strict).keep.sum()
    assert n_loose < n_strict  # a lower threshold removes more


def test_datasketch_backend_finds_the_same_duplicates(corpus):
    texts = [d.text for d in corpus.documents[:400]]
    keep = {}
    for backend in ("numpy", "datasketch"):
        cfg = NearDupConfig(backend=backend)
        keep[backend] = find_near_duplicates(*batch_signatures(texts, cfg), np.array([len(t) for t in texts]), cfg).keep
    assert (keep["numpy"] != keep["datasketch"]).sum() <= 2  # estimates differ, decisions barely
    assert (~keep["numpy"]).sum() > 40
    from lmforge.errors import LmforgeError
    with pytest.raises(LmforgeError, match="backend"):
        batch_signatures(texts[:2], NearDupConfig(backend="faiss"))
