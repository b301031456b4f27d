"""One linear layer on CPU, each kernel lmforge can multiply a weight with, at decode and prefill row
counts, on SmolLM2-135M's shapes: why weight-only int8/int4 win at one row and lose from ~16 rows,
and what the int8 x int8 product (W8A8) costs.

    python benchmarks/cpu_matmul_kernels.py                 # one thread, rows 1,16,64,256
    python benchmarks/cpu_matmul_kernels.py --threads 2 --rows 1,4,16
    python benchmarks/cpu_matmul_kernels.py --weights-mb 0  # one copy of each weight (stays in cache)

Each kernel cycles through enough copies of its weight to read --weights-mb of fp32 weights per
round, so weights come from beyond the core's L2 as in a model's decode step (one 576x1536 matrix
alone would sit in the 2 MB L2 and make small-row BLAS calls look far cheaper than in a model).
Kernels: fp32 and bf16 `F.linear` (bf16 runs on AMX where the CPU has it), fp32 on a oneDNN-prepacked
weight (`lmforge::packed_linear`, what the engine's float32 CPU linears call from 4 rows on), PyTorch's weight-only
`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (bf16 activations; what Int8Linear calls, and
Int4Linear where lmforge's kernel does not run), lmforge's int4 x int8 kernel (`lmforge.model.int4_cpu`:
activations quantised to int8 per 32 inputs, integer dot products; what Int4Linear calls on x86), on each
instruction set this CPU has (AVX512-VNNI, AVX2; the last column is the best one's speed-up over
PyTorch's int4 kernel), and lmforge's W8A8 `int8_mm` (int8
activations, oneDNN int8 GEMM on a prepacked weight; what W8A8Linear calls), each activation
quantisation included. Median of --repeat timed batches of calls each; microseconds per call.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.model import int4_cpu
from lmforge.model.packed_linear import packed_linear
from lmforge.model.w8a8 import int8_mm, quantize_rows

SHAPES = {"q_proj 576x576": (576, 576), "k_proj 576x192": (576, 192), "gate 576x1536": (576, 1536),
          "down 1536x576": (1536, 576), "lm_head 576x49152": (576, 49152)}


def timed(fn, repeat: int) -> float:
    fn()
    calls = max(1, int(0.05 / max(1e-6, _once(fn))))     # ~50 ms per timed batch
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs) * 1e6


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernels(rows: int, n_in: int, n_out: int, copies: int) -> dict:
    """name -> a call that multiplies x by each of `copies` weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=g)
    xb = x.bfloat16()
    ws = [torch.randn(n_out, n_in, generator=g) for _ in range(copies)]
    wbs = [w.bfloat16() for w in ws]
    q8s = [torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8) for _ in range(copies)]
    ones = torch.ones(n_out, dtype=torch.bfloat16)
    q4s = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n_out, n_in), generator=g, dtype=torch.int32), 1) for _ in range(copies)]
    sz = torch.ones(n_in // 32, n_out, 2, dtype=torch.bfloat16)
    scale = torch.rand(n_out, generator=g)
    each = lambda fn, weights: lambda: [fn(w) for w in weights]  # noqa: E731
    ours = {}
    if int4_cpu.isa():
        packs = [int4_cpu.pack(torch.randint(0, 16, (n_out, n_in), generator=g), torch.rand(n_out, n_in // 32) / 50,
                               None)[0] for _ in range(copies)]
        for name, code in int4_cpu.ISAS.items():   # the best path first (the speed-up column's)
            if code <= int4_cpu.isa():
                ours[f"int4 lmforge {name}"] = each(lambda w, code=code: int4_cpu.mm(x, w, n_out, False, code), packs)
    return {
        "fp32": each(lambda w: F.linear(x, w), ws),
        "fp32 prepacked": each(lambda w: packed_linear(x, [w], None), ws),
        "bf16": each(lambda w: F.linear(xb, w), wbs),
        "int8 weight-only": each(lambda q: torch._weight_int8pack_mm(xb, q, ones), q8s),
        "int4 weight-only g32": each(lambda q: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, 32, sz), q4s),
        "w8a8 (incl. quantising x)": each(lambda q: int8_mm(quantize_rows(x)[0], q, scale), q8s),
        **ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--weights-mb", type=float, default=256, help="fp32 weight bytes cycled through per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(kernels(1, 64, 64, 1))
    best = next((name for name in names if name.startswith("int4 lmforge")), None)
    names += ["lmforge / PyTorch int4"] if best else []
    print(f"torch {torch.__version__}, {args.threads} thread(s); microseconds per call, median of {args.repeat}; "
          f"{args.weights_mb:g} MB of fp32 weights cycled through")
    print("| shape | rows | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, (n_in, n_out) in SHAPES.items():
        for rows in (int(r) for r in args.rows.split(",")):
            copies = max(1, math.ceil(args.weights_mb * 2**20 / (4 * n_in * n_out)))
            times = {name: timed(fn, args.repeat) / copies for name, fn in kernels(rows, n_in, n_out, copies).items()}
            cells = [f"{t:,.0f}" for t in times.values()]
            if best:
                cells.append(f"{times['int4 weight-only g32'] / times[best]:.2f}x")
            print(f"| {label} | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
