"""Compute-optimal sizing at the Chinchilla/Gopher budget, 5.76e23 FLOPs."""
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lmforge.errors import LmforgeError
from lmforge.plan import PUBLISHED, ScalingLaw, get_law, optimal_by_ratio

GOPHER_BUDGET = 5.76e23
CHINCHILLA_N, CHINCHILLA_D = 70e9, 1.4e12   # the model Hoffmann et al. trained at that budget


def numeric_optimum(law: ScalingLaw, compute: float) -> float:
    """Minimise L(N, C/6N) over log N directly, as a check on the closed form."""
    res = minimize_scalar(lambda logn: law.loss(np.exp(logn), compute / (6 * np.exp(logn))),
                          bounds=(np.log(1e6), np.log(1e15)), method="bounded", options={"xatol": 1e-10})
    return float(np.exp(res.x))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_closed_form_optimum_is_the_minimum_on_the_iso_flop_curve(name):
    law = PUBLISHED[name]
    n, d = law.optimal(GOPHER_BUDGET)
    assert 6 * n * d == pytest.approx(GOPHER_BUDGET)
    assert n == pytest.approx(numeric_optimum(law, GOPHER_BUDGET), rel=1e-4)


def test_chinchilla_budget_under_the_published_approach_3_fit():
    # With the constants printed in the paper (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    # the formula gives N* = 32.2B and D* = 2.98T: the same neighbourhood as the 70B / 1.4T model
    # Hoffmann et al. trained (approaches 1 and 2), but a factor ~2.2 smaller in N. That gap is the
    # known weakness of approach 3's published constants, not of the arithmetic (next tests).
    n, d = PUBLISHED["chinchilla"].optimal(GOPHER_BUDGET)
    assert n == pytest.approx(32.19e9, rel=1e-3)
    assert d == pytest.approx(2.982e12, rel=1e-3)
    assert CHINCHILLA_N / 2.5 < n < CHINCHILLA_N and CHINCHILLA_D < d < 2.5 * CHINCHILLA_D


def test_unrounded_exponents_give_the_papers_approach_3_figure_of_about_40b():
    # Hoffmann et al. report that approach 3 puts the Gopher-budget optimum near 40B parameters;
    # the unrounded exponents of the paper's source (0.3392, 0.2849) reproduce it.
    n, d = PUBLISHED["chinchilla-unrounded"].optimal(GOPHER_BUDGET)
    assert n == pytest.approx(40e9, rel=0.03)
    assert d == pytest.approx(2.38e12, rel=0.01)


def test_refit_and_20_tokens_rule_land_on_70b_and_1_4t():
    # Besiroglu et al. (2024) refitted approach 3 and found it agrees with approaches 1 and 2.
    n, d = PUBLISHED["epoch-2024"].optimal(GOPHER_BUDGET)
    assert n == pytest.approx(CHINCHILLA_N, rel=0.05) and d == pytest.approx(CHINCHILLA_D, rel=0.06)
    n, d = optimal_by_ratio(GOPHER_BUDGET, 20)
    assert n == pytest.approx(69.3e9, rel=1e-3) and d == pytest.approx(1.386e12, rel=1e-3)
    assert n == pytest.approx(CHINCHILLA_N, rel=0.02)


def test_optimum_scales_as_c_to_the_a():
    law = PUBLISHED["chinchilla"]
    a = law.beta / (law.alpha + law.beta)
    n1, _ = law.optimal(1e21)
    n2, _ = law.optimal(1e23)
    assert n2 / n1 == pytest.approx(100 ** a)


def test_laws_round_trip_through_json_and_reject_bad_files(tmp_path):
    law = ScalingLaw(1.8, 400.0, 2000.0, 0.35, 0.36)
    law.save(tmp_path / "law.json")
    assert get_law(str(tmp_path / "law.json")).optimal(1e22) == pytest.approx(law.optimal(1e22))
    (tmp_path / "bad.json").write_text('{"E": 1}')
    with pytest.raises(LmforgeError, match="not a scaling-law JSON"):
        get_law(str(tmp_path / "bad.json"))
    with pytest.raises(LmforgeError, match="unknown scaling law"):
        get_law("kaplan-2031")
    with pytest.raises(LmforgeError, match="must be positive"):
        law.optimal(0)
