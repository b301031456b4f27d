"""Peak memory of causal attention, forward + backward, as the sequence grows: blockwise (online
softmax, lmforge.model.attention) vs naive (the full [T, T] softmax) vs PyTorch's SDPA on CPU.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/long_context.py [--heads 2 --head-dim 64 --block 256]

Each (method, T) runs in a fresh subprocess; the figure is the growth of the process's peak
resident memory (getrusage ru_maxrss, glibc mmap threshold pinned as in logprob_memory.py) from
after q, k, v and the output gradient exist to after backward: the op's own working memory plus
dq, dk, dv (3 x the input size, listed apart: every method must produce them). Naive holds
[heads, T, T] scores, probabilities and their gradients: quadratic; blockwise holds one
[block, block] tile per step plus the row log-sum-exp: linear. Naive stops at --naive-max.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(method: str, T: int, heads: int, head_dim: int, block: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.model.attention import blockwise_attention, naive_attention

    def attend(q, k, v):
        if method == "blockwise":
            return blockwise_attention(q, k, v, True, block, block)
        if method == "naive":
            return naive_attention(q, k, v, True)[0]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, heads, n, head_dim, generator=g).requires_grad_() for _ in range(3)]

    attend(*inputs(64)).sum().backward()  # warm up kernels and allocator outside the measured window
    q, k, v = inputs(T)
    dout = torch.randn_like(q)
    before = peak_kib()
    start = time.perf_counter()
    attend(q, k, v).backward(dout)
    return {"extra_mib": (peak_kib() - before) / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--naive-max", type=int, default=8192)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.heads, args.head_dim, args.block)))
        return
    print(f"heads={args.heads} head_dim={args.head_dim} block={args.block} fp32, batch 1; "
          "peak RSS growth over forward+backward, MiB (seconds)")
    print(f"{'T':>6} {'dq,dk,dv':>9} {'blockwise':>16} {'naive':>16} {'sdpa (CPU)':>16}")
    for T in args.lengths:
        cells = []
        for method in ("blockwise", "naive", "sdpa"):
            if method == "naive" and T > args.naive_max:
                cells.append(f"{'-':>16}")
                continue
            out = subprocess.run([sys.executable, __file__, "--heads", str(args.heads), "--head-dim",
                                  str(args.head_dim), "--block", str(args.block), "--child", method, str(T)],
                                 capture_output=True, text=True, check=True, env=CHILD_ENV)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{r['extra_mib']:>8.1f} ({r['seconds']:>5.2f}s)")
        grads = 3 * args.heads * T * args.head_dim * 4 / 2**20
        print(f"{T:>6} {grads:>9.1f} {' '.join(cells)}", flush=True)


if __name__ == "__main__":
    main()
