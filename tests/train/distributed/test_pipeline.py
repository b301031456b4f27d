"""Pipeline parallel (apply_pp, torch.distributed.pipelining) at 2 gloo ranks, fp64: GPipe, 1F1B
and interleaved 1F1B (2 stages per rank) each give the unsplit model's loss and the gradient of
every parameter on the same batch of 4 micro-batches; `lmforge train` at pp=2 trains like one
process."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_torchrun
from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train
from test_fsdp_training import TINY, max_param_diff
from test_fsdp_training import TOL as TRAIN_TOL
from test_tp_training import metric

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


PP_MODEL = ["model.n_layers=4", "model.tie_embeddings=false"]


@pytest.mark.slow
def test_interleaved_pipeline_trains_like_one_process_and_its_checkpoint_resumes_in_one(toy_shards, tmp_path):
    """`lmforge train` at pp=2 (interleaved 1F1B, 2 stages per rank) equals one process over 6
    AdamW steps with active clipping (losses, grad norms, held-out losses, final weights); its DCP
    checkpoint (each rank saved its own stages) resumes in one plain process exactly."""
    common = [*TINY, *PP_MODEL, f"train.data={toy_shards}", "train.max_steps=6", "train.ckpt_every=3",
              "train.eval_every=3"]
    one, pp, resumed = tmp_path / "one", tmp_path / "pp", tmp_path / "resumed"
    train(load_recipe(TrainRecipe, None, [*common, f"train.out={one}"]))
    run_torchrun(2, ["-m", "lmforge", "train", *common, f"train.out={pp}", "parallel.pp=2",
                     "parallel.pp_schedule=interleaved_1f1b"], tmp_path / "pp.log")
    for key in ("loss", "grad_norm", "val_loss"):
        ref, got = metric(one, key), metric(pp, key)
        assert sorted(got) == sorted(ref) and max(abs(ref[s] - got[s]) for s in ref) < TRAIN_TOL, key
    assert max_param_diff(one / "model", pp / "model") < TRAIN_TOL
    assert len(list((pp / "ckpt" / "step_000003" / "dcp").glob("*.distcp"))) == 2
    shutil.copytree(pp, resumed)
    shutil.rmtree(resumed / "ckpt" / "step_000006")
    train(load_recipe(TrainRecipe, None, [*common, f"train.out={resumed}"]), resume=True)
    ref, got = metric(one, "loss"), metric(resumed, "loss")
    assert max(abs(ref[s] - got[s]) for s in range(4, 7)) < TRAIN_TOL
    assert max_param_diff(one / "model", resumed / "model") < TRAIN_TOL
