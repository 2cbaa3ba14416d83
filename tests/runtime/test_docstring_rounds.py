"""The round counts the kernels' docstrings state are the ones the cost engine measures (none is trusted by hand).

Each case names a number a docstring states; the test finds it in that docstring and measures the
implementation with :func:`siguard.runtime.kernels.nonlinear.measured_rounds`. A protocol change that moves a
count fails here until the docstring says the new one.
"""

import pytest

from siguard.runtime.kernels import nonlinear as nl

K10 = (2, 10)  # a softmax's K = 10, and a (2, 10) secret elsewhere
CASES = [
    (nl.softmax, "softmax", "max_exp_recip", K10, {"axis": -1}, "= 93 rounds"),
    (nl.softmax, "softmax", "crypten", K10, {"axis": -1}, "= 151 rounds"),
    (nl.softmax, "softmax", "exp2", K10, {"axis": -1}, "= 90 rounds"),
    (nl.softmax, "softmax", "piranha", K10, {"axis": -1}, "= 79 rounds"),
    (nl.softmax, "softmax", "secureml", K10, {"axis": -1}, "= 47 rounds"),
    (nl.sigmoid, "sigmoid", "exp_recip", K10, {}, "= 49 rounds"),
    (nl.sigmoid, "sigmoid", "exp_recip", K10, {"exp_impl": "exp2"}, "(exp2: 46)"),
    (nl.sigmoid, "sigmoid", "chebyshev32", K10, {}, "(d = 32: 27)"),
    (nl.tanh, "tanh", "sigmoid", K10, {}, "49 rounds"),
    (nl.tanh, "tanh", "chebyshev32", K10, {}, "27 rounds)"),
    (nl.erf, "erf", "chebyshev24", K10, {}, "= 27 rounds"),
    (nl.gelu, "gelu", "erf", K10, {}, "= 30 rounds"),
    (nl.gelu, "gelu", "tanh", K10, {}, "= 60 rounds"),
    (nl.gelu, "gelu", "chebyshev16", K10, {}, "= 24 rounds"),
    (nl.softplus, "softplus", "exp_log", K10, {}, "= 47 rounds"),
    (nl.softplus, "softplus", "exp_log", K10, {"exp_impl": "exp2"}, "(exp2: 44)"),
    (nl.softplus, "softplus", "chebyshev16", K10, {}, "= 24 rounds"),
    (nl.sqrt, "sqrt", "newton_rsqrt", K10, {}, "31 rounds"),
    (nl.layer_norm, "layer_norm", "newton_rsqrt", (2, 64), {"axis": -1, "epsilon": 1e-5}, "= 39 rounds"),
    (nl.reciprocal, "reciprocal", "newton10", K10, {}, "newton10 = 84 rounds"),
]


@pytest.mark.parametrize("fn,op,impl,shape,attrs,stated", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[5].split()[-1]}" for c in CASES])
def test_a_docstring_round_count_is_the_measured_one(fn, op, impl, shape, attrs, stated):
    assert stated in fn.__doc__, (fn.__name__, stated)
    number = int("".join(ch for ch in stated.split("=")[-1].split(":")[-1] if ch.isdigit()))
    assert nl.measured_rounds(op, impl, shape, **attrs) == number


@pytest.mark.parametrize("n", [4, 8, 10])
def test_the_limit_exp_takes_3n_plus_10_rounds_as_its_docstring_says(n):
    assert "3n + 10 rounds" in nl.exp.__doc__
    assert nl.measured_rounds("exp", f"limit{n}") == 3 * n + 10
