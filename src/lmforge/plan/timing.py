"""Training time and cost: total FLOPs / (GPUs x peak FLOP/s x MFU).

Total FLOPs are 6 N D (forward 2ND, backward 4ND; Kaplan et al. 2020), or flops_per_token * D
when the model's attention term should be counted too.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass
class TrainingTime:
    total_flops: float
    gpus: int
    peak_flops: float       # per GPU
    mfu: float
    seconds: float
    gpu_hours: float
    cost: float | None      # gpu_hours x price, when a price is given

    @property
    def days(self) -> float:
        return self.seconds / 86400


def training_flops(n_params: float, tokens: float, flops_per_token: float | None = None) -> float:
    return (flops_per_token if flops_per_token else 6 * n_params) * tokens


def training_time(n_params: float, tokens: float, gpus: int, peak_flops: float, mfu: float = 0.4,
                  price_per_gpu_hour: float | None = None, flops_per_token: float | None = None) -> TrainingTime:
    for name, value in (("tokens", tokens), ("gpus", gpus), ("peak FLOP/s", peak_flops)):
        if not value or value <= 0:
            raise LmforgeError(f"{name} must be positive (got {value})")
    if not flops_per_token and n_params <= 0:
        raise LmforgeError(f"the parameter count must be positive (got {n_params})")
    if not 0 < mfu <= 1:
        raise LmforgeError(f"MFU is a fraction of peak in (0, 1], got {mfu}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise LmforgeError("the price per GPU-hour cannot be negative")
    total = training_flops(n_params, tokens, flops_per_token)
    seconds = total / (gpus * peak_flops * mfu)
    gpu_hours = gpus * seconds / 3600
    cost = gpu_hours * price_per_gpu_hour if price_per_gpu_hour is not None else None
    return TrainingTime(total, gpus, peak_flops, mfu, seconds, gpu_hours, cost)
