"""Fitting scaling laws the way Hoffmann et al. (2022, appendix D.2) did, with the fixes
Besiroglu et al. (2024) pointed out (a summed, well-scaled objective that L-BFGS can finish).

Every law is a log-sum-exp of terms, fitted in log space:
    log L = LSE(c_1 - s_1 x_1, c_2 - s_2 x_2, ..., e)      (x = log N, log D or log C)
so L(N, D) = E + A/N^alpha + B/D^beta is LSE(log A - alpha log N, log B - beta log D, log E).
The loss is the Huber loss (delta = 1e-3) of the log-loss residuals, which keeps a few bad runs
from steering the fit; it is minimised with L-BFGS from the best few points of a grid of
initialisations, and bootstrap resampling of the runs gives confidence intervals.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from lmforge.errors import LmforgeError
from lmforge.plan.laws import ScalingLaw

HUBER_DELTA = 1e-3


def single_threaded_blas():
    """L-BFGS-B calls BLAS on 5-vectors; threaded BLAS only adds overhead there (5-10x slower
    fits on a busy machine), so fits run with one BLAS thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
# A term is (index of its constant in theta, index of its slope or None, column of X or None).
CHINCHILLA_TERMS = ((0, 3, 0), (1, 4, 1), (2, None, None))       # theta = log A, log B, log E, alpha, beta
CHINCHILLA_GRID = dict(axes=(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                             np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5)))
POWER_TERMS = ((0, 1, 0),)                                         # theta = log a, b
POWER_E_TERMS = ((0, 1, 0), (2, None, None))                       # theta = log a, b, log E
POWER_AXES = (np.arange(-2, 16, 1.0), np.arange(0, 1.05, 0.1))
POWER_E_AXES = POWER_AXES + (np.arange(-1, 1.6, 0.5),)


def predict_log(theta: np.ndarray, X: np.ndarray, terms) -> tuple[np.ndarray, np.ndarray]:
    """log-prediction for parameter rows theta [G, P] and data X [n, k] -> ([G, n], weights [T, G, n])."""
    theta = np.atleast_2d(theta)
    t = np.empty((len(terms), theta.shape[0], X.shape[0]))
    for i, (const, slope, col) in enumerate(terms):
        t[i] = theta[:, const, None]
        if slope is not None:
            t[i] -= theta[:, slope, None] * X[None, :, col]
    top = t.max(axis=0)
    w = np.exp(t - top)
    total = w.sum(axis=0)
    return top + np.log(total), w / total


def huber_objective(theta, X, y, terms, delta=HUBER_DELTA):
    """Sum of Huber losses of log residuals, divided by delta so the slope far out is 1; and its gradient."""
    pred, w = predict_log(theta, X, terms)
    r = pred[0] - y
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    dr = np.where(small, r, delta * np.sign(r)) / delta
    grad = np.zeros_like(theta)
    for i, (const, slope, col) in enumerate(terms):
        grad[const] += (dr * w[i, 0]).sum()
        if slope is not None:
            grad[slope] -= (dr * w[i, 0] * X[:, col]).sum()
    return value, grad


def grid_values(axes, X, y, terms, delta=HUBER_DELTA, chunk=2048) -> tuple[np.ndarray, np.ndarray]:
    """Every point of the initialisation grid with its objective value, evaluated in blocks."""
    points = np.array(list(itertools.product(*axes)), dtype=float)
    values = np.empty(len(points))
    for start in range(0, len(points), chunk):
        pred, _ = predict_log(points[start:start + chunk], X, terms)
        r = np.abs(pred - y[None, :])
        values[start:start + chunk] = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(1)
    return points, values


def fit_terms(X, y, terms, axes=None, inits=None, starts: int = 8, delta=HUBER_DELTA) -> np.ndarray:
    """Best theta over L-BFGS runs from the `starts` best grid points (or from `inits`)."""
    if inits is None:
        points, values = grid_values(axes, X, y, terms, delta)
        inits = points[np.argsort(values)[:starts]]
    best, best_value = None, np.inf
    for theta0 in inits:
        res = minimize(huber_objective, theta0, args=(X, y, terms, delta), jac=True, method="L-BFGS-B",
                       options=dict(maxiter=5000, ftol=1e-14, gtol=1e-10))
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, res.fun
    if best is None:
        raise LmforgeError("the scaling-law fit did not converge from any starting point")
    return best


@dataclass
class FitResult:
    params: dict[str, float]                  # point estimates
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)   # bootstrap percentile CIs
    level: float = 0.95
    n_runs: int = 0
    rms_log_residual: float = 0.0
    law: ScalingLaw | None = None             # for L(N, D) fits
    bootstrap: np.ndarray | None = None       # [n_boot, n_params] resampled estimates


def _check(n: int, need: int, what: str) -> None:
    if n < need:
        raise LmforgeError(f"fitting {what} needs at least {need} runs, got {n}")


def _bootstrap(X, y, terms, theta, n_boot, seed, to_params) -> np.ndarray:
    """Refit on runs resampled with replacement, each started from the full-data optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        rows.append(list(to_params(fit_terms(X[idx], y[idx], terms, inits=[theta])).values()))
    return np.array(rows)


def _finish(theta, X, y, terms, to_params, n_boot, seed, level) -> FitResult:
    params = to_params(theta)
    pred, _ = predict_log(theta, X, terms)
    result = FitResult(params, level=level, n_runs=len(y), rms_log_residual=float(np.sqrt(np.mean((pred[0] - y) ** 2))))
    if n_boot:
        boot = _bootstrap(X, y, terms, theta, n_boot, seed, to_params)
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(boot, [tail, 100 - tail], axis=0)
        result.intervals = {k: (float(a), float(b)) for k, a, b in zip(params, lo, hi)}
        result.bootstrap = boot
    return result


def _chinchilla_params(theta) -> dict[str, float]:
    log_a, log_b, log_e, alpha, beta = theta
    return {"E": float(np.exp(log_e)), "A": float(np.exp(log_a)), "B": float(np.exp(log_b)),
            "alpha": float(alpha), "beta": float(beta), "a": float(beta / (alpha + beta))}


def fit_chinchilla(n_params, tokens, loss, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                   starts: int = 8) -> FitResult:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta; `a` in the result is N*'s exponent beta/(alpha+beta)."""
    n_params, tokens, loss = (np.asarray(v, dtype=float) for v in (n_params, tokens, loss))
    _check(len(loss), 5, "L(N, D) = E + A/N^alpha + B/D^beta (5 parameters)")
    X, y = np.column_stack([np.log(n_params), np.log(tokens)]), np.log(loss)
    with single_threaded_blas():
        theta = fit_terms(X, y, CHINCHILLA_TERMS, CHINCHILLA_GRID["axes"], starts=starts)
        result = _finish(theta, X, y, CHINCHILLA_TERMS, _chinchilla_params, n_boot, seed, level)
    p = result.params
    result.law = ScalingLaw(p["E"], p["A"], p["B"], p["alpha"], p["beta"], "fitted")
    return result


def predict_interval(result: FitResult, n_params: float, tokens: float) -> tuple[float, float]:
    """Percentile interval of the predicted loss at (N, D) over the bootstrap refits."""
    if result.bootstrap is None or result.law is None:
        raise LmforgeError("prediction intervals need an L(N, D) fit with bootstrap resamples")
    E, A, B, alpha, beta = result.bootstrap[:, :5].T
    samples = E + A / n_params ** alpha + B / tokens ** beta
    tail = 100 * (1 - result.level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = a C^-b (+ E)."""
    a: float
    b: float
    E: float = 0.0

    def loss(self, compute):
        return self.E + self.a * np.asarray(compute, dtype=float) ** -self.b


def fit_power_law(compute, loss, irreducible: bool = False, n_boot: int = 200, seed: int = 0,
                  level: float = 0.95) -> tuple[PowerLaw, FitResult]:
    """Fit L(C) = a C^-b, or a C^-b + E with irreducible=True, by the same Huber/LSE method."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    terms, axes = (POWER_E_TERMS, POWER_E_AXES) if irreducible else (POWER_TERMS, POWER_AXES)
    _check(len(loss), len(axes) + 1 if irreducible else 2, "a power law")
    X, y = np.log(compute)[:, None], np.log(loss)

    def to_params(theta):
        out = {"a": float(np.exp(theta[0])), "b": float(theta[1])}
        if irreducible:
            out["E"] = float(np.exp(theta[2]))
        return out

    with single_threaded_blas():
        theta = fit_terms(X, y, terms, axes)
        result = _finish(theta, X, y, terms, to_params, n_boot, seed, level)
    return PowerLaw(**result.params), result
