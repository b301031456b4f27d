"""The declared seams (typing.Protocol) and the classes that plug into them: every implementation
is an instance of its protocol (runtime_checkable) and its methods take the same parameters
(names, kinds, defaults), so a caller written against the protocol works with each of them."""
from __future__ import annotations

import inspect

import pytest
import torch

from lmforge.eval.attention_cache import SegmentCache
from lmforge.eval.backend import Backend
from lmforge.eval.tasks import TASKS, make_task
from lmforge.eval.tasks.base import EvalTask
from lmforge.model import ModelConfig
from lmforge.model.kv_cache import AttentionCache, KVCache
from lmforge.serve.paged_cache import PagedKVCache, StepBatch
from lmforge.serve.sequence import SamplingParams, Sequence

CFG = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def protocol_methods(protocol) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


def parameters(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def assert_implements(obj, protocol) -> None:
    assert isinstance(obj, protocol), f"{type(obj).__name__} does not provide every member of {protocol.__name__}"
    for name in protocol_methods(protocol):
        assert parameters(getattr(type(obj), name)) == parameters(getattr(protocol, name)), \
            f"{type(obj).__name__}.{name}{inspect.signature(getattr(type(obj), name))} differs from " \
            f"{protocol.__name__}.{name}{inspect.signature(getattr(protocol, name))}"


def step_batch() -> StepBatch:
    seq = Sequence("r0", [1, 2, 3], SamplingParams())
    seq.block_table = [0]
    return StepBatch(PagedKVCache(CFG, num_blocks=2, block_size=8), [(seq, 3)])


@pytest.mark.parametrize("make", [
    lambda: KVCache(CFG, batch_size=1),
    step_batch,
    lambda: SegmentCache([], [], torch.ones(1, 3, dtype=torch.bool)),
], ids=["KVCache", "serve.StepBatch", "eval.SegmentCache"])
def test_kv_caches_implement_the_attention_cache_protocol(make):
    assert_implements(make(), AttentionCache)


def test_protocol_methods_are_found_and_a_missing_member_is_refused():
    assert protocol_methods(AttentionCache) == ["attend", "advance"]
    cache = KVCache(CFG, batch_size=1)
    del cache.length
    assert not isinstance(cache, AttentionCache)

    class RenamedArgument(KVCache):
        def advance(self, steps: int) -> None:  # a caller passing n= would break
            super().advance(steps)

    with pytest.raises(AssertionError, match="advance"):
        assert_implements(RenamedArgument(CFG, batch_size=1), AttentionCache)


def test_backends_implement_the_backend_protocol(tiny_backend_for_protocol):
    from lmforge.eval.endpoint_backend import EndpointBackend
    assert_implements(tiny_backend_for_protocol, Backend)
    assert_implements(EndpointBackend("http://127.0.0.1:9", model="m"), Backend)  # named model: no request
    assert protocol_methods(Backend) == ["loglikelihood", "loglikelihood_rolling", "generate"]


@pytest.fixture
def tiny_backend_for_protocol():
    from lmforge.eval.local_backend import LocalBackend
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer
    tok = train_tokenizer(["abc def " * 20], vocab_size=300, min_frequency=1)
    return LocalBackend(Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4,
                                                n_kv_heads=2, hidden_dim=64, max_seq_len=64)), tok)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_implement_the_task_protocol(name):
    assert_implements(make_task(name), EvalTask)
    assert protocol_methods(EvalTask) == ["items", "evaluate", "aggregate", "fingerprint"]

