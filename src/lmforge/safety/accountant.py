"""Rényi-DP accounting of DP-SGD (the Poisson-subsampled Gaussian mechanism) and its conversion to (ε, δ).

One step samples each example with probability q and adds N(0, σ²C²) to the sum of gradients
clipped to norm C. Its RDP at order α is log(A_α)/(α-1), with A_α the α-th moment of the
likelihood ratio between the mixture (1-q)·N(0,σ²) + q·N(1,σ²) and N(0,σ²) (Mironov, Talwar and
Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", section 3.3). T steps
compose to T times that. The conversion to (ε, δ) is Balle et al. 2020 (Theorem 21):
ε = rdp + log((α-1)/α) - (log δ + log α)/(α-1), minimised over the orders.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, log_ndtr, logsumexp

from lmforge.errors import LmforgeError

# Orders searched: a fine grid near 1 (small ε) up to 63 (large ε); the same grid as opacus' RDP
# accountant, so the two agree to rounding.
ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))


def _log_moment_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α: the binomial expansion sum_k C(α,k) q^k (1-q)^(α-k) exp(k(k-1)/(2σ²))."""
    k = np.arange(alpha + 1)
    log_c = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_c + k * math.log(q) + (alpha - k) * math.log1p(-q) + k * (k - 1) / (2 * sigma**2)
    return float(logsumexp(terms))


def _log_moment_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α: the integral split at z0, where the two Gaussians' mixture ratio
    crosses 1, each side expanded as a binomial series in the tail mass Φ; summed until the terms
    are negligible (e^-30 relative), positive and negative terms accumulated apart."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    pos, neg = [], []
    i, sign, log_c = 0, 1, 0.0  # C(α, i) as sign and log |C|, updated by C(α, i+1) = C(α, i)(α-i)/(i+1)
    while True:
        j = alpha - i
        low = (log_c + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
               + float(log_ndtr((z0 - i) / sigma)))
        high = (log_c + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
                + float(log_ndtr((j - z0) / sigma)))
        (pos if sign > 0 else neg).extend([low, high])
        if max(low, high) < -30:
            break
        sign *= 1 if j > 0 else -1
        log_c += math.log(abs(j)) - math.log(i + 1)
        i += 1
    log_pos = float(logsumexp(pos))
    if not neg:
        return log_pos
    log_neg = float(logsumexp(neg))
    return log_pos + math.log1p(-math.exp(log_neg - log_pos))


def rdp_per_step(q: float, sigma: float, alpha: float) -> float:
    """RDP of one step of the subsampled Gaussian mechanism at order α."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return alpha / (2 * sigma**2)
    log_a = _log_moment_integer(q, sigma, int(alpha)) if float(alpha).is_integer() else \
        _log_moment_fractional(q, sigma, alpha)
    return log_a / (alpha - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, float]:
    """(ε, best order) after `steps` steps of sampling rate q and noise multiplier σ, for δ."""
    if not 0 < delta < 1:
        raise LmforgeError(f"delta must be in (0, 1), got {delta}")
    if not 0 <= q <= 1:
        raise LmforgeError(f"the sampling rate must be in [0, 1], got {q}")
    if steps == 0 or q == 0:
        return 0.0, math.nan
    best = (math.inf, math.nan)
    for alpha in orders:
        rdp = steps * rdp_per_step(q, sigma, alpha)
        eps = rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best[0]:
            best = (eps, alpha)
    return best


def noise_for_epsilon(target_epsilon: float, q: float, steps: int, delta: float, tol: float = 1e-3) -> float:
    """The smallest noise multiplier σ (to within tol relative) whose ε after `steps` steps is at
    most target_epsilon: ε falls monotonically with σ, so a bracket then bisection."""
    if not target_epsilon > 0:
        raise LmforgeError(f"target epsilon must be positive, got {target_epsilon}")
    low, high = 0.0, 1.0
    while epsilon(q, high, steps, delta)[0] > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise LmforgeError(f"epsilon {target_epsilon} is out of reach for q={q:.3g}, {steps} steps, delta={delta}")
    while high - low > tol * high:
        mid = (low + high) / 2
        if epsilon(q, mid, steps, delta)[0] > target_epsilon:
            low = mid
        else:
            high = mid
    return high
