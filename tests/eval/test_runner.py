"""The runner: result cache (a re-run skips finished items), reports (JSON, Markdown, plot), CLI."""
import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.eval.result_cache import ResultCache
from lmforge.eval.runner import evaluate
from lmforge.eval.tasks import make_task

from .conftest import DATA


def mc_backend(scripted):
    return scripted(loglikelihood=lambda ctx, cont: (-float(len(cont)), False))


def test_rerun_uses_the_cache_and_gives_the_same_report(scripted, tmp_path):
    cache = ResultCache(tmp_path / "cache.sqlite")
    backend = mc_backend(scripted)
    first = evaluate(backend, [make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 1})], tmp_path / "a", cache,
                     show_progress=False)
    calls = backend.calls["loglikelihood"]
    assert calls == 40 and first["tasks"]["mc"]["from_cache"] == 0  # 10 questions x 4 choices
    again = evaluate(backend, [make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 1})], tmp_path / "b", cache,
                     show_progress=False)
    assert backend.calls["loglikelihood"] == calls  # nothing evaluated twice
    assert again["tasks"]["mc"]["from_cache"] == 10
    assert again["tasks"]["mc"]["metrics"] == first["tasks"]["mc"]["metrics"]
    # another option (different prompts) or another model means new items
    evaluate(backend, [make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 0})], None, cache, show_progress=False)
    assert backend.calls["loglikelihood"] == 2 * calls
    other = mc_backend(scripted)
    other.info.details["fingerprint"] = "v2"
    evaluate(other, [make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 1})], None, cache, show_progress=False)
    assert other.calls["loglikelihood"] == calls


def test_interrupted_run_resumes(scripted, tmp_path):
    cache = ResultCache(tmp_path / "cache.sqlite")
    seen = []

    def flaky(ctx, cont):
        seen.append(ctx)
        if len(seen) > 4 * 5:  # dies partway, after some chunks were cached
            raise KeyboardInterrupt
        return (-1.0, False)

    task = make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 1})
    task.chunk_size = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(scripted(loglikelihood=flaky), [task], None, cache, show_progress=False)
    backend = mc_backend(scripted)
    report = evaluate(backend, [task], None, cache, show_progress=False)
    assert report["tasks"]["mc"]["from_cache"] == 4  # two full chunks of two questions survived
    assert backend.calls["loglikelihood"] == 4 * 6


def test_report_files(scripted, tmp_path):
    backend = scripted(loglikelihood=lambda ctx, cont: (-float(len(cont)), False),
                       rolling=lambda text: (-0.5 * len(text.encode()), len(text) // 4))
    report = evaluate(backend, [make_task(f"arc:{DATA / 'arc_style.jsonl'}"),
                                make_task(f"bpb:{DATA / 'held_out.jsonl'}")], tmp_path, None, show_progress=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metadata"]["model"] == "scripted" and "torch" in saved["metadata"]
    arc = saved["tasks"]["arc"]
    assert set(arc["metrics"]) == {"acc", "acc_norm"} and set(arc["stderr"]) == {"acc", "acc_norm"}
    assert arc["n"] == 4 and arc["config"]["style"] == "cloze"
    table = (tmp_path / "report.md").read_text()
    assert "| arc | acc |" in table and "| bpb | bits_per_byte |" in table
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert report["files"]["plot"].endswith("metrics.png")


def test_cli_end_to_end_on_a_real_model(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--tasks",
        f"bpb:{DATA / 'held_out.txt'},mmlu:{DATA / 'mmlu_style'},gsm8k:{DATA / 'gsm8k_style.jsonl'}",
        "--set", "mmlu.shots=1", "--set", "gsm8k.max_new_tokens=8", "--set", "gsm8k.shots=1",
        "--limit", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == {"bpb", "mmlu", "gsm8k"}
    assert 0 <= report["tasks"]["mmlu"]["metrics"]["acc"] <= 1 and report["tasks"]["mmlu"]["n"] == 3
    assert report["tasks"]["bpb"]["metrics"]["bits_per_byte"] > 0
    assert "| mmlu | acc |" in result.output
    again = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--tasks", f"mmlu:{DATA / 'mmlu_style'}",
                                     "--set", "mmlu.shots=1", "--limit", "3", "--out", str(out), "--no-progress"])
    assert again.exit_code == 0
    assert json.loads((out / "report.json").read_text())["tasks"]["mmlu"]["from_cache"] == 3


@pytest.mark.parametrize("args, message", [
    (["--tasks", "bogus"], "unknown task"),
    (["--tasks", "mc:/no/such/file.csv"], "not found"),
    (["--tasks", "mc", "--set", "humaneval.samples=2"], "not in --tasks"),
])
def test_cli_errors_are_clear(tiny_model_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path), *args])
    assert isinstance(result.exception, LmforgeError) and message in str(result.exception)


def test_cli_needs_exactly_one_model_source(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--tasks", "bpb", "--out", str(tmp_path)])
    assert isinstance(result.exception, LmforgeError) and "exactly one" in str(result.exception)


def test_speedrun_humaneval_pass_at_1(tiny_backend):
    from lmforge.eval import humaneval_pass_at_1
    from lmforge.eval.tasks.code_problems import humaneval_data_file

    out = humaneval_pass_at_1(tiny_backend.model, tiny_backend.tok, limit=3, max_new_tokens=16, timeout=3.0)
    if humaneval_data_file() is None:
        assert "skipped" in out
        return
    assert out["problems"] == 3 and sum(out["statuses"].values()) == 3
    assert out["pass@1"] == out["passed"] / 3 and out["seconds"] > 0
