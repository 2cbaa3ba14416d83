"""Rules of the fixed-point pass: scales and truncation placement."""

import numpy as np

from siguard.compiler.ir import Graph, Node, Value
from siguard.passes.base import PassContext
from siguard.passes.fixedpoint import FixedPoint

F = 16


def _graph(op: str, const: np.ndarray, visibility: str, *, bias: np.ndarray | None = None) -> Graph:
    g = Graph("t")
    g.add_value(Value("x", (2, 3), owner="client"))
    g.inputs = ["x"]
    owner = "model" if visibility == "secret" else None
    g.add_value(Value("c", const.shape, visibility=visibility, owner=owner, data=const))
    inputs = ["x", "c"]
    if bias is not None:
        g.add_value(Value("b", bias.shape, owner="model", data=bias))
        inputs.append("b")
    g.add_value(Value("y", (2, 3) if op == "mul" else (2, const.shape[-1])))
    g.add_node(Node("n", op, inputs, ["y"]))
    g.outputs = ["y"]
    return g


def _truncs(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op == "truncate"]


def test_secret_product_gets_one_truncation_by_f():
    g = _graph("matmul", np.ones((3, 4)), "secret")
    FixedPoint().run(g, PassContext(frac_bits=F))
    (t,) = _truncs(g)
    assert t.attrs["bits"] == F
    assert t.outputs == ["y"] and g.values["y"].scale == F
    assert g.values[t.inputs[0]].scale == 2 * F
    assert g.nodes[0].outputs == t.inputs


def test_product_by_public_integer_constant_is_not_truncated():
    g = _graph("mul", np.array([2.0, -3.0, 1.0]), "public")
    FixedPoint().run(g, PassContext(frac_bits=F))
    assert _truncs(g) == []
    assert g.values["c"].scale == 0 and g.values["y"].scale == F


def test_product_by_public_real_constant_is_truncated():
    g = _graph("mul", np.array([0.5, 0.25, 1.5]), "public")
    FixedPoint().run(g, PassContext(frac_bits=F))
    (t,) = _truncs(g)
    assert g.values["c"].scale == F and t.attrs["bits"] == F


def test_bias_is_encoded_at_the_product_scale():
    g = _graph("matmul", np.ones((3, 4)), "secret", bias=np.ones(4))
    FixedPoint().run(g, PassContext(frac_bits=F))
    assert g.values["b"].scale == 2 * F
    assert g.values["c"].scale == F
    assert len(_truncs(g)) == 1


def test_weight_used_at_two_scales_is_cloned():
    g = _graph("matmul", np.ones((3, 3)), "secret", bias=np.ones(3))
    # the same weight feeds the bias slot too: it must exist at F and at 2F
    g.nodes[0].inputs[2] = "c"
    FixedPoint().run(g, PassContext(frac_bits=F))
    n = g.nodes[0]
    assert g.values[n.inputs[1]].scale == F
    assert g.values[n.inputs[2]].scale == 2 * F
    assert n.inputs[1] != n.inputs[2]


def test_headroom_is_left_to_the_bounds_pass():
    # a calibrated range is no bound: the fixed-point pass neither trusts nor warns about it
    g = _graph("matmul", np.ones((3, 4)), "secret")
    g.values["y"].range = (-2.0**40, 2.0**40)
    ctx = PassContext(frac_bits=F)
    FixedPoint().run(g, ctx)
    assert ctx.warnings == []
