"""`lmforge plan ...` and `lmforge scaling fit` end to end (Typer runner; errors through the real entry point)."""
import re
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lmforge.model.config import preset
from lmforge.plan import ScalingLaw, get_law, write_runs
from lmforge.plan.cli import number, register
from lmforge.plan.tables import count

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def invoke(app, *args):
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_params_memory_inference_time(app):
    out = invoke(app, "plan", "params", "1b")
    assert "2,154,989,568" in out and "attention" in out
    out = invoke(app, "plan", "memory", "1b", "--gpu", "a100-40gb", "--gpus", "8", "--tp", "2", "--pp", "4")
    assert "dp=1 tp=2 pp=4" in out and "fits" in out and "does not fit" not in out
    out = invoke(app, "plan", "memory", "7b", "--gpu", "h100", "--seq-len", "4096", "--zero", "3", "--flash")
    assert "does not fit" in out and "offload" in out
    out = invoke(app, "plan", "inference", "7b", "--batch", "8", "--seq-len", "4096", "--gpu", "a100-80gb")
    assert "512.0 KiB" in out and "largest batch" in out   # 2 x 32 layers x 4096 x 2 bytes per token
    # 13.21 GB of weights + 8 x 2.15 GB of K/V read at 2,039 GB/s
    assert "14.91 ms (memory-bound" in out and "67 per sequence, 537 for the batch" in out
    out = invoke(app, "plan", "time", "--params", "70B", "--tokens", "1.4T", "--gpus", "1024",
                 "--gpu", "a100-80gb", "--mfu", "0.45", "--price", "2")
    assert "5.880e+23" in out and "47.34 days" in out and "$2,326,686" in out


def test_plan_optimal_lists_the_published_laws(app):
    out = invoke(app, "plan", "optimal", "5.76e23")
    assert "32.2B" in out and "72.2B" in out and "69.3B" in out and "1.39T" in out


def test_scaling_fit_predicts_saves_and_plots(app, tmp_path):
    law = ScalingLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        n, d = 10 ** rng.uniform(7, 10), 10 ** rng.uniform(9, 12)
        loss = law.loss(n, d) * np.exp(rng.normal(0, 0.005))
        rows.append({"name": f"r{i}", "N": n, "D": d, "C": 6 * n * d, "loss": loss})
    csv = write_runs(tmp_path / "runs.csv", rows)
    out = invoke(app, "scaling", "fit", str(csv), "--predict", "7e9", "1.2e12", "--bootstrap", "30",
                 "--save", str(tmp_path / "law.json"))
    assert "alpha" in out and "bootstrap interval" in out
    predicted = float(out.split("D=1.2e+12:")[1].split()[0])
    assert predicted == pytest.approx(law.loss(7e9, 1.2e12), rel=0.01)
    png = tmp_path / "runs_fit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fitted = get_law(str(tmp_path / "law.json"))
    assert fitted.optimal(1e22)[0] == pytest.approx(law.optimal(1e22)[0], rel=0.5)
    out = invoke(app, "plan", "optimal", "1e22", "--law", str(tmp_path / "law.json"))
    assert count(fitted.optimal(1e22)[0]) in out
    out = invoke(app, "scaling", "fit", str(csv), "--power-law", "--irreducible", "--bootstrap", "0",
                 "--plot", str(tmp_path / "power.png"))
    assert "L(C) = a C^-b + E" in out and (tmp_path / "power.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["plan", "memory", "7b", "--gpus", "8", "--tp", "3"], "impossible plan"),
    (["plan", "memory", "7b", "--tp", "3", "--gpus", "3"], "does not divide the 32 attention heads"),
    (["plan", "memory", "7b", "--gpu", "tpu-v9"], "unknown GPU"),
    (["plan", "time", "--params", "seven", "--tokens", "1T"], "is not a number"),
    (["plan", "time", "--params", "7B", "--tokens", "1T", "--mfu", "1.5"], "MFU is a fraction"),
    (["scaling", "fit", "missing.csv"], "no such file"),
])
def test_user_errors_exit_2_with_one_clean_line(monkeypatch, capsys, argv, message):
    from lmforge.cli import main
    monkeypatch.setattr(sys, "argv", ["lmforge", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_malformed_csv_through_the_cli(monkeypatch, capsys, tmp_path):
    from lmforge.cli import main
    bad = tmp_path / "runs.csv"
    bad.write_text("N,D,loss\n1e6,2e7,oops\n")
    monkeypatch.setattr(sys, "argv", ["lmforge", "scaling", "fit", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "'oops' is not a number" in capsys.readouterr().err


def test_number_suffixes():
    assert number("7B") == 7e9 and number("1.4T") == 1.4e12 and number("5.76e23") == 5.76e23
    assert number("350m") == 350e6 and number("2k") == 2000


def test_plan_memory_fsdp_reshard_off_holds_every_block_gathered(app):
    # 7b, 8 GPUs, ZeRO-3 (FSDP2): without resharding the 32 blocks stay gathered (bf16) instead of 2.
    on = invoke(app, "plan", "memory", "7b", "--gpus", "8", "--zero", "3", "--flash")
    off = invoke(app, "plan", "memory", "7b", "--gpus", "8", "--zero", "3", "--flash", "--no-reshard")
    assert "no reshard after forward" in off and "no reshard" not in on
    cfg = preset("7b")
    block = (cfg.num_params() - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / cfg.n_layers  # untied embed + head
    temp = {name: float(re.search(r"temporary buffers\s*│\s*([\d.,]+) GB", out).group(1).replace(",", ""))
            for name, out in (("on", on), ("off", off))}
    assert temp["off"] - temp["on"] == pytest.approx(31 * block * 2 / 1e9, abs=0.01)
    # per micro-batch: gather every unit forward + the blocks again backward, reduce-scatter bf16 grads
    gathers = float(re.search(r"all_gather ([\d.,]+) GB", on).group(1))
    assert gathers == pytest.approx(2 * (2 * cfg.num_params() - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / 1e9,
                                    abs=0.01)
    assert f"reduce_scatter {2 * cfg.num_params() / 1e9:.2f} GB" in off
    result = runner.invoke(app, ["plan", "memory", "7b", "--gpus", "8", "--zero", "2", "--no-reshard"])
    assert "needs zero=3" in str(result.exception)
