"""kill -9 of one rank of a 2-rank FSDP run a couple of steps past a checkpoint: torchrun tears the
whole job down, `--resume` continues from that checkpoint (model, optimizer, loader and RNG state
from the DCP checkpoint), and every logged loss and the final weights equal an uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LAUNCH_TIMEOUT_S, run_torchrun
from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train
from test_fsdp_training import TINY, TOL, losses, max_param_diff

STEPS, CKPT_EVERY = 20, 6
KILL_AT = CKPT_EVERY + 2  # rank 0 has logged this step: both ranks are two steps past the checkpoint


def worker_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its child), read from /proc."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if parent == torchrun_pid else []
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
        if f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def latest_checkpoint_step(out: Path) -> int:
    """Read from the layout, not with the code under test: complete step_N dirs only."""
    steps = [int(p.name[5:]) for p in (out / "ckpt").glob("step_*") if (p / "trainer.json").exists()]
    return max(steps, default=0)


@pytest.mark.slow
def test_kill9_of_one_rank_then_resume_reproduces_uninterrupted_losses(toy_shards, tmp_path):
    common = [*TINY, f"train.data={toy_shards}", f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(load_recipe(TrainRecipe, None, [*common, f"train.out={ref}"]))  # uninterrupted, one process

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lmforge", "train", "--resume", *common, f"train.out={cut}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rc = None
    try:
        deadline = time.time() + LAUNCH_TIMEOUT_S

        def wait(what, condition):
            while not condition():
                assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, f"no {what}:\n{log.read_text()[-4000:]}"
                time.sleep(0.002)
        victim = []  # found first, so the kill follows the step with no /proc scan in between
        wait("rank 1's process", lambda: victim.append(worker_pid(proc.pid, rank=1)) or victim[-1])
        wait(f"step {KILL_AT}", lambda: any(s >= KILL_AT for s in logged_steps(cut)))
        os.kill(victim[-1], signal.SIGKILL)
        rc = proc.wait(timeout=120)  # torchrun notices the dead worker and stops the other one
    finally:
        if rc is None:  # anything left of this launch goes, whatever failed above
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0, "torchrun reported success after a worker was killed"
    assert not (cut / "model").exists(), "the run finished before the kill"
    resumed_from = latest_checkpoint_step(cut)
    assert resumed_from >= CKPT_EVERY and max(logged_steps(cut)) > resumed_from, "no work was lost to the kill"

    text = run_torchrun(2, ["-m", "lmforge", "train", "--resume", *common, f"train.out={cut}"],
                        tmp_path / "resumed.log")
    assert f"resumed from step {resumed_from}" in text, text[-4000:]

    rows = [json.loads(line) for line in open(cut / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # lost steps redone, logged once
    want, got = losses(ref), losses(cut)
    worst = max(abs(want[s] - got[s]) for s in want)
    assert worst < TOL, worst
    assert max_param_diff(ref / "model", cut / "model") < TOL
