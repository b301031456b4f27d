"""`lmforge chat` and `lmforge int8-report` from the command line, on a small checkpoint."""
import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.model import save
from tests.serve.helpers import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save(tiny_model(smollm_tokenizer.vocab_size), path)
    smollm_tokenizer.save(path)    # tokenizer.json + chat template beside the weights
    return path


def test_chat_command_answers_each_line(checkpoint):
    result = CliRunner().invoke(app, ["chat", str(checkpoint), "--max-tokens", "5", "--seed", "1"],
                                input="hello\n/reset\nsecond question\n/exit\n")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 2                 # one reply per question, nothing for the commands


def test_int8_report_command(checkpoint, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    result = CliRunner().invoke(app, ["int8-report", str(checkpoint), "--text-file", str(text)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tokens"] > 100 and abs(report["relative_change"]) < 0.05


def test_missing_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["chat", str(tmp_path / "nope")], input="hi\n")
    assert result.exit_code != 0 and "model not found" in str(result.exception)


def test_generate_streams_what_the_reference_sampler_generates(checkpoint, smollm_tokenizer):
    """`lmforge generate` (serving engine + detokenizer) prints the text of model.sampling.generate."""
    from lmforge.model import load
    from lmforge.model.sampling import generate

    prompt = "def fibonacci(n):"
    ids = list(generate(load(checkpoint), smollm_tokenizer.encode(prompt), 24, temperature=0,
                        stop_ids=smollm_tokenizer.stop_ids()))
    ids = [i for i in ids if i not in smollm_tokenizer.stop_ids()]
    expected = prompt + smollm_tokenizer.decode(ids, skip_special=True) + "\n"
    for spelling in (["generate", str(checkpoint)], ["generate", "-m", str(checkpoint)]):   # old alias too
        result = CliRunner().invoke(app, [*spelling, "-p", prompt, "--max-tokens", "24", "--temperature", "0",
                                          "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert result.output == expected


def test_generate_clamps_max_tokens_to_the_context(tmp_path, smollm_tokenizer):
    path = tmp_path / "short"
    save(tiny_model(smollm_tokenizer.vocab_size, max_seq_len=16), path)
    smollm_tokenizer.save(path)
    result = CliRunner().invoke(app, ["generate", str(path), "-p", "hello " * 40, "--max-tokens", "1000000",
                                      "--temperature", "0", "--seed", "0"])
    assert result.exit_code == 0, result.output
