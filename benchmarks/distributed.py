"""Training throughput and traffic: FSDP2 (lmforge's apply_fsdp) at N CPU ranks vs DDP at N ranks vs
one process, the same model, the same global batch and the same AdamW step; and the bytes each rank
puts through the collectives per step against the planner's formula (`comm_bytes_per_step`).

    PYTHONPATH=src python benchmarks/distributed.py [--ranks 2 --steps 20]

Every process has one intra-op thread (the one process here, each rank under torchrun with gloo):
N ranks use N cores, so N x is the ideal speedup. (On a shared, oversubscribed machine, one process
with N OpenMP threads ran ~20x slower than with one: its threads wait on each other's barriers.) Bytes are counted by wrapping the collectives FSDP2 calls
(all_gather_single, reduce_scatter_single) and by a DDP communication hook around its all-reduce;
each is the full buffer handed to the call. On CPU the ranks share the cores and gloo copies through
shared memory, so the ratios measure the overhead of each scheme, not a multi-GPU speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.plan import TrainingPlan, comm_bytes_per_step

CFG = ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=128)
SEQ_LEN, GLOBAL_BATCH, WARMUP = 128, 16, 3


def batches(steps: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """The same global batches at any world size; each rank takes its contiguous rows."""
    g = torch.Generator().manual_seed(0)
    rows = GLOBAL_BATCH // world
    return [torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)[rank * rows:(rank + 1) * rows]
            for _ in range(steps)]


def timed_steps(model, data: list[torch.Tensor], sent: Counter | None = None) -> tuple[float, dict]:
    """Median tokens/s (global) over the steps after the warm-up, and the bytes of the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rates = []
    for i, tokens in enumerate(data):
        if sent is not None:
            sent.clear()
        t0 = time.perf_counter()
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.barrier()  # a step ends when the slowest rank ends it
        if i >= WARMUP:
            rates.append(GLOBAL_BATCH * SEQ_LEN / (time.perf_counter() - t0))
    return statistics.median(rates), dict(sent or {})


def worker(out: Path, steps: int) -> None:
    """Under torchrun: DDP, then FSDP2, on this rank's share of the same batches."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from lmforge.train.distributed.fsdp import apply_fsdp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(steps, rank, world)
    sent: Counter = Counter()

    def counting_allreduce(state, bucket):
        sent["all_reduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    torch.manual_seed(0)
    ddp = DistributedDataParallel(Transformer(CFG))
    ddp.register_comm_hook(None, counting_allreduce)
    result = {"ddp": timed_steps(ddp, data, sent)}

    def counted(name, fn, arg, position):
        def call(*args, **kwargs):
            t = kwargs[arg] if arg in kwargs else args[position]
            sent[name] += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return call
    dist.all_gather_single = counted("all_gather", dist.all_gather_single, "output", 0)
    dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single, "input", 1)
    torch.manual_seed(0)
    fsdp = apply_fsdp(Transformer(CFG), init_device_mesh("cpu", (world,)))
    result["fsdp"] = timed_steps(fsdp, data, sent)
    if rank == 0:
        (out / "ranks.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.steps)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    one, _ = timed_steps(Transformer(CFG), batches(args.steps))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                        __file__, "--steps", str(args.steps), "--worker", tmp], check=True, env=env)
        ranks = json.loads(Path(tmp, "ranks.json").read_text())
    (ddp, ddp_bytes), (fsdp, fsdp_bytes) = ranks["ddp"], ranks["fsdp"]
    micro = GLOBAL_BATCH // args.ranks
    print(f"{CFG.num_params():,} params, global batch {GLOBAL_BATCH} x {SEQ_LEN} tokens, {args.steps} steps "
          f"(median after {WARMUP})")
    print(f"one process (1 thread): {one:,.0f} tok/s")
    print(f"DDP  x{args.ranks} (1 thread each): {ddp:,.0f} tok/s = {ddp / one:.2f}x one process")
    print(f"FSDP x{args.ranks} (1 thread each): {fsdp:,.0f} tok/s = {fsdp / one:.2f}x one process, {fsdp / ddp:.2f}x DDP")
    for name, got, zero in (("DDP", ddp_bytes, 0), ("FSDP", fsdp_bytes, 3)):
        want = comm_bytes_per_step(CFG, TrainingPlan(micro_batch=micro, seq_len=SEQ_LEN, dp=args.ranks, zero=zero,
                                                     precision="fp32"))
        for op, planned in want.items():
            if planned or got.get(op):
                print(f"{name} {op}: {got.get(op, 0) / 1e6:.3f} MB per rank per step; planner "
                      f"{planned / 1e6:.3f} MB; ratio {got.get(op, 0) / planned:.3f}")


if __name__ == "__main__":
    main()
