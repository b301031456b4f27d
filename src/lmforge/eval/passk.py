"""pass@k: the probability that at least one of k samples passes, estimated without bias from
n >= k samples of which c passed (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomials overflow floats for large n; their ratio is a product of k terms,
C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), each in [0, 1], which is stable.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(samples: Sequence[int], correct: Sequence[int], k: int) -> tuple[float, float]:
    """Mean pass@k over problems and its standard error (of the mean of per-problem estimates)."""
    values = np.array([pass_at_k(n, c, k) for n, c in zip(samples, correct)])
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), stderr
