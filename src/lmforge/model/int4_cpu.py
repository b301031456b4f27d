"""lmforge's own int4 x int8 CPU matmul (int4_cpu.cpp, built by cpu_kernels.py on first use), used by
Int4Linear instead of PyTorch's `_weight_int4pack_mm_for_cpu` on x86 CPUs with AVX512-VNNI (or AVX2, a
slower path with the same results).

Why: decoding is bound by the bytes of weight read per token. PyTorch's kernel reads bf16 scale and
zero per 32 weights (5 bits a weight) and multiplies in bf16; this one reads fp16 scales only for
symmetric weights (4.5 bits, as llama.cpp's Q4_0), quantises the activations to int8 per 32 inputs (as
llama.cpp does for Q4_0 x Q8_0) and multiplies in integers, 16 output rows per instruction. The int8
activations are its one approximation; the perplexity cost is measured in the README.

LMFORGE_INT4_KERNEL: auto (default: the best instruction set the CPU has), avx2 (the AVX2 path even
where AVX512-VNNI is there: for tests and comparisons), torch (PyTorch's kernel). Without the built
kernels (a failed build, not x86) PyTorch's kernel serves.
"""
from __future__ import annotations

import functools
import os

import torch

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels

TILE_ROWS, BLOCK = 16, 32
ISAS = {"avx512-vnni": 2, "avx2": 1}   # the C++ op's instruction-set codes
CHOICES = ("auto", "avx2", "torch")


@functools.cache
def isa() -> int:
    """The instruction set lmforge's kernel runs with here (an ISAS code), or 0: PyTorch's kernel serves
    Int4Linear. Builds and loads the kernel on the first call."""
    choice = os.environ.get("LMFORGE_INT4_KERNEL", "auto")
    if choice not in CHOICES:
        raise LmforgeError(f"LMFORGE_INT4_KERNEL must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch" or not cpu_kernels.load():
        return 0
    best = torch.ops.lmforge_int4.supported_isa()
    return min(best, ISAS["avx2"]) if choice == "avx2" else best


def describe() -> str:
    """Which kernel CPU int4 layers use here, in words (builds lmforge's on the first call)."""
    code = isa()
    names = {v: k for k, v in ISAS.items()}
    return f"lmforge's int4 x int8 kernel ({names[code]})" if code else "PyTorch's int4 kernel (bf16 activations)"


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[torch.Tensor, bool] | None:
    """The kernel's layout for w = scales * (codes - zeros): codes 0..15 [out, in] (in a multiple of 32),
    scales/zeros [out, in / 32] (one per 32-input block; None or all 8 = symmetric) -> (packed, asym),
    or None when the scales do not fit fp16."""
    out, n_in = codes.shape
    tiles, blocks = out // TILE_ROWS, n_in // BLOCK
    q = codes.to(torch.uint8).view(tiles, TILE_ROWS, blocks, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
    nibbles = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(tiles, blocks, 256)   # [tile, block, octet, row, 4]
    asym = zeros is not None and bool((zeros != 8).any())
    per_block = [scales] + ([-scales * zeros] if asym else [])
    halves = [t.half() for t in per_block]
    if not all(torch.isfinite(h).all() for h in halves):
        return None
    tails = [h.view(tiles, TILE_ROWS, blocks).transpose(1, 2).contiguous().view(torch.uint8) for h in halves]
    return torch.cat([nibbles, *tails], dim=-1).contiguous(), asym


def mm(x: torch.Tensor, packed: torch.Tensor, out_features: int, asym: bool, isa_code: int) -> torch.Tensor:
    """x float32 [rows, in] @ the packed weight^T -> float32 [rows, out_features]."""
    return torch.ops.lmforge_int4.mm(x, packed, out_features, asym, isa_code)
