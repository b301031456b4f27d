"""Context parallel inside `lmforge train` (gloo, CPU, fp64 weights): 2 ranks each holding the zigzag
half of every sequence (tokens, targets, RoPE positions), attention as ring attention over the cp
group, FSDP over the cp ranks averaging gradients, train exactly like one process on whole
sequences: losses, grad norms (clipping is active: ~1.0-1.3 against train.grad_clip=1), held-out
losses and final weights."""
import pytest

from conftest import run_torchrun
from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train
from test_fsdp_training import TINY, TOL, losses, max_param_diff
from test_tp_training import metric

STEPS = 6


@pytest.mark.slow
def test_cp2_equals_one_process(toy_shards, tmp_path):
    common = [*TINY, f"train.data={toy_shards}", f"train.max_steps={STEPS}", f"train.ckpt_every={STEPS}",
              "train.eval_every=3"]
    one, cp = tmp_path / "one", tmp_path / "cp"
    train(load_recipe(TrainRecipe, None, [*common, f"train.out={one}"]))
    run_torchrun(2, ["-m", "lmforge", "train", *common, f"train.out={cp}", "parallel.cp=2"], tmp_path / "cp.log")
    ref = losses(one)
    assert sorted(losses(cp)) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 0.1  # it trained (a frozen model would pass the equalities)
    for key in ("loss", "grad_norm", "val_loss"):
        want, got = metric(one, key), metric(cp, key)
        assert want.keys() == got.keys() and want
        worst = max(abs(want[s] - got[s]) for s in want)
        assert worst < TOL, (key, worst)
    assert max_param_diff(one / "model", cp / "model") < TOL
