"""Pipeline parallel (apply_pp, torch.distributed.pipelining) at 2 gloo ranks, fp64: GPipe, 1F1B
and interleaved 1F1B (2 stages per rank) each give the unsplit model's loss and the gradient of
every parameter on the same batch of 4 micro-batches."""
import json
from pathlib import Path

import pytest

from conftest import run_torchrun

WORKER = Path(__file__).with_name("pipeline_worker.py")
N_PARAMS = 4 * 9 + 3  # 4 blocks x 9, embedding, final norm, head
# fp64: the split changes only the order of a few additions (per-micro-batch means averaged)
TOL = 1e-12


@pytest.mark.slow
def test_each_schedule_gives_the_unsplit_loss_and_gradients(tmp_path):
    run_torchrun(2, [str(WORKER), str(tmp_path)], tmp_path / "worker.log", timeout=150)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert set(ranks[0]) == {"gpipe", "1f1b", "interleaved_1f1b"}
    for schedule in ranks[0]:
        first, last = ranks[0][schedule], ranks[1][schedule]
        assert first["loss"] is None and last["loss"] <= TOL, schedule  # the loss lives on the last stage
        assert max(first["grad"], last["grad"]) <= TOL, schedule
        names = first["names"] + last["names"]
        assert len(set(names)) == len(names) == N_PARAMS, schedule  # every parameter on exactly one rank
        layers = sorted({n.split(".")[1] for n in first["names"] if n.startswith("layers.")})
        assert layers == (["0", "2"] if schedule == "interleaved_1f1b" else ["0", "1"]), schedule
