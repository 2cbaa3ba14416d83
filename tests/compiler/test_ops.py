"""Every IR op has a runtime handler, and every implementation a plan may name exists."""

from siguard.compiler.ops import NONLINEAR_OPS, OPS, default_impl
from siguard.runtime.kernels.handlers import HANDLERS
from siguard.runtime.kernels.nonlinear import get_implementation


def test_every_executable_op_has_a_handler():
    # div and batchnorm never reach a plan: canonicalize rewrites them (tests/passes/test_canonicalize.py)
    missing = set(OPS) - set(HANDLERS) - {"div", "batchnorm"}
    assert not missing


def test_every_listed_nonlinear_implementation_resolves():
    for op in NONLINEAR_OPS:
        assert default_impl(op) == OPS[op].impls[0]
        for impl in OPS[op].impls:
            assert callable(get_implementation(op, impl)), (op, impl)
