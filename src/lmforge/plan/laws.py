"""Scaling laws L(N, D) = E + A / N^alpha + B / D^beta, and compute-optimal sizing under C = 6ND.

Minimising L on the curve 6ND = C gives (Hoffmann et al. 2022, eq. 4)
    N*(C) = G (C/6)^a,  D*(C) = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).
E does not move the optimum, only the loss reached there.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "fitted"

    def loss(self, n_params, tokens):
        """Predicted loss; works on floats and on numpy arrays alike."""
        return self.E + self.A / n_params ** self.alpha + self.B / tokens ** self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N*, D*) minimising the loss for a budget of `compute` FLOPs with C = 6ND."""
        if compute <= 0:
            raise LmforgeError(f"the compute budget must be positive (got {compute})")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / 6) ** (self.beta / (self.alpha + self.beta))
        return n, compute / (6 * n)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ScalingLaw":
        try:
            data = json.loads(Path(path).read_text())
            law = cls(**{k: data[k] for k in ("E", "A", "B", "alpha", "beta")}, name=data.get("name", str(path)))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}: not a scaling-law JSON with E, A, B, alpha, beta ({e})") from e
        if not all(math.isfinite(v) and v > 0 for v in (law.A, law.B, law.alpha, law.beta)):
            raise LmforgeError(f"{path}: A, B, alpha and beta must be positive numbers")
        return law


PUBLISHED = {
    # Hoffmann et al. (2022) approach 3, the constants as printed in the paper (eq. 10).
    "chinchilla": ScalingLaw(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, approach 3"),
    # The same fit with the unrounded exponents of the paper's TeX source; rounding alone moves
    # N* at the Gopher budget from ~32B to ~40B (Besiroglu et al. 2024, section 3).
    "chinchilla-unrounded": ScalingLaw(1.6934, 406.4, 410.7, 0.3392, 0.2849, "Hoffmann et al. 2022, unrounded"),
    # Besiroglu et al. (2024), "Chinchilla scaling: a replication attempt" (arXiv 2404.10102):
    # approach 3 refitted to data reconstructed from the paper; agrees with approaches 1 and 2.
    "epoch-2024": ScalingLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 refit"),
}


def get_law(name_or_path: str) -> ScalingLaw:
    """A published law by name, or a fitted law saved as JSON by `lmforge scaling fit --save`."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    if Path(name_or_path).is_file():
        return ScalingLaw.load(name_or_path)
    raise LmforgeError(f"unknown scaling law {name_or_path!r}: use one of {', '.join(PUBLISHED)} "
                       "or a JSON file written by `lmforge scaling fit --save`")


def optimal_by_ratio(compute: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """The rule of thumb from Hoffmann et al.'s approaches 1 and 2: D = 20 N, so N = sqrt(C / 120)."""
    if compute <= 0 or tokens_per_param <= 0:
        raise LmforgeError("the compute budget and tokens per parameter must be positive")
    n = math.sqrt(compute / (6 * tokens_per_param))
    return n, tokens_per_param * n
