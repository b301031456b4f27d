"""The RDP accountant against opacus' RDPAccountant (the reference), and the noise search."""
import warnings

import pytest
from opacus.accountants import RDPAccountant

from lmforge.errors import LmforgeError
from lmforge.safety.accountant import epsilon, noise_for_epsilon

GRID = [  # (sampling rate q, noise multiplier sigma, steps, delta)
    (0.04, 1.5, 2250, 1e-5),   # the headline: epsilon = 7.3291
    (0.01, 1.0, 1000, 1e-5),
    (0.001, 0.8, 10000, 1e-6),
    (0.1, 3.0, 100, 1e-5),
    (0.5, 0.7, 10, 1e-3),
    (0.02, 5.0, 5000, 1e-5),
    (0.3, 1.1, 40, 1e-5),
    (1.0, 2.0, 10, 1e-5),      # no subsampling: the plain Gaussian mechanism
]


def opacus_epsilon(q, sigma, steps, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "optimal order is the largest alpha" hint
        return acc.get_privacy_spent(delta=delta)


@pytest.mark.parametrize("q,sigma,steps,delta", GRID)
def test_epsilon_equals_opacus_rdp_accountant(q, sigma, steps, delta):
    ours, order = epsilon(q, sigma, steps, delta)
    theirs, their_order = opacus_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert order == their_order


def test_headline_figure():
    assert round(epsilon(0.04, 1.5, 2250, 1e-5)[0], 4) == 7.3291


def test_noise_search_hits_the_target():
    q, steps, delta = 0.01, 1000, 1e-5
    for target in (1.0, 8.0):
        sigma = noise_for_epsilon(target, q, steps, delta)
        assert epsilon(q, sigma, steps, delta)[0] <= target
        assert epsilon(q, sigma * 0.995, steps, delta)[0] > target  # and no more noise than needed
        assert opacus_epsilon(q, sigma, steps, delta)[0] <= target + 1e-9


def test_accountant_refuses_bad_input():
    with pytest.raises(LmforgeError):
        epsilon(0.1, 1.0, 10, 0.0)
    with pytest.raises(LmforgeError):
        noise_for_epsilon(-1.0, 0.1, 10, 1e-5)
