"""Training throughput: FSDP2 over N CPU processes (torchrun, gloo) vs one process, same recipe and
global batch, so the same tokens per step.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/distributed.py SHARDS [--ranks 2 --steps 30]

Each side is a real `lmforge train` run in its own folder; tokens/s is the median of the logged
per-step figures after the first 5 steps (warm-up). On CPU the ranks compete for the same cores and
gloo copies through shared memory, so this measures overhead, not the multi-GPU speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = ["model.preset=tiny", "model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=256",
         "train.seq_len=128", "train.micro_batch=8", "train.global_batch_tokens=2048", "train.log_every=1",
         "train.eval_every=100000", "train.tensorboard=false"]


def tokens_per_s(out: Path) -> float:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*MODEL, f"train.data={args.shards}", f"train.max_steps={args.steps}", f"train.ckpt_every={args.steps}"]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp, "one"), Path(tmp, "many")
        subprocess.run([sys.executable, "-m", "lmforge", "train", *common, f"train.out={one}"],
                       check=True, env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.ranks}", "-m", "lmforge", "train", *common, f"train.out={many}"],
                       check=True, env=env, capture_output=True)
        a, b = tokens_per_s(one), tokens_per_s(many)
    print(f"one process: {a:,.0f} tok/s; FSDP x{args.ranks}: {b:,.0f} tok/s; ratio {b / a:.2f} "
          f"(same global batch of 2048 tokens/step, {args.steps} steps, median after step 5)")


if __name__ == "__main__":
    main()
