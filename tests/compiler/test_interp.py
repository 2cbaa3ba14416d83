"""The float interpreter: hand-computed semantics of the ops with subtle conventions, and its contract."""

from __future__ import annotations

import numpy as np
import pytest

from siguard.compiler.interp import OP_HANDLERS, run_float
from siguard.compiler.ir import Graph, Node, Value
from siguard.compiler.ops import OPS, default_impl
from siguard.core.errors import InputError


def single(op: str, x: np.ndarray, out_shape: tuple[int, ...], extra: list[np.ndarray] = (), **attrs) -> np.ndarray:
    """Run one ``op`` node on input x (and constant extra inputs); returns its output."""
    g = Graph("t")
    g.add_value(Value("x", x.shape, owner="client"))
    names = ["x"]
    for k, arr in enumerate(extra):
        g.add_value(Value(f"c{k}", arr.shape, owner="model", data=arr))
        names.append(f"c{k}")
    g.add_value(Value("y", out_shape))
    g.add_node(Node("n", op, names, ["y"], attrs, impl=default_impl(op)))
    g.inputs, g.outputs = ["x"], ["y"]
    y = run_float(g, {"x": x})["y"]
    assert y.shape == out_shape and y.dtype == np.float64
    return y


def test_every_ir_op_has_float_semantics():
    assert set(OPS) == set(OP_HANDLERS)


def test_avgpool_count_include_pad_both_ways():
    x = np.ones((1, 1, 2, 2))
    attrs = {"kernel": [2, 2], "strides": [1, 1], "pads": [1, 1, 0, 0]}
    inc = single("avgpool", x, (1, 1, 2, 2), count_include_pad=True, **attrs)
    exc = single("avgpool", x, (1, 1, 2, 2), count_include_pad=False, **attrs)
    np.testing.assert_allclose(inc[0, 0], [[0.25, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(exc[0, 0], np.ones((2, 2)))


def test_maxpool_pads_are_minus_infinity():
    x = -np.arange(1, 5, dtype=np.float64).reshape(1, 1, 2, 2)
    y = single("maxpool", x, (1, 1, 2, 2), kernel=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0], dilations=[1, 1])
    np.testing.assert_allclose(y[0, 0], [[-1, -1], [-1, -1]])  # never the 0 a zero pad would give


def test_truncate_is_identity_and_div_divides():
    x = np.random.default_rng(0).standard_normal((3, 4))
    np.testing.assert_array_equal(single("truncate", x, (3, 4), bits=16), x)
    np.testing.assert_allclose(single("div", x, (3, 4), [np.full(4, 2.0)]), x / 2)


def test_gelu_both_modes_and_batchnorm():
    from scipy.special import erf

    x = np.linspace(-3, 3, 13).reshape(1, 13)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    np.testing.assert_allclose(single("gelu", x, (1, 13), approximate="none"), exact, atol=1e-12)
    np.testing.assert_allclose(single("gelu", x, (1, 13), approximate="tanh"), exact, atol=1e-3)
    xb = np.random.default_rng(1).standard_normal((2, 3, 2, 2))
    scale, bias, mean, var = (np.array([1.0, 2.0, 3.0]) * k for k in (1, 0.1, 0.5, 1))
    y = single("batchnorm", xb, xb.shape, [scale, bias, mean, var], epsilon=1e-5)
    r = (-1, 1, 1)
    expected = (xb - mean.reshape(r)) / np.sqrt(var.reshape(r) + 1e-5) * scale.reshape(r) + bias.reshape(r)
    np.testing.assert_allclose(y, expected)


def test_layer_norm_over_trailing_axes():
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    scale = np.full((3, 4), 2.0)
    y = single("layer_norm", x, x.shape, [scale], axis=1, epsilon=1e-5)
    m = x.mean(axis=(1, 2), keepdims=True)
    v = x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5) * 2.0)


def test_keep_all_returns_intermediates():
    g = Graph("t")
    g.add_value(Value("x", (2,), owner="client"))
    g.add_value(Value("a", (2,)))
    g.add_value(Value("y", (2,)))
    g.add_node(Node("n1", "relu", ["x"], ["a"]))
    g.add_node(Node("n2", "neg", ["a"], ["y"]))
    g.inputs, g.outputs = ["x"], ["y"]
    everything = run_float(g, {"x": np.array([-1.0, 2.0])}, keep_all=True)
    assert set(everything) == {"x", "a", "y"}
    np.testing.assert_array_equal(everything["a"], [0.0, 2.0])
    assert set(run_float(g, {"x": np.array([-1.0, 2.0])})) == {"y"}


def test_bad_inputs_and_failing_node_are_named():
    g = Graph("t")
    g.add_value(Value("x", (2, 3), owner="client"))
    g.add_value(Value("y", (5,)))
    g.add_node(Node("bad_reshape", "reshape", ["x"], ["y"], {"shape": [5]}))
    g.inputs, g.outputs = ["x"], ["y"]
    with pytest.raises(InputError, match="missing input"):
        run_float(g, {})
    with pytest.raises(InputError, match="shape"):
        run_float(g, {"x": np.zeros((3, 2))})
    with pytest.raises(RuntimeError, match="bad_reshape"):
        run_float(g, {"x": np.zeros((2, 3))})
