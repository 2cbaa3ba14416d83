"""Canonicalize: one test per rule; run_float before and after must agree on random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from siguard.compiler.frontend import load_model
from siguard.compiler.interp import run_float
from siguard.compiler.ir import Graph, Node, Value
from siguard.compiler.ops import default_impl
from siguard.passes.base import PassContext
from siguard.passes.canonicalize import Canonicalize
from tests import models

RNG = np.random.default_rng(0)


class Builder:
    """Tiny IR builder: ``x = b.input(...)``, ``b.weight(...)``, ``b.op("relu", [x])``."""

    def __init__(self) -> None:
        self.g = Graph("t")

    def input(self, name: str, shape: tuple[int, ...]) -> str:
        self.g.add_value(Value(name, shape, owner="client"))
        self.g.inputs.append(name)
        return name

    def weight(self, name: str, data: np.ndarray) -> str:
        data = np.asarray(data, dtype=np.float32)
        self.g.add_value(Value(name, data.shape, visibility="secret", owner="model", data=data))
        return name

    def public(self, name: str, value: float) -> str:
        data = np.array(value, dtype=np.float32)
        self.g.add_value(Value(name, (), visibility="public", data=data))
        return name

    def op(self, op: str, inputs: list[str], out_shape: tuple[int, ...], out: str | None = None, **attrs) -> str:
        out = out or self.g.fresh_name(op)
        self.g.add_value(Value(out, out_shape))
        self.g.add_node(Node(f"n_{out}", op, inputs, [out], attrs, impl=default_impl(op), source=f"n_{out}"))
        return out

    def output(self, name: str) -> Graph:
        self.g.outputs = [name]
        return self.g


def canonicalize(graph: Graph) -> tuple[Graph, list[str]]:
    """Canonicalize a copy; assert run_float agrees on random inputs. Returns (new graph, changes)."""
    after = graph.copy()
    changes = Canonicalize()(after, PassContext()).changes
    feeds = {name: RNG.standard_normal(graph.values[name].shape) for name in graph.inputs}
    before_out = run_float(graph, feeds)[graph.outputs[0]]
    after_out = run_float(after, feeds)[after.outputs[0]]
    assert after.outputs == graph.outputs
    assert np.allclose(before_out, after_out, rtol=1e-5, atol=1e-5)
    return after, changes


def ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


# ---- 1. identities -------------------------------------------------------------------------------


def test_rule1_identities_and_noop_reshapes_removed_output_name_kept():
    b = Builder()
    x = b.input("x", (2, 3))
    r = b.op("relu", [x], (2, 3))
    i = b.op("identity", [r], (2, 3))
    s = b.op("reshape", [i], (2, 3), shape=[2, 3])
    t = b.op("sigmoid", [s], (2, 3))
    g = b.output(b.op("identity", [t], (2, 3), out="y"))
    after, changes = canonicalize(g)
    assert ops(after) == ["relu", "sigmoid"]
    assert after.nodes[-1].outputs == ["y"]
    assert len([c for c in changes if c.startswith("removed ")]) == 3


def test_rule1_refuses_input_straight_to_output():
    b = Builder()
    x = b.input("x", (2, 3))
    g = b.output(b.op("identity", [x], (2, 3), out="y"))
    after, changes = canonicalize(g)
    assert ops(after) == ["identity"] and changes == []


# ---- 2. constant folding -------------------------------------------------------------------------


def test_rule2_constant_folding_visibility():
    b = Builder()
    x = b.input("x", (2, 4))
    half = b.op("add", [b.public("a", 0.25), b.public("c", 0.25)], ())  # public only -> public
    w = b.weight("w", RNG.standard_normal(4))
    scaled = b.op("mul", [w, b.public("k", 3.0)], (4,))  # touches a weight -> secret
    y = b.op("mul", [b.op("add", [x, scaled], (2, 4)), half], (2, 4))
    after, changes = canonicalize(b.output(y))
    assert ops(after) == ["add", "mul"]
    assert (after.values[half].visibility, after.values[half].owner) == ("public", None)
    assert (after.values[scaled].visibility, after.values[scaled].owner) == ("secret", "model")
    assert np.allclose(after.values[scaled].data, np.asarray(b.g.values["w"].data) * 3)
    assert sum(c.startswith("folded constant") for c in changes) == 2


# ---- 3. batchnorm --------------------------------------------------------------------------------


def _bn_params(b: Builder, c: int, tag: str) -> list[str]:
    return [
        b.weight(f"{tag}_gamma", RNG.uniform(0.5, 1.5, c)),
        b.weight(f"{tag}_beta", RNG.standard_normal(c)),
        b.weight(f"{tag}_mean", RNG.standard_normal(c)),
        b.weight(f"{tag}_var", RNG.uniform(0.5, 1.5, c)),
    ]


@pytest.mark.parametrize("bias", [True, False])
def test_rule3_batchnorm_folded_into_conv(bias):
    b = Builder()
    x = b.input("x", (1, 2, 5, 5))
    inputs = [x, b.weight("w", RNG.standard_normal((3, 2, 3, 3)))] + (
        [b.weight("b", RNG.standard_normal(3))] if bias else []
    )
    c = b.op("conv", inputs, (1, 3, 3, 3), strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    y = b.op("batchnorm", [c, *_bn_params(b, 3, "bn")], (1, 3, 3, 3), epsilon=1e-5)
    after, changes = canonicalize(b.output(y))
    assert ops(after) == ["conv"] and len(after.nodes[0].inputs) == 3
    assert all(after.values[i].owner == "model" for i in after.nodes[0].inputs[1:])
    assert any("folded batchnorm" in c for c in changes)


def test_rule3_batchnorm_folded_into_matmul():
    b = Builder()
    x = b.input("x", (4, 6))
    m = b.op("matmul", [x, b.weight("w", RNG.standard_normal((6, 3))), b.weight("b", RNG.standard_normal(3))], (4, 3))
    y = b.op("batchnorm", [m, *_bn_params(b, 3, "bn")], (4, 3), epsilon=1e-3)
    after, _ = canonicalize(b.output(y))
    assert ops(after) == ["matmul"]


def test_rule3_unfoldable_batchnorm_lowered_to_mul_add():
    b = Builder()
    x = b.input("x", (2, 3, 4, 4))
    c = b.op("conv", [x, b.weight("w", RNG.standard_normal((3, 3, 1, 1)))], (2, 3, 4, 4),
             strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)  # fmt: skip
    bn = b.op("batchnorm", [c, *_bn_params(b, 3, "bn")], (2, 3, 4, 4), epsilon=1e-5)
    y = b.op("add", [bn, c], (2, 3, 4, 4))  # conv output read twice: cannot fold
    after, changes = canonicalize(b.output(y))
    assert ops(after) == ["conv", "mul", "add", "add"]
    scale = after.values[after.nodes[1].inputs[1]]
    shift = after.values[after.nodes[2].inputs[1]]
    assert scale.shape == (3, 1, 1) and shift.shape == (3, 1, 1)
    assert scale.owner == shift.owner == "model" and scale.visibility == "secret"
    assert any("lowered batchnorm" in c for c in changes)


def test_rule3_batchnorm_after_relu_is_lowered():
    b = Builder()
    x = b.input("x", (4, 5))
    y = b.op("batchnorm", [b.op("relu", [x], (4, 5)), *_bn_params(b, 5, "bn")], (4, 5), epsilon=1e-5)
    after, _ = canonicalize(b.output(y))
    assert ops(after) == ["relu", "mul", "add"]
    assert after.values[after.nodes[1].inputs[1]].shape == (5,)


# ---- 4. matmul + bias ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (1, 5), (1, 1, 5)])
def test_rule4_matmul_add_vector_becomes_bias(shape):
    b = Builder()
    x = b.input("x", (2, 3, 4))
    m = b.op("matmul", [x, b.weight("w", RNG.standard_normal((4, 5)))], (2, 3, 5))
    y = b.op("add", [b.weight("c", RNG.standard_normal(shape)), m], (2, 3, 5))
    after, changes = canonicalize(b.output(y))
    assert ops(after) == ["matmul"] and after.values[after.nodes[0].inputs[2]].shape == (5,)
    assert after.nodes[0].outputs == [y]
    assert any("fused add" in c for c in changes)


def test_rule4_refuses_matrix_addend():
    b = Builder()
    x = b.input("x", (2, 4))
    m = b.op("matmul", [x, b.weight("w", RNG.standard_normal((4, 5)))], (2, 5))
    y = b.op("add", [m, b.weight("c", RNG.standard_normal((2, 5)))], (2, 5))
    after, _ = canonicalize(b.output(y))
    assert ops(after) == ["matmul", "add"]


# ---- 5. division ---------------------------------------------------------------------------------


def test_rule5_div_by_public_constant():
    b = Builder()
    x = b.input("x", (2, 3))
    after, _ = canonicalize(b.output(b.op("div", [x, b.public("d", 255.0)], (2, 3))))
    assert ops(after) == ["mul"]
    r = after.values[after.nodes[0].inputs[1]]
    assert r.visibility == "public" and r.owner is None and math.isclose(float(r.data), 1 / 255, rel_tol=1e-6)


def test_rule5_div_by_secret_constant():
    b = Builder()
    x = b.input("x", (2, 3))
    after, _ = canonicalize(b.output(b.op("div", [x, b.weight("d", RNG.uniform(1, 2, 3))], (2, 3))))
    assert ops(after) == ["mul"]
    assert after.values[after.nodes[0].inputs[1]].owner == "model"


def test_rule5_div_by_computed_value():
    b = Builder()
    x = b.input("x", (2, 3))
    den = b.op("exp", [x], (2, 3))
    after, changes = canonicalize(b.output(b.op("div", [x, den], (2, 3))))
    assert ops(after) == ["exp", "reciprocal", "mul"]
    assert any("reciprocal" in c for c in changes)


# ---- 6. sum --------------------------------------------------------------------------------------


def test_rule6_sum_is_already_adds():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    r = helper.make_node("Relu", ["x"], ["r"])
    s = helper.make_node("Sum", ["x", "r", "x"], ["y"])
    model = helper.make_model(helper.make_graph([r, s], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    graph = load_model(model)
    assert ops(graph) == ["relu", "add", "add"]
    after, changes = canonicalize(graph)
    assert ops(after) == ["relu", "add", "add"] and changes == []


# ---- 7. GELU -------------------------------------------------------------------------------------


def _gelu_pattern(b: Builder, x: str, *, half: float = 0.5, div_form: bool = True, order: int = 0) -> str:
    shape = b.g.values[x].shape
    if div_form:
        scaled = b.op("div", [x, b.public("sqrt2", math.sqrt(2))], shape)
    else:
        scaled = b.op("mul", [b.public("inv_sqrt2", 1 / math.sqrt(2)), x], shape)
    one_plus = b.op("add", [b.op("erf", [scaled], shape), b.public("one", 1.0)], shape)
    if order == 0:  # TorchScript: (x * (1 + erf)) * 0.5
        return b.op("mul", [b.op("mul", [x, one_plus], shape), b.public("half", half)], shape)
    return b.op("mul", [one_plus, b.op("mul", [b.public("half", half), x], shape)], shape)  # 0.5 * x first


@pytest.mark.parametrize("div_form", [True, False])
@pytest.mark.parametrize("order", [0, 1])
def test_rule7_gelu_pattern_fused(div_form, order):
    b = Builder()
    x = b.input("x", (3, 7))
    h = b.op("matmul", [x, b.weight("w", RNG.standard_normal((7, 7)))], (3, 7))
    after, changes = canonicalize(b.output(_gelu_pattern(b, h, div_form=div_form, order=order)))
    assert ops(after) == ["matmul", "gelu"]
    assert after.nodes[1].attrs == {"approximate": "none"} and after.nodes[1].inputs == [h]
    assert any("GELU" in c for c in changes)


def test_rule7_gelu_near_miss_not_fused():
    b = Builder()
    x = b.input("x", (3, 7))
    after, _ = canonicalize(b.output(_gelu_pattern(b, x, half=0.6)))
    assert "gelu" not in ops(after)


def test_rule7_gelu_refused_when_intermediate_is_shared():
    b = Builder()
    x = b.input("x", (3, 7))
    g = _gelu_pattern(b, x)
    erf_out = next(n.outputs[0] for n in b.g.nodes if n.op == "erf")
    after, _ = canonicalize(b.output(b.op("add", [g, erf_out], (3, 7))))
    assert "gelu" not in ops(after)


def test_rule7_gelu_from_torchscript_export(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    path = models.export(model, tmp_path / "gelu.onnx", torch.zeros(1, 6), opset=17)
    graph = load_model(path)
    assert "erf" in ops(graph)
    after, _ = canonicalize(graph)
    assert ops(after) == ["matmul", "gelu", "matmul"]


# ---- 8. unused -----------------------------------------------------------------------------------


def test_rule8_unused_nodes_and_values_removed():
    b = Builder()
    x = b.input("x", (2, 3))
    b.op("exp", [b.op("tanh", [x], (2, 3))], (2, 3))  # dead branch
    b.weight("orphan", np.ones(3))
    after, changes = canonicalize(b.output(b.op("relu", [x], (2, 3))))
    assert ops(after) == ["relu"] and "orphan" not in after.values
    assert "removed 2 unused node(s)" in changes
