"""Distributed checkpoints reshard: a run saved by FSDP at 4 ranks reloads under FSDP at 2 ranks,
tensor parallel at 2 ranks and in one plain process with parameters and optimizer state bit for bit
equal, and the next 10 losses equal an uninterrupted one-process run's; `lmforge convert` reads the
DCP checkpoint."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import load_recipe
from lmforge.model.hf import read_safetensors_dir
from lmforge.train.config import TrainRecipe
from lmforge.train.distributed.runtime import load_any_checkpoint
from lmforge.train.objective import PretrainObjective
from lmforge.train.trainer import build_optimizer, initial_model, train
from test_fsdp_training import TINY, TOL, losses

WORKER = Path(__file__).with_name("reshard_worker.py")
# constant lr, so a 10-step run and the first half of a 20-step run follow the same schedule
CONST = ["train.warmup=0", "train.decay=0", "train.ckpt_every=10", "train.keep_last=1"]


def load_plain(step_dir, overrides):
    """Model + AdamW of one plain process, filled from a checkpoint directory."""
    recipe = load_recipe(TrainRecipe, None, overrides)
    tc = recipe.train
    vocab = PretrainObjective(tc.data, tc.seq_len, tc.eval_tokens, tc.micro_batch).vocab_size
    model = initial_model(tc, recipe.model_config(vocab_size=vocab), vocab, torch.device("cpu"))
    optimizer = build_optimizer(model, tc, torch.device("cpu"))
    state = load_any_checkpoint(step_dir, model, optimizer)
    return model, optimizer, state


def assert_bitwise_equal(a, b):
    (ma, oa, sa), (mb, ob, sb) = a, b
    assert sa == sb
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    da, db = oa.state_dict()["state"], ob.state_dict()["state"]
    assert da.keys() == db.keys() and len(da) == len(list(ma.parameters()))
    for key in da:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(da[key][name], db[key][name]), (key, name)


@pytest.mark.slow
def test_save_at_4_ranks_resume_at_fsdp2_tp2_and_1_exactly(toy_shards, tmp_path):
    common = [*TINY, *CONST, f"train.data={toy_shards}"]
    ref, four, two, tp, one = (tmp_path / n for n in ("ref", "four", "two", "tp", "one"))
    train(load_recipe(TrainRecipe, None, [*common, "train.max_steps=20", f"train.out={ref}"]))
    run_torchrun(4, ["-m", "lmforge", "train", *common, "train.max_steps=10", f"train.out={four}"],
                 tmp_path / "four.log")
    saved = four / "ckpt" / "step_000010"
    assert len(list((saved / "dcp").glob("*.distcp"))) == 4
    ref_losses = losses(ref)
    assert max(abs(ref_losses[s] - v) for s, v in losses(four).items()) < TOL  # FSDP at 4 == one process

    for run in (two, tp, one):
        shutil.copytree(four, run)
    # one 2-rank launch: FSDP over 2 ranks into `two`, then tensor parallel over 2 ranks into `tp`
    run_torchrun(2, [str(WORKER), str(saved), str(tmp_path), *common, "train.max_steps=20"], tmp_path / "two.log")
    train(load_recipe(TrainRecipe, None, [*common, "train.max_steps=20", f"train.out={one}"]), resume=True)

    layouts = {n: json.loads((tmp_path / f"layout_{n}.json").read_text()) for n in ("two", "tp")}
    assert layouts == {"two": {"mesh": ["dp_shard"], "placements": ["Shard(dim=0)"]},  # FSDP: rows over 2 ranks
                       "tp": {"mesh": ["tp"], "placements": ["Shard(dim=0)"]}}  # TP: q_proj's heads (columns)
    # what FSDP 2 and TP 2 loaded (written back out) and what one process loads are the saved state, bit for bit
    at_one = load_plain(saved, common)
    for name in ("two", "tp"):
        assert_bitwise_equal(at_one, load_plain(tmp_path / f"resaved_{name}" / "step_000010", common))
    gathered = read_safetensors_dir(four / "model")  # the 4-rank run's own gathered final weights
    assert gathered["embed_tokens.weight"].dtype == torch.float64
    plain = at_one[0].state_dict()
    assert all(torch.equal(plain[k], v) for k, v in gathered.items())

    for run in (two, tp, one):  # the next 10 losses continue the uninterrupted run
        got = losses(run)
        assert sorted(got) == list(range(1, 21))
        assert max(abs(ref_losses[s] - got[s]) for s in range(11, 21)) < TOL, run

    # lmforge convert: DCP checkpoint -> lmforge model directory with the same weights
    r = CliRunner().invoke(app, ["convert", str(saved), str(tmp_path / "converted"), "--to", "lmforge"])
    assert r.exit_code == 0, r.output
    converted = read_safetensors_dir(tmp_path / "converted")
    assert all(torch.equal(converted[k], v) for k, v in gathered.items())
