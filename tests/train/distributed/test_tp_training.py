"""Tensor + sequence parallel inside `lmforge train` (gloo, CPU, fp64 weights): FSDP x TP on a 2x2
mesh trains like one process with the same global batch (losses, held-out loss, final weights),
and its DCP checkpoint resumes at TP 2 alone with the uninterrupted run's next losses. Gradient
clipping (active: the grad norms are ~1.0-1.3 against train.grad_clip=1) and AdamW run on DTensors."""
import json
import shutil

import pytest

from conftest import run_torchrun
from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train
from test_fsdp_training import TINY, TOL, losses, max_param_diff

STEPS = 6


def metric(out, key) -> dict[int, float]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_fsdp_x_tp_at_2x2_and_resume_at_tp2_equal_one_process(toy_shards, tmp_path):
    common = [*TINY, f"train.data={toy_shards}", f"train.max_steps={STEPS}", "train.ckpt_every=3",
              "train.eval_every=3", "train.keep_last=2"]
    one, grid, tp = tmp_path / "one", tmp_path / "grid", tmp_path / "tp"
    train(load_recipe(TrainRecipe, None, [*common, f"train.out={one}"]))
    run_torchrun(4, ["-m", "lmforge", "train", *common, f"train.out={grid}", "parallel.dp_shard=2", "parallel.tp=2"],
                 tmp_path / "grid.log")
    ref = losses(one)
    assert sorted(losses(grid)) == list(range(1, STEPS + 1))
    assert max(abs(ref[s] - v) for s, v in losses(grid).items()) < TOL
    assert max(abs(metric(one, "val_loss")[s] - v) for s, v in metric(grid, "val_loss").items()) < TOL
    assert max(abs(metric(one, "grad_norm")[s] - v) for s, v in metric(grid, "grad_norm").items()) < TOL
    assert max_param_diff(one / "model", grid / "model") < TOL

    # the 2x2 run's step-3 DCP checkpoint, resumed by 2 ranks at tp=2 (no FSDP)
    shutil.copytree(grid, tp)
    shutil.rmtree(tp / "ckpt" / f"step_{STEPS:06d}")
    run_torchrun(2, ["-m", "lmforge", "train", *common, f"train.out={tp}", "parallel.tp=2", "--resume"],
                 tmp_path / "tp.log")
    got = losses(tp)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(ref[s] - got[s]) for s in range(4, STEPS + 1)) < TOL
    assert max_param_diff(one / "model", tp / "model") < TOL
