"""Range-fitted approximations ("fit<d>", the approximation pass's polynomials) against numpy.

Each case states the tolerance the fit must meet on its range (max |error| against the numpy
function); the fixed-point result may add a few ulp on top. Out-of-range inputs are clipped to the
range, so they must give the function's value at the nearer end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax as np_softmax

import siguard.runtime.kernels.nonlinear as nl
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.ring import decode, encode

FRAC = 16
ULP = 2.0**-FRAC
E = PlainEngine(FRAC)

# (op, lo, hi, degree, stated tolerance on [lo, hi])
CASES = [
    ("exp", -11.09, 0.0, 8, 1e-3),
    ("exp", -11.09, 0.0, 12, 1e-5),
    ("exp", -4.0, 2.0, 12, 1e-5),
    ("sigmoid", -6.0, 6.0, 8, 1.5e-2),
    ("sigmoid", -6.0, 6.0, 16, 3e-4),
    ("tanh", -3.0, 3.0, 12, 4e-3),
    ("tanh", -3.0, 3.0, 16, 6e-4),
    ("erf", -2.5, 2.5, 12, 5e-4),
    ("erf", -2.5, 2.5, 16, 2e-5),
    ("relu", -4.0, 4.0, 4, 0.25),
]


def _run(op: str, x: np.ndarray, lo: float, hi: float, degree: int) -> tuple[np.ndarray, np.ndarray]:
    xe = encode(x, FRAC)
    y = nl.get_implementation(op, f"fit{degree}")(E, Clear(xe), lo=lo, hi=hi)
    return decode(xe, FRAC), decode(y.v, FRAC)


@pytest.mark.parametrize("op,lo,hi,degree,tol", CASES)
def test_fit_is_within_its_tolerance_on_the_range(op, lo, hi, degree, tol):
    x = np.linspace(lo, hi, 4001)
    xd, y = _run(op, x, lo, hi, degree)
    want = nl.FIT_TARGETS[op](xd)
    assert np.abs(y - want).max() <= tol + 4 * ULP
    # and the float interpolant alone meets the stated tolerance (the runtime adds only fixed point)
    assert np.abs(nl.fitted_reference(op, xd, lo, hi, degree) - want).max() <= tol
    assert np.abs(y - nl.fitted_reference(op, xd, lo, hi, degree)).max() <= 6 * ULP


@pytest.mark.parametrize("op,lo,hi,degree,tol", CASES)
def test_out_of_range_inputs_are_clipped_to_the_range(op, lo, hi, degree, tol):
    below = np.array([lo - 100.0, lo - 3.0, lo - 0.01])
    above = np.array([hi + 0.01, hi + 3.0, hi + 100.0])
    _, yb = _run(op, below, lo, hi, degree)
    _, ya = _run(op, above, lo, hi, degree)
    at_lo = nl.fitted_reference(op, np.array([lo]), lo, hi, degree)[0]
    at_hi = nl.fitted_reference(op, np.array([hi]), lo, hi, degree)[0]
    assert np.abs(yb - at_lo).max() <= 6 * ULP
    assert np.abs(ya - at_hi).max() <= 6 * ULP


def test_fit_without_a_range_uses_the_documented_default():
    lo, hi = nl.FIT_DEFAULT_RANGES["sigmoid"]
    x = np.array([lo - 5.0, 0.0, hi + 5.0])
    y = decode(nl.get_implementation("sigmoid", "fit16")(E, Clear(encode(x, FRAC))).v, FRAC)
    want = nl.fitted_reference("sigmoid", x, lo, hi, 16)
    assert np.abs(y - want).max() <= 6 * ULP


def test_fit_cost_is_a_clip_plus_a_polynomial():
    import torch

    from siguard.runtime.kernels.approx import poly_rounds
    from siguard.runtime.kernels.cost import CostEngine, MetaShares

    e = CostEngine(FRAC)
    nl.get_implementation("tanh", "fit8")(e, MetaShares(torch.empty((4, 3), device="meta")), lo=-3.0, hi=3.0)
    assert e.total["rounds"] == 10 + poly_rounds(8)


@pytest.mark.parametrize("degree,tol", [(8, 2e-3), (12, 1e-4)])
def test_softmax_with_a_fitted_exp_matches_numpy(degree, tol):
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 3.0, size=(64, 10))
    xe = encode(x, FRAC)
    lo = -16 * math.log(2.0)
    y = nl.softmax(E, Clear(xe), impl="max_exp_recip", exp_impl=f"fit{degree}", exp_lo=lo, iterations=4)
    got = decode(y.v, FRAC)
    want = np_softmax(decode(xe, FRAC), axis=-1)
    assert np.abs(got - want).max() <= tol


def test_softmax_newton_range_is_honoured():
    """A sum range [1, K] with fewer Newton steps is coarser but still a softmax within its error."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 4.0, size=(32, 10))
    xe = encode(x, FRAC)
    want = np_softmax(decode(xe, FRAC), axis=-1)
    errs = []
    for k in (2, 3, 4):
        y = nl.softmax(E, Clear(xe), impl="max_exp_recip", exp_impl="exp2", iterations=k, recip_lo=1.0, recip_hi=10.0)
        errs.append(np.abs(decode(y.v, FRAC) - want).max())
    # the linear guess on [1, 10] has relative error 0.503; k steps leave 0.503^(2^k)
    assert errs[0] <= 0.503**4 + 1e-3 and errs[1] <= 0.503**8 + 1e-3 and errs[2] <= 1e-4
