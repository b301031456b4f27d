"""kill -9 at random moments (one of them inside a checkpoint write), resume each time: every
restart continues from the last complete checkpoint, no step is logged twice, and the final
weights equal an uninterrupted run's bit for bit."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_recipe
from lmforge.train.checkpoint import PAUSE_ENV
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train

MAX_STEPS = 40
OVERRIDES = ["model.preset=tiny", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.hidden_dim=64", "model.max_seq_len=32", "train.seq_len=16", "train.micro_batch=4",
             "train.global_batch_tokens=128", f"train.max_steps={MAX_STEPS}", "train.log_every=1",
             "train.eval_every=10", "train.ckpt_every=3", "train.keep_last=2", "train.lr=0.01",
             "train.tensorboard=false"]
WRITE_PAUSE_S = 0.5  # per gap between checkpoint files (two gaps), only in the run killed mid-write


def checkpoint_step(out) -> int:
    """The last complete checkpoint, read from the layout (not with the code under test)."""
    root = out / "ckpt"
    steps = [int(p.name[5:]) for p in root.glob("step_*") if (p / "trainer.json").exists()] if root.exists() else []
    return max(steps, default=0)


def steps_in_log(log) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+) ", log.read_text(), re.M)]


def temp_dirs(out) -> set:
    return set((out / "ckpt").glob(".tmp-*")) if (out / "ckpt").exists() else set()


def wait_for(condition, proc, log, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"trainer exited early:\n{log.read_text()}"
        assert time.time() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.002)


def start(cmd, log, env):
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def check_restart_point(log, expected_ckpt: int) -> None:
    """The process's own log says where it resumed, and its first training step is the next one."""
    text = log.read_text()
    first_step = int(re.search(r"^step (\d+) ", text, re.M).group(1))
    if expected_ckpt:
        resumed = re.search(r"resumed from step (\d+)", text)
        assert resumed and int(resumed.group(1)) == expected_ckpt, text
    else:
        assert "resumed from" not in text and "no checkpoint" in text, text
    assert first_step == expected_ckpt + 1, text


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon's momentum buffers must round-trip too
def test_kill9_and_resume_reproduces_losses_exactly(toy_shards, tmp_path, optimizer):
    rng = random.Random(11)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    overrides = [*OVERRIDES, f"train.optimizer={optimizer}"]
    train(load_recipe(TrainRecipe, None, [*overrides, f"train.data={toy_shards}", f"train.out={ref}"]))

    cmd = [sys.executable, "-m", "lmforge", "train", "--resume", *overrides,
           f"train.data={toy_shards}", f"train.out={cut}"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    expected_ckpt, resumes = 0, []
    for attempt in range(4):  # the second kill lands inside a checkpoint write
        log = tmp_path / f"attempt{attempt}.log"
        mid_write = attempt == 1
        before = temp_dirs(cut)
        proc = start(cmd, log, {**env, PAUSE_ENV: str(WRITE_PAUSE_S)} if mid_write else env)
        if mid_write:  # a new checkpoint's temp dir appeared: kill while its files are being written
            wait_for(lambda: temp_dirs(cut) - before, proc, log)
            time.sleep(rng.uniform(0.02, WRITE_PAUSE_S))  # leaves >= one gap of margin under load
        else:
            kill_step = expected_ckpt + rng.randint(1, 6)
            wait_for(lambda: any(s >= kill_step for s in steps_in_log(log)), proc, log)
            time.sleep(rng.uniform(0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        check_restart_point(log, expected_ckpt)
        if mid_write:
            assert temp_dirs(cut) - before, "the kill missed the checkpoint write"
            assert checkpoint_step(cut) == expected_ckpt, "a half-written checkpoint became the latest"
        assert not (cut / "model").exists(), "the run finished before it could be killed"
        expected_ckpt = checkpoint_step(cut)
        resumes.append(expected_ckpt)

    log = tmp_path / "final.log"
    proc = start(cmd, log, env)
    assert proc.wait(timeout=120) == 0, log.read_text()
    check_restart_point(log, expected_ckpt)
    assert len({s for s in resumes if s}) >= 3, resumes  # restarts from several distinct checkpoints

    rows = [json.loads(line) for line in open(cut / "metrics.jsonl")]
    for key in ("loss", "val_loss"):
        steps = [r["step"] for r in rows if key in r]
        assert steps == sorted(set(steps)), f"{key}: a step was logged twice or out of order: {steps}"
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))
    ref_rows = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in ref_rows if "loss" in r]
    ours, want = load_file(cut / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert ours.keys() == want.keys()
    for name in want:
        assert torch.equal(ours[name], want[name]), name  # bitwise
