"""Rules of the bounds pass (passes/bounds.py): sound bounds, the derived domain, what each op needs.

Oracles: hand arithmetic on the weights (powers of two), the float interpreter (siguard.compiler.interp)
for the bounds' soundness, numpy for what the fixed-point reference must compute."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from siguard.compiler.backend import build_plan
from siguard.compiler.ir import Graph, Node, Value
from siguard.compiler.ops import default_impl
from siguard.core.errors import InputError, ModelError
from siguard.passes.base import PassContext
from siguard.passes.bounds import Bounds, parse_input_range, propagate
from siguard.passes.fixedpoint import FixedPoint
from siguard.runtime.local import run_reference
from siguard.runtime.runs import check_inputs

F = 16


def _graph(shape, nodes, weights=None) -> Graph:
    """x (client) -> nodes [(op, inputs, attrs, impl_params)] -> last output; weights are secret."""
    g = Graph("t")
    g.add_value(Value("x", tuple(shape), owner="client"))
    g.inputs = ["x"]
    for name, data in (weights or {}).items():
        g.add_value(Value(name, data.shape, owner="model", data=np.asarray(data, dtype=np.float64)))
    x = torch.zeros(shape, dtype=torch.float64)
    env = {"x": x, **{k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in (weights or {}).items()}}
    from siguard.compiler.interp import OP_HANDLERS

    for k, (op, ins, attrs, params) in enumerate(nodes):
        out = f"v{k}"
        node = Node(f"n{k}_{op}", op, list(ins), [out], dict(attrs))
        env[out] = OP_HANDLERS[op](node, *[env[i] for i in ins])
        g.add_value(Value(out, tuple(env[out].shape)))
        if op not in ("add", "sub", "mul", "matmul", "conv", "reshape", "transpose"):
            node.impl = default_impl(op)
        if params:
            node.attrs["_impl_params"] = dict(params)
        g.nodes.append(node)
    g.outputs = [f"v{len(nodes) - 1}"]
    return g


def _run_pass(g: Graph, declared=None, calibration=None) -> tuple[PassContext, list[str]]:
    ctx = PassContext(frac_bits=F)
    FixedPoint().run(g, ctx)
    return ctx, Bounds(declared, calibration).run(g, ctx)


def _reference(g: Graph, x: np.ndarray) -> np.ndarray:
    plan, weights = build_plan(g, frac_bits=F, model_info={"name": "t", "output": g.outputs[0]})
    plan.doc["inputs"][0]["domain"] = g.meta["input_domain"]["x"]
    return run_reference(plan, x, weights).output


# ---- rule 1 and 3: the derived domain is the largest power of two within headroom -----------------------------
def _matmul_graph() -> tuple[Graph, np.ndarray]:
    w = np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]) * 2.0**10  # row-sum of |w|: 4 * 2^10
    return _graph((1, 4), [("matmul", ["x", "w"], {}, None)], {"w": w}), w


def test_derived_domain_is_the_largest_power_of_two_within_headroom():
    g, w = _matmul_graph()
    _run_pass(g)
    # the product before its truncation, at scale 2f, must stay below 2^61: 4 * 2^10 * 2^k * 2^32 < 2^61
    k = max(k for k in range(-8, 31) if 4 * 2**10 * 2**k * 2**32 < 2**61)
    assert g.meta["input_domain"] == {"x": [-(2.0**k), 2.0**k]}
    assert g.meta["input_domain_source"] == "derived"
    # the worst input of the domain is computed exactly; eight times beyond it the product passes 2^63 and wraps
    worst = np.sign(w[:, :1].T) * 2.0**k
    assert np.allclose(_reference(g, worst), worst @ w, rtol=1e-6)
    beyond = worst * 8
    plan, weights = build_plan(g, frac_bits=F, model_info={"name": "t", "output": g.outputs[0]})
    assert not np.allclose(run_reference(plan, beyond, weights).output, beyond @ w, rtol=1e-3)


def test_declared_range_that_overflows_fails_naming_the_node():
    g, _ = _matmul_graph()
    with pytest.raises(ModelError, match=r"n0_matmul \(matmul\): its output can reach .* inputs within "
                                         r"\[-2\^16, 2\^16\]") as info:
        _run_pass(g, {"x": (-(2.0**20), 2.0**20)})
    assert "\n" not in str(info.value)


def test_declared_range_that_is_safe_is_recorded_as_given():
    g, _ = _matmul_graph()
    _run_pass(g, {"x": (-3.0, 5.0)})
    assert g.meta["input_domain"] == {"x": [-3.0, 5.0]} and g.meta["input_domain_source"] == "declared"


# ---- rule 2: the bounds contain every value the float interpreter computes ------------------------------------
class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 2 * 2, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        h = torch.nn.functional.avg_pool2d(h, 2, stride=2, padding=0)
        h = torch.nn.functional.gelu(self.fc(h.flatten(1)))
        h = torch.sigmoid(self.ln(h)) * h + torch.tanh(h)
        return torch.softmax(self.out(h), dim=-1)


def test_bounds_contain_every_value_of_the_float_interpreter(tmp_path):
    from siguard.compiler.frontend import load_model
    from siguard.compiler.interp import run_float
    from siguard.passes.base import PassManager
    from siguard.passes.canonicalize import Canonicalize

    torch.manual_seed(3)
    model = _Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "mixed.onnx"
    with warnings.catch_warnings():  # the legacy TorchScript exporter, on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 2, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    g = load_model(path, batch=1)
    PassManager([Canonicalize(), FixedPoint()]).run(g, PassContext(frac_bits=F))
    lo, hi = -2.0, 3.0
    res = propagate(g, {"x": (lo, hi)}, F)
    assert res.safe
    rng = np.random.default_rng(0)
    corners = [np.full((1, 2, 8, 8), lo), np.full((1, 2, 8, 8), hi), rng.choice([lo, hi], (1, 2, 8, 8))]
    for x in corners + [rng.uniform(lo, hi, (1, 2, 8, 8)) for _ in range(30)]:
        values = run_float(g, {"x": x}, keep_all=True)
        for name, (b_lo, b_hi) in res.bounds.items():
            v = values[name]
            assert np.all(v >= b_lo - 1e-9 * (1 + np.abs(b_lo))), name
            assert np.all(v <= b_hi + 1e-9 * (1 + np.abs(b_hi))), name


# ---- rules 4-5: approximations must be valid on their input's bound -------------------------------------------
def _softmax_graph(impl: str, params: dict) -> Graph:
    w = np.diag([64.0, -64.0, 32.0, 1.0])
    g = _graph((1, 4), [("matmul", ["x", "w"], {}, None), ("softmax", ["v0"], {"axis": -1}, params)], {"w": w})
    g.nodes[-1].impl = impl
    return g


@pytest.mark.parametrize("impl, params, want", [
    ("max_exp_recip", {"exp_impl": "limit6"}, {"exp_impl": "exp2"}),
    ("max_exp_recip", {"exp_impl": "fit8", "exp_lo": -3.0}, {"exp_impl": "exp2"}),
    ("crypten", {}, {"saturate": True}),
])
def test_softmax_whose_spread_can_pass_its_exp_range_gets_a_saturating_exp(impl, params, want):
    g = _softmax_graph(impl, params)
    _, changes = _run_pass(g, {"x": (-4.0, 4.0)})  # spread up to 2 * 256
    assert g.nodes[-1].attrs["_impl_params"] == {**{k: v for k, v in params.items() if k not in want and
                                                    k != "exp_lo"}, **want}
    assert any("n1_softmax (softmax)" in c for c in changes)
    x = np.array([[4.0, 4.0, -4.0, 0.0]])
    z = x @ np.diag([64.0, -64.0, 32.0, 1.0])
    want_y = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.abs(_reference(g, x) - want_y).max() < 1e-2


def test_softmax_whose_spread_fits_its_exp_is_left_alone():
    g = _softmax_graph("max_exp_recip", {"exp_impl": "limit6"})
    _, changes = _run_pass(g, {"x": (-0.25, 0.25)})  # spread up to 2 * 16 <= 2^6
    assert g.nodes[-1].attrs["_impl_params"] == {"exp_impl": "limit6"}
    assert not any("softmax" in c for c in changes)


def test_layer_norm_variance_beyond_its_guess_range_widens_the_range():
    g = _graph((1, 64), [("layer_norm", ["x", "s", "b"], {"axis": 1, "epsilon": 1e-5}, None)],
               {"s": np.ones(64), "b": np.zeros(64)})
    _, changes = _run_pass(g, {"x": (-1000.0, 1000.0)})
    assert g.nodes[0].attrs["_impl_params"]["hi"] >= 1000.0**2  # the variance bound of the domain
    x = np.tile([-1000.0, 1000.0], 32)[None]  # the largest variance the domain allows
    want = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    assert np.abs(_reference(g, x) - want).max() < 1e-2


def test_layer_norm_whose_squares_overflow_is_refused():
    g = _graph((1, 64), [("layer_norm", ["x", "s", "b"], {"axis": 1, "epsilon": 1e-5}, None)],
               {"s": np.ones(64), "b": np.zeros(64)})
    with pytest.raises(ModelError, match=r"n0_layer_norm \(layer_norm\): the sum of squared deviations"):
        _run_pass(g, {"x": (-1e4, 1e4)})


def test_fitted_polynomial_beyond_its_fitted_range_becomes_the_default_implementation():
    g = _graph((1, 3), [("sigmoid", ["x"], {}, {"lo": -2.0, "hi": 2.0})])
    g.nodes[0].impl = "fit8"
    _, changes = _run_pass(g, {"x": (-8.0, 8.0)})
    assert g.nodes[0].impl == default_impl("sigmoid") and "_impl_params" not in g.nodes[0].attrs
    assert any("fit8 fitted on [-2, 2] would err" in c for c in changes)
    x = np.array([[-8.0, 0.5, 6.0]])
    assert np.abs(_reference(g, x) - 1 / (1 + np.exp(-x))).max() < 1e-2
    g = _graph((1, 3), [("sigmoid", ["x"], {}, {"lo": -2.0, "hi": 2.0})])
    g.nodes[0].impl = "fit8"
    _run_pass(g, {"x": (-2.0, 2.0)})  # inside its range: kept
    assert g.nodes[0].impl == "fit8"


def test_fitted_exp_beyond_its_range_is_refused():
    g = _graph((1, 3), [("exp", ["x"], {}, {"lo": -4.0, "hi": 2.0})])
    g.nodes[0].impl = "fit8"
    with pytest.raises(ModelError, match=r"fit8 is fitted on \[-4, 2\] but its input can reach \[-1, 5\]"):
        _run_pass(g, {"x": (-1.0, 5.0)})


def test_exp_beyond_its_overflow_limit_is_refused():
    with pytest.raises(ModelError, match=r"e\^x overflows"):
        _run_pass(_graph((1, 3), [("exp", ["x"], {}, None)]), {"x": (0.0, 30.0)})


def test_reciprocal_of_a_value_that_may_be_zero_is_refused():
    with pytest.raises(ModelError, match=r"reciprocal.*valid on"):
        _run_pass(_graph((1, 3), [("reciprocal", ["x"], {}, None)]), {"x": (-1.0, 1.0)})


# ---- rule 6-7: usefulness and the unproven case ---------------------------------------------------------------
def test_a_domain_narrower_than_the_calibration_inputs_is_reported_once():
    g, _ = _matmul_graph()
    ctx, _ = _run_pass(g, calibration=np.full((4, 1, 4), 1e6))
    assert len(ctx.warnings) == 1 and "does not cover the calibration inputs" in ctx.warnings[0]
    assert "n0_matmul (matmul)" in ctx.warnings[0] and "--frac-bits" in ctx.warnings[0]


def test_a_network_too_deep_for_interval_bounds_compiles_unproven_with_one_warning():
    w = np.full((8, 8), 64.0)
    g = _graph((1, 8), [("matmul", ["x" if k == 0 else f"v{k - 1}", "w"], {}, None) for k in range(6)], {"w": w})
    ctx, _ = _run_pass(g)
    assert g.meta["input_domain_source"] == "unproven"
    assert g.meta["input_domain"]["x"] == [-(2.0 ** (62 - 2 * F)), 2.0 ** (62 - 2 * F)]
    assert len(ctx.warnings) == 1 and "NOT guaranteed" in ctx.warnings[0]


# ---- the client's check and the option's syntax ---------------------------------------------------------------
def test_client_refuses_a_value_outside_the_domain_naming_it_and_the_bound():
    g, _ = _matmul_graph()
    _run_pass(g, {"x": (-1.0, 2.0)})
    plan, _ = build_plan(g, frac_bits=F, model_info={"name": "t", "output": g.outputs[0]})
    plan.doc["inputs"][0]["domain"] = g.meta["input_domain"]["x"]
    check_inputs(plan, np.array([[-1.0, 0.0, 1.0, 2.0]]))
    with pytest.raises(InputError, match=r"input 'x' holds 2\.5 at index \[0, 2\], outside the plan's input "
                                         r"domain \[-1, 2\]"):
        check_inputs(plan, np.array([[-1.0, 0.0, 2.5, 2.0]]))


@pytest.mark.parametrize("spec, want", [
    ("-1,2", {"a": (-1.0, 2.0), "b": (-1.0, 2.0)}),
    (["a=0,1", "b=-5,5"], {"a": (0.0, 1.0), "b": (-5.0, 5.0)}),
    ({"b": (1, 2)}, {"b": (1.0, 2.0)}),
    (None, {}),
])
def test_input_range_syntax(spec, want):
    assert parse_input_range(spec, ["a", "b"]) == want


@pytest.mark.parametrize("spec, message", [
    ("1", "must read LO,HI"), ("2,1", "LO < HI"), ("c=0,1", "no input 'c'"), ("0,inf", "finite"),
])
def test_bad_input_range_gets_one_line(spec, message):
    with pytest.raises(InputError, match=message):
        parse_input_range(spec, ["a", "b"])
