"""Decode-row attention on CPU, one layer of SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim
64) over a float32 paged cache: lmforge's row kernel (serve/row_attention.cpp: each row over exactly
its own keys, read in place, same bits however the step is batched) against the path it replaced and
still used off CPU (gather the rows' keys, SDPA over the padded batch with a mask).

    python benchmarks/row_attention.py                       # one thread
    python benchmarks/row_attention.py --threads 2 --cases 1x100,16x200

Each case is ROWSxKEYS: ROWS sequences of KEYS keys each, in scattered 16-slot blocks. Microseconds
per layer call, median of --repeat timed batches, and the kernel's speed-up.
"""
from __future__ import annotations

import argparse

import torch

from cpu_matmul_kernels import timed
from lmforge.model import ModelConfig
from lmforge.serve.paged_cache import PagedKVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1x100,1x400,1x1500,4x300,16x200,16x800")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(vocab_size=32, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, hidden_dim=64)
    bs, g = 16, torch.Generator().manual_seed(0)
    print(f"one layer, 9/3 heads x 64, float32 cache, {args.threads} thread(s); microseconds per call")
    print(f"{'rows x keys':>12} {'kernel':>9} {'gather+SDPA':>12} {'speed-up':>9}")
    for case in args.cases.split(","):
        rows, n = map(int, case.split("x"))
        blocks_per_row = -(-n // bs)
        cache = PagedKVCache(cfg, num_blocks=rows * blocks_per_row * 2, block_size=bs)
        assert cache.row_kernel, "lmforge's CPU kernels did not build"
        k, v = torch.randn(2, cache.num_blocks * bs, 3, 64, generator=g)
        cache.write(0, torch.arange(cache.num_blocks * bs), k, v)
        tables = torch.randperm(cache.num_blocks, generator=g)[:rows * blocks_per_row].view(rows, -1)
        keys = (tables[:, :, None] * bs + torch.arange(bs)).reshape(rows, -1)[:, :n].reshape(-1)
        lengths = torch.full((rows,), n)
        q = torch.randn(rows, 9, 64, generator=g)
        times = {}
        for kernel in (True, False):
            cache.row_kernel = kernel
            times[kernel] = timed(lambda: cache.row_attention(0, q, keys, lengths), args.repeat)
        print(f"{case:>12} {times[True]:9.1f} {times[False]:12.1f} {times[False] / times[True]:8.2f}x")


if __name__ == "__main__":
    main()
