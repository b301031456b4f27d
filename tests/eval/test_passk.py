"""The unbiased pass@k estimator against the closed form 1 - C(n-c, k) / C(n, k)."""
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.eval.passk import mean_pass_at_k, pass_at_k


def closed_form(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, Fraction(2, 5)),              # pass@1 is the pass rate c/n
    (10, 3, 5, 1 - Fraction(21, 252)),      # C(7,5)=21, C(10,5)=252 -> 11/12
    (4, 1, 2, Fraction(1, 2)),              # 3 of the 6 pairs contain the passing sample
    (3, 0, 2, Fraction(0)),                 # nothing passed
    (3, 3, 3, Fraction(1)),                 # everything passed
    (6, 4, 3, Fraction(1)),                 # n - c < k: every triple holds a pass
    (20, 1, 10, Fraction(1, 2)),            # half of all 10-subsets contain the one pass
])
def test_hand_checked_cases(n, c, k, expected):
    assert closed_form(n, c, k) == expected
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_equals_closed_form(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(float(closed_form(n, c, k)), rel=1e-9, abs=1e-12)


def test_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 does not fit a float; the product form does not need it
    assert pass_at_k(2000, 7, 1000) == pytest.approx(float(closed_form(2000, 7, 1000)), rel=1e-9)


def test_mean_and_stderr_over_problems():
    mean, se = mean_pass_at_k([4, 4], [0, 4], 1)
    assert mean == 0.5 and se == pytest.approx(0.5)  # values 0 and 1: std 0.707 / sqrt 2


def test_rejects_impossible_inputs():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
