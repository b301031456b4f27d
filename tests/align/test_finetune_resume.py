"""Exact resume after a real kill -9, for the dpo, rm (with LoRA adapters and its scalar head) and
grpo commands (sft: tests/align/test_sft.py, killed twice): `lmforge finetune KIND` is killed
(SIGKILL, no chance to save) a few steps past its first checkpoint and resumed with --resume; the
finished run's logged losses and held-out metrics and its saved model files equal an uninterrupted
run's bit for bit. GRPO's rollouts are sampled by its loader from the checkpointed
weights with seeds from the checkpointed counter, so they are redrawn identically."""
import itertools
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

from lmforge.align.cli import KINDS, RECIPES
from lmforge.align.data import stdlib_chats
from lmforge.align.tasks import arithmetic_tasks
from lmforge.config import load_recipe
from lmforge.model import ModelConfig, Transformer, save
from lmforge.tokenizer import train_tokenizer

COMMON = ["train.log_every=1", "train.ckpt_every=3", "train.keep_last=2", "train.tensorboard=false",
          "train.max_steps=8", "train.eval_every=4"]
RUNS = {
    "dpo": ["train.seq_len=96", "train.micro_batch=2", "train.global_batch_tokens=384", "train.lr=0.003",
            "dpo.max_examples=24", "dpo.val_examples=4"],
    "rm": ["train.seq_len=96", "train.micro_batch=2", "train.global_batch_tokens=384", "train.lr=0.003",
           "rm.max_examples=24", "rm.val_examples=4", "lora.r=4"],
    "grpo": ["train.seq_len=32", "train.micro_batch=2", "train.global_batch_tokens=128", "train.lr=0.003",
             "grpo.group_size=4", "grpo.max_tokens=6", "grpo.beta=0.05", "grpo.val_tasks=4",
             "grpo.mask_truncated=false", "grpo.max_operand=3"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny model whose tokenizer (with the ChatML template) covers code and arithmetic."""
    chats = list(itertools.islice(stdlib_chats("train"), 300))
    texts = [m["content"] for c in chats for m in c] + [f"{t.prompt} {t.answer}" for t in arithmetic_tasks(300, 0)]
    tok = train_tokenizer(texts, vocab_size=700, min_frequency=1)
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=64, max_seq_len=128))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save(net, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def digit_model(tiny_model, tmp_path_factory):
    """The tiny model with an LM head that mostly says single digits, so sums of operands <= 3 are
    sometimes right: groups get reward variance and GRPO really updates the weights."""
    from lmforge.model import load
    from lmforge.tokenizer import load_tokenizer
    tok, net = load_tokenizer(tiny_model), load(tiny_model)
    digits = [tok.hf.token_to_id(str(d)) for d in range(10)]
    with torch.no_grad():
        keep = net.lm_head.weight[digits].clone() * 20
        net.lm_head.weight.mul_(0.1)
        net.lm_head.weight[digits] = keep
    path = tmp_path_factory.mktemp("digits") / "model"
    save(net, path, tokenizer=tok)
    return path


def checkpoint_step(out) -> int:
    root = out / "ckpt"
    steps = [int(p.name[5:]) for p in root.glob("step_*") if (p / "trainer.json").exists()] if root.exists() else []
    return max(steps, default=0)


def logged_steps(log) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+) ", log.read_text(), re.MULTILINE)]


def run_in_process(kind: str, model, overrides: list[str]) -> None:
    module, recipe_class, function = KINDS[kind]
    import importlib
    mod = importlib.import_module(module)
    recipe = load_recipe(getattr(mod, recipe_class), RECIPES / f"{kind}-tiny.yaml", overrides)
    getattr(mod, function)(recipe, str(model))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_finetune_kill9_and_resume_is_bitwise_exact(kind, tiny_model, digit_model, tmp_path):
    overrides = [*COMMON, *RUNS[kind]]
    if kind == "grpo":
        tiny_model = digit_model
    rng = random.Random(kind)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_in_process(kind, tiny_model, [*overrides, f"train.out={ref}"])  # the command's default recipe
    cmd = [sys.executable, "-m", "lmforge", "finetune", kind, str(tiny_model), "--resume", *overrides,
           f"train.out={cut}"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "killed.log"
    kill_step = rng.randint(4, 5)  # past the checkpoint at step 3
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while not any(s >= kill_step for s in logged_steps(log)):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cut / "model").exists(), "the run finished before it could be killed"
    assert checkpoint_step(cut) == 3
    log = tmp_path / "resumed.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert proc.returncode == 0, log.read_text()
    assert "resumed from step 3" in log.read_text()

    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert any(k.startswith("val_") for r in ref_rows for k in r)  # each command logs a held-out metric
    # every logged value but wall-clock speeds and memory: loss, held-out metrics, GRPO's rewards, KL, ...
    keys = sorted({k for r in ref_rows for k in r if "per_s" not in k and k not in ("peak_mem_mb", "mfu")})
    for key in keys:
        assert [r.get(key) for r in rows] == [r.get(key) for r in ref_rows], key
    if kind == "grpo":  # the rewards varied, so the policy gradient was not zero
        assert 0 < max(r.get("reward_std", 0) for r in ref_rows) and max(r.get("grad_norm", 0) for r in ref_rows) > 1e-3
    start = load_file(tiny_model / "model.safetensors")
    trained = load_file(ref / "model" / "model.safetensors")
    assert not all(torch.equal(trained[k], start[k]) for k in start)  # the run changed the weights
    weights = sorted(p.name for p in (ref / "model").glob("*.safetensors"))
    assert weights == sorted(p.name for p in (cut / "model").glob("*.safetensors")) and weights
    for name in weights:
        ours, want = load_file(cut / "model" / name), load_file(ref / "model" / name)
        assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want), name
