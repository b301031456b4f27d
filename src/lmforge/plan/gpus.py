"""Accelerators the planner knows: memory, memory bandwidth and dense bf16 peak FLOP/s from the
vendors' data sheets.

Memory is the nominal capacity in GiB (what the product name says); bandwidth is the data sheet's
HBM/GDDR figure (decimal GB/s: what bounds a decode step); peak FLOP/s are dense (no 2:4 sparsity)
tensor-core figures with fp32 accumulation. V100 and T4 have no bf16, so their fp16 figure is
given. Any other accelerator can be described with `custom_gpu`.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    peak_flops: float   # dense bf16 (fp16 where the card has no bf16)
    bandwidth: float    # memory bandwidth, bytes/s


GPUS: dict[str, GPU] = {g.name.lower(): g for g in (
    GPU("A100-40GB", 40 * GiB, 312e12, 1555e9),
    GPU("A100-80GB", 80 * GiB, 312e12, 2039e9),
    GPU("H100", 80 * GiB, 989e12, 3.35e12),   # SXM; the PCIe card: 756e12, 2.0e12
    GPU("H200", 141 * GiB, 989e12, 4.8e12),
    GPU("B200", 180 * GiB, 2250e12, 8e12),
    GPU("L4", 24 * GiB, 121e12, 300e9),
    GPU("L40S", 48 * GiB, 362e12, 864e9),
    GPU("A10G", 24 * GiB, 70e12, 600e9),
    GPU("RTX-4090", 24 * GiB, 165e12, 1008e9),
    GPU("RTX-3090", 24 * GiB, 71e12, 936e9),
    GPU("V100-32GB", 32 * GiB, 125e12, 900e9),
    GPU("T4", 16 * GiB, 65e12, 320e9),
    GPU("MI300X", 192 * GiB, 1307e12, 5.3e12),
)}

ALIASES = {"a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100-80gb": "h100",
           "h200-141gb": "h200", "4090": "rtx-4090", "rtx4090": "rtx-4090", "3090": "rtx-3090",
           "rtx3090": "rtx-3090", "v100": "v100-32gb"}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name, case-insensitively ('h100', 'A100-40GB', 'rtx4090', ...)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise LmforgeError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())}")
    return GPUS[key]


def custom_gpu(memory_gib: float, peak_tflops: float, bandwidth_gbps: float, name: str = "custom") -> GPU:
    if memory_gib <= 0 or peak_tflops <= 0 or bandwidth_gbps <= 0:
        raise LmforgeError("a custom GPU needs positive memory, peak FLOP/s and bandwidth")
    return GPU(name, memory_gib * GiB, peak_tflops * 1e12, bandwidth_gbps * 1e9)
