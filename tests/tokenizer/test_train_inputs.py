"""`lmforge tokenizer train` reads its inputs with the corpus readers `data clean` uses, so the
output of `data clean` (docs/part_*.jsonl.zst) trains a tokenizer directly."""
import json

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.tokenizer import load_tokenizer

runner = CliRunner()
WORD = "quuxplorative"  # appears only inside the cleaned documents


def test_tokenizer_trains_on_data_clean_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    records = [{"text": f"Document {i}: the {WORD} engine reads item {i}, and every {WORD} line is different "
                        f"from the one before it because it counts {i * 7} apples and {i * 3} pears."}
               for i in range(40)]
    (src / "web.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    clean = tmp_path / "clean"
    r = runner.invoke(app, ["data", "clean", str(src), "--out", str(clean), "--workers", "1", "--no-progress",
                            "decontam.enabled=false", "quality.text.min_words=5"])
    assert r.exit_code == 0, r.output
    parts = sorted((clean / "docs").glob("part_*.jsonl.zst"))
    assert parts  # compressed JSON lines: unreadable as plain text files

    r = runner.invoke(app, ["tokenizer", "train", str(clean / "docs"), "--out", str(tmp_path / "tok"),
                            "--vocab-size", "300"])
    assert r.exit_code == 0, r.output
    tok = load_tokenizer(tmp_path / "tok")
    # Learned from the documents' text: their most frequent long word became one token; the JSON
    # wrapping of the records was not trained on.
    assert len(tok.encode(" " + WORD)) == 1
    assert len(tok.encode('{"text": "')) > 3

    # --split-digits: numbers are read digit by digit (the documents are full of multi-digit counts)
    r = runner.invoke(app, ["tokenizer", "train", str(clean / "docs"), "--out", str(tmp_path / "tok-digits"),
                            "--vocab-size", "300", "--split-digits"])
    assert r.exit_code == 0, r.output
    digits = load_tokenizer(tmp_path / "tok-digits")
    assert [digits.decode([i]) for i in digits.encode("273")] == ["2", "7", "3"]
    assert all(sum(c.isdigit() for c in digits.decode([i])) <= 1 for i in range(digits.vocab_size))
    steps = json.loads((tmp_path / "tok-digits" / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert {"type": "Digits", "individual_digits": True} in steps   # what makes it hold for any text
