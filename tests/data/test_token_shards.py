import numpy as np
import pytest

from lmforge.data.config import PipelineConfig
from lmforge.corpus.document import Document
from lmforge.data.mixing import MixingConfig
from lmforge.data.pipeline import clean_corpus
from lmforge.data.shards import TokenShards, read_index
from lmforge.data.token_shards import doc_split, write_token_shards
from lmforge.tokenizer import train_tokenizer
from tests.data.corpus import messy_corpus


@pytest.fixture(scope="module")
def tok():
    docs, _ = messy_corpus(seed=1)
    return train_tokenizer((d.text for d in docs), kind="byte-bpe", vocab_size=400)


def corpus(n=120):
    docs = []
    for i in range(n):
        meta = {"split": "val"} if i % 10 == 0 else {}
        docs.append(Document(f"d{i}", f"document {i} says " + "hello world " * (i % 7 + 1), "ab"[i % 2], meta))
    return docs


def _decode_split(tok, shard_dir, split) -> list[str]:
    shards = TokenShards(shard_dir, split)
    tokens = shards.slice(0, len(shards))
    ends = np.flatnonzero(tokens == shards.eos_id)
    starts = np.r_[0, ends[:-1] + 1]
    return [tok.decode_bytes(tokens[s:e].tolist()).decode() for s, e in zip(starts, ends)]


def test_shards_round_trip_with_the_split_rule(tok, tmp_path):
    docs = corpus()
    summary = write_token_shards(docs, tok, tmp_path / "s", val_fraction=0.3, shard_tokens=500)
    for split in ("train", "val"):
        expected = [d.text for d in docs if doc_split(d, 0.3) == split]
        assert _decode_split(tok, tmp_path / "s", split) == expected
        assert summary["splits"][split]["documents"] == len(expected)
    assert all(doc_split(d, 0.3) == "val" for d in docs if d.meta.get("split") == "val")
    assert summary["splits"]["train"]["shards"] > 1  # rolled over at shard_tokens
    assert summary["domains"].keys() == {"a", "b"}


def test_mixing_weights_resample_training_documents_only(tok, tmp_path):
    docs = corpus()
    plain = write_token_shards(docs, tok, tmp_path / "plain", val_fraction=0.3)
    mixed = write_token_shards(docs, tok, tmp_path / "mixed", val_fraction=0.3,
                               mixing=MixingConfig(weights={"a": 2.0, "b": 0.0}))
    assert mixed["splits"]["val"] == plain["splits"]["val"]
    train_a = [d.text for d in docs if d.source == "a" and doc_split(d, 0.3) == "train"]
    assert _decode_split(tok, tmp_path / "mixed", "train") == train_a + train_a  # repeats in a second pass
    assert mixed["passes"] == 2


def test_finished_shard_set_is_reused_and_interrupted_one_resumes(tok, tmp_path):
    docs = corpus()
    reference = write_token_shards(docs, tok, tmp_path / "ref", shard_tokens=300, input_id="v1")
    assert write_token_shards(docs, tok, tmp_path / "ref", shard_tokens=300, input_id="v1")["reused"]

    def crashing():
        for i, d in enumerate(docs):
            if i == 90:
                raise KeyboardInterrupt
            yield d

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(crashing(), tok, out, shard_tokens=300, input_id="v1", batch_docs=16)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert finished and not (out / "index.json").exists()
    summary = write_token_shards(docs, tok, out, shard_tokens=300, input_id="v1")
    assert summary["resumed_documents"] > 0
    assert all((out / name).stat().st_mtime_ns == t for name, t in finished.items())
    for split in ("train", "val"):
        a, b = TokenShards(tmp_path / "ref", split), TokenShards(out, split)
        assert np.array_equal(a.slice(0, len(a)), b.slice(0, len(b)))
    assert read_index(out)["splits"] == read_index(tmp_path / "ref")["splits"]
    assert summary["splits"] == reference["splits"]


def test_clean_then_shard_end_to_end(tok, tmp_path):
    docs, _ = messy_corpus(seed=2)
    cfg = PipelineConfig()
    cfg.decontam.enabled = False
    cleaned = clean_corpus(docs, tmp_path / "clean", cfg)
    summary = write_token_shards(cleaned, tok, tmp_path / "tokens")
    assert sum(s["documents"] for s in summary["splits"].values()) == len(cleaned)
    assert read_index(tmp_path / "tokens")["lmforge_data"]["input"] == cleaned.report["fingerprint"]
