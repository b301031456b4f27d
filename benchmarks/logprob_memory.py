"""Peak memory of per-token log-probs (forward + backward): chunked vs naive, as vocabulary grows.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py [--tokens 1024 --dim 64]

Each (method, vocab) runs in a fresh subprocess; the figure is the growth of the process's peak
resident memory (getrusage ru_maxrss, glibc mmap threshold pinned, see CHILD_ENV) from after the inputs are allocated to after backward, so it
is the working memory of the op itself plus the weight gradient (vocab x dim fp32, listed apart:
both methods must produce it). naive = log_softmax(hidden @ W.T).gather(targets), which holds
[tokens, vocab] fp32 logits, their log-softmax and the same-sized gradients.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCABS = (4096, 32768, 131072)
# glibc serves big blocks from its heap once one was freed (the mmap threshold adapts upwards), so
# a loop of freed 16 MiB chunks fragments the heap and RSS drifts with the chunk count. Pinning
# the threshold makes every tensor an mmap returned to the OS on free: the peak is live memory.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(method: str, vocab: int, tokens: int, dim: int) -> dict:
    import torch

    from lmforge.model.logprobs import token_logprobs

    def run(v: int, n: int):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, dim, generator=g, requires_grad=True)
        w = (torch.randn(v, dim, generator=g) * 0.02).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        return h, w, t

    def step(h, w, t):
        if method == "chunked":
            logp = token_logprobs(h, w, t)
        else:
            logp = torch.log_softmax(h @ w.t(), dim=-1).gather(1, t[:, None]).squeeze(1)
        logp.sum().backward()

    step(*run(256, 8))  # warm up kernels and allocator outside the measured window
    h, w, t = run(vocab, tokens)
    before = peak_kib()
    start = time.perf_counter()
    step(h, w, t)
    return {"extra_mib": (peak_kib() - before) / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--child", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.tokens, args.dim)))
        return
    print(f"tokens={args.tokens} dim={args.dim}; peak RSS growth over forward+backward, MiB")
    print(f"{'vocab':>7} {'weight grad':>11} {'chunked':>9} {'naive':>9} {'naive/chunked':>13} "
          f"{'t chunked':>9} {'t naive':>8}")
    for vocab in VOCABS:
        res = {}
        for method in ("chunked", "naive"):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--dim", str(args.dim),
                                  "--child", method, str(vocab)], capture_output=True, text=True,
                                 check=True, env=CHILD_ENV)
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        c, n = res["chunked"], res["naive"]
        print(f"{vocab:>7} {vocab * args.dim * 4 / 2**20:>11.1f} {c['extra_mib']:>9.1f} {n['extra_mib']:>9.1f} "
              f"{n['extra_mib'] / max(c['extra_mib'], 1e-9):>13.1f} {c['seconds']:>8.2f}s {n['seconds']:>7.2f}s")


if __name__ == "__main__":
    main()
