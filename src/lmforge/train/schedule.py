"""Learning-rate schedules as pure functions of the step."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, schedule: str = "wsd", warmup: float = 0.1,
          decay: float = 0.1, min_ratio: float = 0.1) -> float:
    """Linear warmup, then either cosine to min_ratio*peak, or warmup-stable-decay: constant
    at the peak, then a linear decay to min_ratio*peak over the last `decay` fraction of steps."""
    warm = int(round(warmup * total))
    floor = peak * min_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = int(round(decay * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / max(1, decay_steps)
    return peak + (floor - peak) * min(1.0, progress)
