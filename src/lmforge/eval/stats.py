"""Standard errors for the metrics the tasks report."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and the standard error of the mean (sample std / sqrt(n))."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def ratio_and_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """R = sum(a) / sum(b) over documents, with the delta-method standard error of a ratio
    estimator: SE^2 = sum((a_i - R b_i)^2) / (n (n-1) mean(b)^2)."""
    a, b = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    ratio = float(a.sum() / b.sum())
    n = len(a)
    if n < 2:
        return ratio, 0.0
    var = ((a - ratio * b) ** 2).sum() / (n * (n - 1) * b.mean() ** 2)
    return ratio, float(math.sqrt(var))
