"""A short run of benchmarks/grpo_gain.py end to end (the full demonstration takes ~15 CPU-minutes a seed;
its figures are in the README): SFT, GRPO and the control run, and the JSON has every figure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_grpo_gain_script_runs_and_reports_start_gain_and_control(tmp_path):
    out = tmp_path / "gain.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_gain.py"), "--seeds", "3", "--sft-steps", "4", "--sft-stages", "2", "--sft-target", "1.01",
                        "--sft-examples", "200", "--grpo-steps", "2", "--dim", "32", "--layers", "1", "--prompts", "2",
                        "--group", "4", "--val", "12", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seed 3: SFT 8 steps" in r.stdout and "wrong-answer control" in r.stdout
    run = json.loads(out.read_text())["raw"]["runs"][0]
    assert run["sft_total_steps"] == 8 and len(run["sft_train_probes"]) == 2   # target unreachable: every stage
    for side in ("grpo", "control"):
        assert 0 <= run[side]["exact_match"] <= 1 and run[side]["kl_last"] >= 0
        assert run[side]["wins"] - run[side]["losses"] == pytest.approx(run[side]["exact_match"] - run["sft_exact_match"])
    assert run["gain_points"] == pytest.approx(100 * (run["grpo"]["exact_match"] - run["sft_exact_match"]))
