"""`lmforge scaling sweep`: tiny models trained on CPU with the real pretraining loop, then fitted."""
import json

import pytest
import typer
from typer.testing import CliRunner

from lmforge.errors import LmforgeError
from lmforge.plan import SweepConfig, read_runs, run_sweep
from lmforge.plan.cli import register


@pytest.mark.slow
def test_sweep_trains_fits_and_plots(tmp_path):
    app = typer.Typer()
    register(app)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["scaling", "sweep", "--out", str(out), "--dims", "16,32,48",
                                      "--steps", "15,30", "--bootstrap", "10"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = read_runs(out / "runs.csv")
    assert len(runs) == 6 and set(runs.D) == {15 * 8 * 64, 30 * 8 * 64}
    loss = dict(zip(runs.names, runs.loss))
    # More parameters and more tokens both help, even this early in training.
    assert loss["d48-s30"] < loss["d16-s30"] and loss["d48-s30"] < loss["d48-s15"]
    law = json.loads((out / "law.json").read_text())
    assert all(law[k] > 0 for k in ("E", "A", "B", "alpha", "beta"))
    assert (out / "runs_fit.png").read_bytes()[:4] == b"\x89PNG"
    # A second call resumes from the finished runs' summaries instead of retraining.
    rows, _ = run_sweep(SweepConfig(out=str(out), dims=(16, 32, 48), steps=(15, 30)))
    assert [r["loss"] for r in rows] == list(runs.loss)


def test_sweep_needs_enough_runs(tmp_path):
    with pytest.raises(LmforgeError, match="at least 5 runs"):
        run_sweep(SweepConfig(out=str(tmp_path), dims=(16, 32), steps=(10, 20)))
    with pytest.raises(LmforgeError, match="at least 16"):
        run_sweep(SweepConfig(out=str(tmp_path), dims=(8, 16, 32), steps=(10, 20)))
