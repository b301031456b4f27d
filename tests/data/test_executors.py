"""Must-show: the local and the Ray executor produce byte-identical outputs."""
import importlib.util

import pytest

from lmforge.data.config import PipelineConfig
from lmforge.data.executors import LocalExecutor, make_executor
from lmforge.data.pipeline import clean_corpus
from lmforge.data.shards import read_index
from lmforge.data.token_shards import write_token_shards
from lmforge.errors import LmforgeError
from tests.data.corpus import messy_corpus, write_eval_set

HAS_RAY = importlib.util.find_spec("ray") is not None


def _square(context, item):
    return context * item * item


def test_local_executor_keeps_order_and_ships_the_context_once():
    for workers in (1, 2):
        ex = LocalExecutor(workers).open(context=10)
        try:
            assert list(ex.map(_square, range(20))) == [10 * i * i for i in range(20)]
        finally:
            ex.close()


def test_unknown_engine_is_a_user_error():
    with pytest.raises(LmforgeError, match="unknown engine"):
        make_executor("spark")


@pytest.mark.skipif(HAS_RAY, reason="Ray is installed")
def test_ray_engine_without_ray_says_how_to_install():
    with pytest.raises(LmforgeError, match=r"lmforge\[ray\]"):
        make_executor("ray")


def _outputs(out_dir) -> dict[str, bytes]:
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.suffix in (".zst", ".bin") or p.name == "index.json"}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'lmforge[ray]'); "
                                        "local/Ray byte-identity not checked")
def test_local_and_ray_executors_write_byte_identical_shards(tmp_path):
    from lmforge.tokenizer import train_tokenizer
    docs, _ = messy_corpus(seed=3, n_prose=150, n_code=60)
    tok = train_tokenizer((d.text for d in docs), kind="byte-bpe", vocab_size=400)
    outputs = {}
    for engine in ("local", "ray"):
        cfg = PipelineConfig()
        cfg.engine.engine, cfg.engine.workers, cfg.engine.batch_docs = engine, 2, 25
        cfg.decontam.eval_sets = [write_eval_set(tmp_path / "eval.jsonl")]
        result = clean_corpus(docs, tmp_path / engine / "clean", cfg)
        assert result.report["engine"] == engine and result.report["batches"] > 4
        write_token_shards(result, tok, tmp_path / engine / "tokens", shard_tokens=2000)
        outputs[engine] = _outputs(tmp_path / engine)
    assert len(outputs["local"]) > 10 and outputs["local"].keys() == outputs["ray"].keys()
    for name in outputs["local"]:
        if name.endswith("index.json"):  # holds timings and paths: compare its shard table only
            assert read_index(tmp_path / "local" / "tokens")["splits"] == read_index(tmp_path / "ray" / "tokens")["splits"]
            continue
        assert outputs["local"][name] == outputs["ray"][name], name
