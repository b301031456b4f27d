import json
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_recipe
from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints
from lmforge.train.config import TrainRecipe
from lmforge.train.loader import ShardLoader
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import train

MODEL = ["model.preset=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.hidden_dim=128", "model.max_seq_len=64"]


def recipe(shards, out, *extra):
    overrides = MODEL + [f"train.data={shards}", f"train.out={out}", "train.seq_len=32", "train.micro_batch=4",
                         "train.global_batch_tokens=256", "train.max_steps=12", "train.log_every=1",
                         "train.eval_every=6", "train.ckpt_every=4", "train.keep_last=2", "train.lr=0.01",
                         "train.tensorboard=false", *extra]
    return overrides


def losses(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_wsd_and_cosine_schedules():
    lrs = [lr_at(s, 100, 1.0, "wsd", 0.1, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0          # 10 warmup steps
    assert all(v == 1.0 for v in lrs[10:90])                       # 80 stable steps
    assert lrs[99] == pytest.approx(0.1) and lrs[90] < 1.0          # 10 decay steps to the floor
    cos = [lr_at(s, 100, 1.0, "cosine", 0.1, 0, 0.0) for s in range(100)]
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.5, abs=0.02) and cos[99] < 0.01


def test_loader_is_deterministic_and_resumable(toy_shards):
    shards = TokenShards(toy_shards, "train")
    assert len(shards.arrays) >= 3  # the stream crosses shard files
    a = ShardLoader(shards, 32, 4, seed=1)
    first = [a.next_batch() for _ in range(5)]
    b = ShardLoader(shards, 32, 4, seed=1)
    b.load_state_dict({"sample": 12})
    torch.testing.assert_close(b.next_batch(), first[3])
    for batch in first:
        assert batch.shape == (4, 33)


def test_training_learns_and_writes_outputs(toy_shards, tmp_path):
    out = tmp_path / "run"
    summary = train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=30")))
    curve = losses(out)
    assert curve[30] < curve[1] - 1.0            # it learned the toy language
    assert summary["val_loss"] < curve[1]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(out / "ckpt")] == ["step_000028", "step_000030"]
    assert load(out / "model").cfg.dim == 64


def test_checkpoint_killed_mid_write_keeps_previous(toy_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=4")))
    import lmforge.train.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=8")), resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(out / "ckpt").name == "step_000004"
    assert list((out / "ckpt").glob(".tmp-*"))           # the half-written one is there, but ignored
    assert load(out / "ckpt" / "step_000004").cfg.dim == 64
    train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=8")), resume=True)
    assert latest_checkpoint(out / "ckpt").name == "step_000008"
    assert not list((out / "ckpt").glob(".tmp-*"))


def test_refuses_to_overwrite_a_run_without_resume(toy_shards, tmp_path):
    out = tmp_path / "run"
    train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=4")))
    with pytest.raises(LmforgeError, match="--resume"):
        train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=4")))


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.mark.parametrize("args, message", [
    (["train", "model.preset=13b-imaginary", "train.data=x"], "unknown preset"),
    (["train", "train.learning_rate=0.1"], "unknown key(s) ['learning_rate']"),
    (["train", "model.preset=tiny", "model.n_heads=7"], "does not divide dim"),
    (["train", "train.max_steps=ten"], "must be int"),
    (["train", "train.grad_clip=-1"], "train.grad_clip must be > 0, got -1.0"),
    (["train", "model.rope_scaling={type: yarn, factor: 4}"], "rope_scaling type 'yarn' is not implemented"),
    (["train", "train.data=/nonexistent/shards"], "no token shards"),
    (["generate", "--model", "/nonexistent/ckpt", "--prompt", "x"], "model not found"),
])
def test_cli_errors_are_clear(monkeypatch, capsys, args, message):
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in " ".join(text.split()) and "Traceback" not in text


def test_corrupt_checkpoint_is_a_clear_error(monkeypatch, capsys, toy_shards, tmp_path):
    out = tmp_path / "run"
    train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=4")))
    (out / "model" / "model.safetensors").write_bytes(b"\x00" * 64)
    code, text = run_cli(monkeypatch, capsys, "generate", "--model", str(out / "model"), "--prompt", "x")
    assert code == 2 and "corrupt" in text and "Traceback" not in text
    (out / "ckpt" / "step_000004" / "optim.pt").write_bytes(b"not a torch file")
    with pytest.raises(LmforgeError, match="corrupt checkpoint"):
        train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=8")), resume=True)


def test_noise_scale_is_logged_and_matches_the_two_batch_estimator(toy_shards, tmp_path):
    from lmforge.train.noise_scale import NoiseScaleTracker, noise_scale
    out = tmp_path / "run"
    train(load_recipe(TrainRecipe, None, recipe(toy_shards, out, "train.max_steps=6", "train.noise_scale=true",
                                                "train.micro_batch=2", "train.lr=0.0")))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r["noise_scale_tokens"] for r in rows if "noise_scale_tokens" in r]
    assert len(logged) == 6
    # lr=0 freezes the model, so the estimate can be recomputed from scratch with plain autograd
    model = load(out / "model").train()
    loader = ShardLoader(TokenShards(toy_shards, "train"), 32, 2, seed=1337)
    tracker = NoiseScaleTracker()
    for _ in range(6):
        micro = [loader.next_batch() for _ in range(4)]
        grads = []
        for b in micro:
            model.zero_grad()
            model(b[:, :-1], targets=b[:, 1:]).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        g_big = torch.stack(grads).mean(0)
        tracker.update(noise_scale(64, float(grads[0].pow(2).sum()), 256, float(g_big.pow(2).sum())))
    assert logged[-1] == pytest.approx(tracker.b_simple, rel=1e-3)
    with pytest.raises(LmforgeError, match="noise_scale"):
        load_recipe(TrainRecipe, None, ["train.noise_scale=true", "train.micro_batch=8",
                                        "train.seq_len=32", "train.global_batch_tokens=256"])
