"""Scaling-law fits recover known constants from synthetic runs, with honest intervals."""
import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.plan import ScalingLaw, fit_chinchilla, fit_power_law, predict_interval

# A law with known constants (the Besiroglu et al. 2024 refit of Chinchilla).
TRUE = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
TRUE_PARAMS = {"E": TRUE.E, "A": TRUE.A, "B": TRUE.B, "alpha": TRUE.alpha, "beta": TRUE.beta,
               "a": TRUE.beta / (TRUE.alpha + TRUE.beta)}


def synthetic_runs(seed: int, n: int = 60, noise: float = 0.01):
    """Runs spread over 1e7..1e10 parameters and 1e9..1e12 tokens; 1% multiplicative noise on the loss."""
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(7, 10, n), 10 ** rng.uniform(9, 12, n)
    return N, D, TRUE.loss(N, D) * np.exp(rng.normal(0, noise, n))


def test_noise_free_runs_give_back_the_exact_constants():
    N, D, L = synthetic_runs(0, noise=0.0)
    result = fit_chinchilla(N, D, L, n_boot=0)
    for name, value in TRUE_PARAMS.items():
        assert result.params[name] == pytest.approx(value, rel=1e-5), name
    assert result.rms_log_residual < 1e-8


def test_noisy_runs_recover_the_constants_within_their_intervals():
    N, D, L = synthetic_runs(1)
    result = fit_chinchilla(N, D, L, n_boot=60, seed=1)
    p = result.params
    assert p["E"] == pytest.approx(TRUE.E, rel=0.03)
    assert p["alpha"] == pytest.approx(TRUE.alpha, abs=0.03)
    assert p["beta"] == pytest.approx(TRUE.beta, abs=0.03)
    assert p["a"] == pytest.approx(TRUE_PARAMS["a"], abs=0.03)
    # A and B trade off against the exponents, so only their order of magnitude is pinned down.
    assert abs(np.log(p["A"] / TRUE.A)) < np.log(2) and abs(np.log(p["B"] / TRUE.B)) < np.log(2)
    for name, (lo, hi) in result.intervals.items():
        assert lo < p[name] < hi
        assert lo <= TRUE_PARAMS[name] <= hi, name
    # Predictions inside the data range are much tighter than the constants themselves.
    n, d = 1e9, 1e11
    lo, hi = predict_interval(result, n, d)
    assert lo <= TRUE.loss(n, d) <= hi and hi - lo < 0.03
    assert result.law.loss(n, d) == pytest.approx(TRUE.loss(n, d), rel=0.005)


@pytest.mark.slow
def test_bootstrap_interval_coverage_over_seeds():
    """Nominal 95% intervals should contain the truth in most of 20 independent datasets: with
    95% coverage, 17 or more hits happen with probability 0.98 (19-20 of 20 when written)."""
    hits = {name: 0 for name in TRUE_PARAMS}
    for seed in range(10, 30):
        N, D, L = synthetic_runs(seed)
        result = fit_chinchilla(N, D, L, n_boot=100, seed=seed)
        for name, (lo, hi) in result.intervals.items():
            hits[name] += lo <= TRUE_PARAMS[name] <= hi
    assert all(count >= 17 for count in hits.values()), hits


def test_huber_loss_keeps_a_few_bad_runs_from_steering_the_fit():
    N, D, L = synthetic_runs(2)
    L[:4] *= 1.3   # four runs that diverged late
    p = fit_chinchilla(N, D, L, n_boot=0).params
    assert p["E"] == pytest.approx(TRUE.E, rel=0.03)
    assert p["alpha"] == pytest.approx(TRUE.alpha, abs=0.03) and p["beta"] == pytest.approx(TRUE.beta, abs=0.03)


def test_power_law_fits_with_and_without_an_irreducible_term():
    rng = np.random.default_rng(3)
    C = np.logspace(15, 21, 25)
    law, result = fit_power_law(C, 40 * C ** -0.08 * np.exp(rng.normal(0, 0.01, 25)), n_boot=50)
    assert law.b == pytest.approx(0.08, abs=0.003) and law.a == pytest.approx(40, rel=0.1) and law.E == 0
    assert result.intervals["b"][0] <= 0.08 <= result.intervals["b"][1]
    loss = (1.7 + 500 * C ** -0.15) * np.exp(rng.normal(0, 0.005, 25))
    law, result = fit_power_law(C, loss, irreducible=True, n_boot=50)
    assert law.E == pytest.approx(1.7, rel=0.03) and law.b == pytest.approx(0.15, abs=0.01)
    assert law.loss(1e18) == pytest.approx(1.7 + 500 * 1e18 ** -0.15, rel=0.01)


def test_too_few_runs_is_a_clear_error():
    N, D, L = synthetic_runs(4, n=4)
    with pytest.raises(LmforgeError, match="needs at least 5 runs"):
        fit_chinchilla(N, D, L)
    with pytest.raises(LmforgeError, match="needs at least 4 runs"):
        fit_power_law(N[:3], L[:3], irreducible=True)
