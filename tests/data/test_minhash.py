import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from lmforge.data import hashing
from lmforge.data.dedup_near import NearDupConfig, UnionFind, batch_signatures, find_near_duplicates
from lmforge.data.minhash import band_keys, candidate_pairs, optimal_bands, signatures
from lmforge.data.planted import jaccard, shingle_set


def test_word_hashes_are_case_insensitive_and_batch_independent():
    a = hashing.words(["Hello, World! café"])
    b = hashing.words(["x", "hello world CAFÉ".replace("É", "é")])
    assert a.hashes.tolist() == b.hashes[1:].tolist()
    assert b.doc.tolist() == [0, 1, 1, 1]
    assert a.length.tolist() == [5, 5, len("café".encode())]


def test_ngrams_never_cross_documents_and_short_documents_get_one():
    w = hashing.words(["a b c", "d e f g h i", "", "j"])
    h, doc, first = hashing.ngrams(w, 5)
    assert doc.tolist() == [0, 1, 1, 3]  # doc 0 (3 words) and doc 3 (1 word) get one n-gram each
    h2, doc2, _ = hashing.ngrams(w, 5, short_docs=False)
    assert doc2.tolist() == [1, 1]
    assert len(set(h.tolist())) == len(h)


def _random_sets(rng, n, j):
    """Two random sets whose union has n items, about j*n of them shared; returns the exact Jaccard."""
    union = n
    shared = int(round(j * union))
    items = rng.choice(2**62, size=union + (union - shared), replace=False).astype(np.uint64)
    common, rest = items[:shared], items[shared:]
    half = (union - shared) // 2
    a = np.concatenate([common, rest[:half]])
    b = np.concatenate([common, rest[half:union - shared]])
    true = shared / len(np.union1d(a, b))
    return a, b, true


@pytest.mark.parametrize("size", [40, 400])
def test_signature_estimates_match_true_jaccard_like_datasketch(size):
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for j in (0.2, 0.5, 0.8, 0.9):
        for _ in range(10):
            a, b, true = _random_sets(rng, size, j)
            sig, _ = signatures(np.concatenate([a, b]), np.r_[np.zeros(len(a), int), np.ones(len(b), int)], 2)
            ours.append(abs((sig[0] == sig[1]).mean() - true))
            ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
            ma.update_batch([int(x).to_bytes(8, "little") for x in a])
            mb.update_batch([int(x).to_bytes(8, "little") for x in b])
            theirs.append(abs(ma.jaccard(mb) - true))
    # one-permutation hashing with densification is as accurate as K-permutation MinHash
    assert np.mean(ours) < 0.045 and np.mean(ours) < 1.5 * np.mean(theirs) + 0.01


def test_equal_sets_get_equal_signatures_even_when_tiny():
    sig, valid = batch_signatures(["one two", "ONE  two", "three", ""], NearDupConfig())
    assert valid.tolist() == [True, True, True, False]
    assert (sig[0] == sig[1]).all() and not (sig[0] == sig[2]).all()
    assert len(set(sig[0].tolist())) == 1  # a single shingle fills every bin by densification


def test_band_layout_matches_datasketch_for_equal_weights():
    assert optimal_bands(0.8, 128) == _optimal_param(0.8, 128, 0.5, 0.5)
    assert optimal_bands(0.5, 64, 0.3, 0.7) == _optimal_param(0.5, 64, 0.3, 0.7)


def test_candidate_pairs_from_shared_band_keys():
    keys = np.array([[1, 9], [1, 8], [2, 8], [3, 7], [4, 6]], dtype=np.uint64)
    assert candidate_pairs(keys).tolist() == [[0, 1], [1, 2]]
    big = np.zeros((100, 1), dtype=np.uint64)  # one bucket over max_bucket: linear number of pairs
    pairs = candidate_pairs(big, max_bucket=10)
    assert len(pairs) < 200 and {0, 99} <= set(pairs.ravel().tolist())
    assert band_keys(np.zeros((2, 8), dtype=np.uint32), 2, 4).shape == (2, 2)


def test_union_find_roots_are_smallest_members():
    uf = UnionFind(6)
    for a, b in [(4, 5), (2, 4), (0, 1)]:
        uf.union(a, b)
    assert uf.roots().tolist() == [0, 0, 2, 3, 2, 2]


def test_keep_rule_longest_then_earliest():
    text = " ".join(f"w{i}" for i in range(60))
    docs = [text, text + " extra words here", text, "something else entirely " * 5]
    sig, valid = batch_signatures(docs, NearDupConfig())
    res = find_near_duplicates(sig, valid, np.array([len(d) for d in docs]), NearDupConfig())
    assert res.keep.tolist() == [False, True, False, True]
    assert res.cluster[0] == res.cluster[1] == res.cluster[2] != res.cluster[3]


def test_planted_copies_hit_their_target_similarity():
    from lmforge.data.planted import planted_corpus
    c = planted_corpus(n_bases=40, levels={0.9: 5, 0.6: 5}, seed=3)
    for a, b, j in c.pairs:
        copy = a if c.documents[a].source == "planted" else b
        target = c.documents[copy].meta["target"]
        assert target <= j < target + 0.06
        assert j == pytest.approx(jaccard(shingle_set(c.documents[a].text), shingle_set(c.documents[b].text)))
