import numpy as np
import pytest

from lmforge.data.shards import ShardWriter


def write_random_shards(path, vocab=128, train_tokens=40_000, val_tokens=4_000, seed=0, shard_tokens=15_000):
    """Token shards of a learnable toy language: noisy repeats of a few fixed phrases."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(1, vocab, size=rng.integers(5, 20)) for _ in range(12)]
    writer = ShardWriter(path, vocab_size=vocab, eos_id=0, shard_tokens=shard_tokens)
    for split, budget in (("train", train_tokens), ("val", val_tokens)):
        n = 0
        while n < budget:
            doc = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=8)])
            writer.add(split, doc.tolist())
            n += len(doc) + 1
    writer.close()
    return path


@pytest.fixture
def toy_shards(tmp_path):
    return write_random_shards(tmp_path / "shards")
