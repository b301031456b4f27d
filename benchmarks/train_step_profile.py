"""Where the time of one training step goes, ours beside transformers' Llama: torch.profiler over a
few steps (forward + backward + AdamW), each operator's self time put in one bucket.

    OMP_NUM_THREADS=1 python benchmarks/train_step_profile.py --threads 1 [--steps 3] [--json PATH]

Buckets: GEMM (mm/addmm/bmm and their oneDNN forms), attention (the SDPA kernels, forward and
backward), norms (RMSNorm forward and backward), other elementwise and copies (activations,
RoPE, residual adds, casts, the loss's exp/log-sum-exp, transposes made contiguous, embedding),
optimizer (everything under Optimizer.step and zero_grad), and Python/framework overhead: the
step's wall time minus the operators' CPU time (the profiler's own cost lands here too).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from common import write_json
from lmforge.model import Transformer, preset, save_hf

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::_addmm_activation",
        "aten::mkldnn_linear", "aten::_mkl_linear")
ATTENTION = ("scaled_dot_product", "flash_attention")
NORMS = ("rms_norm", "aten::rsqrt", "aten::pow")  # pow/rsqrt: transformers' hand-written RMSNorm
BUCKETS = ("GEMM", "attention", "norms", "elementwise+copies", "optimizer", "python+framework")


def bucket(name: str, in_optimizer: bool) -> str:
    if in_optimizer:
        return "optimizer"
    if name.startswith("autograd::") or name.endswith(("Backward0", "Backward1")):
        return "python+framework"  # autograd's own nodes and ranges: their self time is bookkeeping
    if name in GEMM:
        return "GEMM"
    if any(k in name for k in ATTENTION):
        return "attention"
    if any(k in name for k in NORMS):
        return "norms"
    return "elementwise+copies"


def under_optimizer(event) -> bool:
    while event is not None:
        if event.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
            return True
        event = event.cpu_parent
    return False


def profile_steps(step, steps: int, top: int = 0) -> dict[str, float]:
    """Seconds per step in each bucket, from the self CPU time of every operator; `top` > 0 also
    prints the operators with the most self time outside GEMM and attention."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    shares = dict.fromkeys(BUCKETS, 0.0)
    for ev in prof.events():  # self times partition the profiled time between the events
        shares[bucket(ev.name, under_optimizer(ev))] += ev.self_cpu_time_total / 1e6
    shares["python+framework"] += max(wall - sum(shares.values()), 0.0)  # outside any event: Python
    if top:
        rows = [r for r in prof.key_averages() if bucket(r.key, False) in ("elementwise+copies", "norms")]
        for r in sorted(rows, key=lambda r: -r.self_cpu_time_total)[:top]:
            print(f"    {r.key:<45} {r.self_cpu_time_total / 1e3 / steps:8.1f} ms/step  x{r.count // steps}")
    return {k: v / steps for k, v in shares.items()} | {"wall": wall / steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--top", type=int, default=0, help="list the N busiest elementwise/norm operators")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset, max_seq_len=max(args.seq, 256))
    torch.manual_seed(0)
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = batch[:, :-1], batch[:, 1:]
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4),
            "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    losses = {"ours": lambda: ours(x, targets=y), "transformers": lambda: hf(input_ids=x, labels=x).loss}

    def stepper(name):
        def step():
            losses[name]().backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return step

    table = {}
    for name in ("ours", "transformers"):
        step = stepper(name)
        for _ in range(2):  # warm-up: oneDNN primitives, optimizer state
            step()
        if args.top:
            print(f"{name}: busiest elementwise/norm operators")
        table[name] = profile_steps(step, args.steps, args.top)
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, threads {torch.get_num_threads()}, "
          f"{args.steps} profiled steps each (ms per step, share of the profiled wall time)")
    print(f"{'bucket':<20}" + "".join(f"{n:>26}" for n in table))
    for b in (*BUCKETS, "wall"):
        cells = "".join(f"{1e3 * t[b]:>15.1f} ms {100 * t[b] / t['wall']:>5.1f} %" for t in table.values())
        print(f"{b:<20}{cells}")
    write_json(args.json, "train_step_profile",
               {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "threads": torch.get_num_threads()}, {}, table)


if __name__ == "__main__":
    main()
