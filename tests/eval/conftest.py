import json
from pathlib import Path

import pytest
import torch

from lmforge.eval.backend import BackendInfo

DATA = Path(__file__).parent / "data"

TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3,
    "Question: What is 2 + 2?\nAnswer: 4\n\n", "A. red\nB. blue\nC. green\nD. yellow\nAnswer: B",
    "The special magic number is 12345. The lighthouse keeper wrote the weather.",
] * 4


def make_tiny_hf_model(directory: Path, max_positions: int = 512, layers: int = 2, seed: int = 0) -> Path:
    """A random transformers.LlamaForCausalLM saved with save_pretrained, plus a byte-level BPE
    tokenizer in the same directory: loadable by lmforge.model.load and by transformers."""
    transformers = pytest.importorskip("transformers")
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TOKENIZER_TEXT, vocab_size=300, min_frequency=1)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=tok.eos_id,
        bos_token_id=tok.hf.token_to_id("<|startoftext|>"), pad_token_id=tok.hf.token_to_id("<|pad|>"))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so argmax/greedy checks mean something
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(directory)
    # what transformers' AutoTokenizer (and so lm-eval's HF backend) reads besides tokenizer.json
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    return directory


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads waiting for a busy core make each
    small matmul cost milliseconds. One thread keeps these tests fast and their timing stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from lmforge.eval.local_backend import LocalBackend
    return LocalBackend.from_ref(str(tiny_model_dir), device="cpu")


class ScriptedBackend:
    """A backend whose answers are given by the test: checks task logic exactly, no model needed."""

    def __init__(self, loglikelihood=None, generate=None, rolling=None):
        self._ll, self._gen, self._rolling = loglikelihood, generate, rolling
        self.info = BackendInfo("scripted", "scripted", {"fingerprint": "v1"})
        self.max_length = 1024
        self.calls = {"loglikelihood": 0, "generate": 0, "rolling": 0}

    def loglikelihood(self, requests, progress=None):
        self.calls["loglikelihood"] += len(requests)
        return [self._ll(c, x) for c, x in requests]

    def loglikelihood_rolling(self, texts, progress=None):
        self.calls["rolling"] += len(texts)
        return [self._rolling(t) for t in texts]

    def generate(self, requests, progress=None):
        self.calls["generate"] += len(requests)
        return [self._gen(r) for r in requests]


@pytest.fixture
def scripted():
    return ScriptedBackend


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
