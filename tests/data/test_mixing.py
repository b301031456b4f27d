import numpy as np
import pytest

from lmforge.corpus.document import Document
from lmforge.data.mixing import MixingConfig, assign_clusters, copies, domain_of, kmeans
from lmforge.errors import LmforgeError


def test_copies_are_deterministic_and_average_to_the_weight():
    ids = [f"doc{i}" for i in range(20000)]
    for weight in (0.0, 0.3, 1.0, 2.5):
        n = [copies(i, weight, seed=1) for i in ids]
        assert n == [copies(i, weight, seed=1) for i in ids]
        assert np.mean(n) == pytest.approx(weight, abs=0.02)
        assert set(n) <= {int(weight), int(weight) + 1}
    with pytest.raises(LmforgeError):
        copies("x", -1.0)


def test_domains_by_source_meta_and_cluster():
    doc = Document("a", "text", "web", {"lang": "de"})
    assert domain_of(doc, MixingConfig()) == "web"
    assert domain_of(doc, MixingConfig(domain="meta:lang")) == "de"
    assert domain_of(doc, MixingConfig(domain="cluster"), {"a": 3}) == "cluster3"
    with pytest.raises(LmforgeError):
        domain_of(doc, MixingConfig(domain="nonsense"))


def test_kmeans_on_hashed_embeddings_separates_topics():
    cooking = [Document(f"c{i}", f"bake the bread with flour butter sugar oven recipe {i}", "x") for i in range(20)]
    code = [Document(f"p{i}", f"def function return import class module variable {i}", "x") for i in range(20)]
    clusters = assign_clusters(cooking + code, MixingConfig(domain="cluster", clusters=2))
    assert len({clusters[d.id] for d in cooking}) == 1 and len({clusters[d.id] for d in code}) == 1
    assert clusters["c0"] != clusters["p0"]
    assert kmeans(np.zeros((3, 2)), 5).tolist() == [0, 0, 0]  # k is capped, degenerate input is fine
