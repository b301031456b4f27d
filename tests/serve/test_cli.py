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
