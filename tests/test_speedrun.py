import json

import pytest

from lmforge.config import load_recipe
from lmforge.speedrun import SpeedrunRecipe, speedrun
from lmforge.train.config import TrainRecipe

QUICK = ["run.max_documents=300", "run.vocab_size=512", "run.samples=1", "run.sample_tokens=8",
         "run.eval_tokens=8192", "run.humaneval_problems=2", "run.humaneval_tokens=16", "model.dim=64", "model.n_layers=2", "model.hidden_dim=128",
         "train.max_steps=6", "train.micro_batch=8", "train.global_batch_tokens=2048", "train.seq_len=128",
         "train.eval_every=3", "train.ckpt_every=3", "train.log_every=2", "train.tensorboard=false"]


@pytest.mark.slow
def test_speedrun_end_to_end_and_resume(tmp_path):
    recipe = load_recipe(SpeedrunRecipe, None, QUICK + [f"run.root={tmp_path}"])
    report = speedrun(recipe)
    saved = json.loads((tmp_path / "speedrun" / "report.json").read_text())
    ev = saved["stages"]["evaluate"]
    assert 0 < ev["bpb"] < 20 and ev["unigram_baseline_bpb"] > 3
    assert saved["stages"]["shards"]["val"] > 0 and saved["stages"]["pretrain"]["steps"] == 6
    assert (tmp_path / "speedrun" / "train" / "model" / "tokenizer.json").exists()
    assert report["stages"]["samples"]["samples"][0]["prompt"]
    assert saved["stages"]["clean"]["documents_out"] <= saved["stages"]["clean"]["documents_in"] == 300
    he = saved["stages"]["humaneval"]
    assert he.get("skipped") or (he["problems"] == 2 and 0 <= he["pass@1"] <= 1)
    # a second run finds every stage's output and redoes nothing expensive
    again = speedrun(load_recipe(SpeedrunRecipe, None, QUICK + [f"run.root={tmp_path}"]))
    assert again["stages"]["evaluate"]["bpb"] == pytest.approx(ev["bpb"])
    assert again["stages"]["pretrain"]["final_loss"] == report["stages"]["pretrain"]["final_loss"]


def test_shipped_recipes_parse():
    from importlib.resources import files
    for path in files("lmforge").joinpath("recipes").iterdir():
        recipe = load_recipe(SpeedrunRecipe, str(path))
        model = TrainRecipe(model=recipe.model, train=recipe.train).model_config()  # validates
        assert model.max_seq_len >= recipe.train.seq_len and recipe.train.grad_accum >= 1
