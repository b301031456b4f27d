import json
import subprocess
import sys

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.shards import read_index
from lmforge.errors import LmforgeError

runner = CliRunner()


def _write_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    records = [{"text": f"Record {i} of the set, with the words that make it a long enough text to keep. "
                        f"It mentions item {i} and is written to be unique, so that nothing here is a duplicate "
                        f"of anything else in the set; contact person{i}@example.com for more.", "url": f"http://x.org/{i}"}
               for i in range(30)]
    (src / "web.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    (src / "tool.py").write_text("import sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg.upper())\n")
    return src


def test_clean_then_shards_from_the_command_line(tmp_path):
    src = _write_inputs(tmp_path)
    out = tmp_path / "clean"
    r = runner.invoke(app, ["data", "clean", str(src), "--out", str(out), "--workers", "1", "--no-progress",
                            "quality.text.min_words=10", "decontam.enabled=false", "engine.batch_docs=8"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["documents_in"] == 31 and report["read"]["skipped"] == {"invalid JSON": 1}
    assert report["pii"]["email"] == 30 and report["batches"] == 4
    assert "lmforge data clean" in r.output and "PII redacted" in r.output

    from lmforge.tokenizer import train_tokenizer
    tok = train_tokenizer(["Record of the set " * 20], kind="byte-bpe", vocab_size=300)
    tok.save(tmp_path / "tok")
    r = runner.invoke(app, ["data", "shards", str(out), "--tokenizer", str(tmp_path / "tok"), "--out",
                            str(tmp_path / "shards"), "--no-progress", "tokens.val_fraction=0.2"])
    assert r.exit_code == 0, r.output
    index = read_index(tmp_path / "shards")
    assert index["lmforge_data"]["val_fraction"] == 0.2
    assert sum(e["documents"] for shards in index["splits"].values() for e in shards) == report["documents_out"]

    r = runner.invoke(app, ["data", "report", str(out)])
    assert r.exit_code == 0 and "near_dedup" in r.output


def test_pii_bench_command_prints_precision_and_recall():
    r = runner.invoke(app, ["data", "pii-bench", "--docs", "100", "--json"])
    assert r.exit_code == 0
    result = json.loads(r.output)
    assert result["overall"]["recall"] >= 0.95 and set(result["per_type"]) >= {"email", "iban", "secret"}


def test_bad_override_is_a_user_error(tmp_path):
    r = runner.invoke(app, ["data", "clean", "--out", str(tmp_path), "near.thresold=0.5"])
    assert isinstance(r.exception, LmforgeError) and "valid keys" in str(r.exception)


def test_user_errors_print_one_line_without_traceback(tmp_path):
    code = "import sys; from lmforge.cli import main; sys.argv = sys.argv[1:]; main()"
    p = subprocess.run([sys.executable, "-c", code, "lmforge", "data", "clean", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "input not found" in p.stderr and "Traceback" not in p.stderr
