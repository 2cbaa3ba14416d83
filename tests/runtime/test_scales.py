"""Fixed-point scales asserted by the reference engine: a wrong scale fails here instead of giving a wrong number."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from siguard.compiler.plan import Plan
from siguard.core.errors import RuntimeFault
from siguard.pipeline import CompileOptions, compile_model
from siguard.runtime.executor import Executor
from siguard.runtime.kernels import handlers
from siguard.runtime.kernels.plain import PlainEngine
from siguard.runtime.kernels.scales import ScaleCheckingEngine, Scaled, ScaleError
from siguard.runtime.ring import decode, encode

F = 16
NONLINEAR = set(handlers.NONLINEAR) | {"guard"}


# ---- the rules, on the engine alone ---------------------------------------------------------------
def _s(scale, value=1.0):
    return Scaled(encode(np.array([value]), scale if scale is not None else F), scale)


def test_scales_add_in_products_and_drop_in_truncations():
    e = ScaleCheckingEngine(F)
    x, w = _s(F), _s(F)
    assert e.mul(x, w).scale == e.matmul(_s(F), _s(2 * F)).scale - F == 2 * F
    assert e.trunc(e.mul(x, w), F).scale == F
    assert e.add(e.mul(x, w), _s(2 * F)).scale == 2 * F  # a bias meets the product at 2f
    assert e.mul_public_real(x, 0.5).scale == F  # multiply by a public real and rescale: x's scale
    assert e.b2a(e.msb(x)).scale == 0 and e.mul_bit(x, e.msb(x)).scale == F
    assert e.local(lambda v: v.reshape(1, 1), x).scale == F and e.neg(x).scale == F


def test_public_constants_and_unknown_scales_are_adopted_not_guessed():
    e = ScaleCheckingEngine(F)
    x = _s(F)
    assert e.add(x, torch.tensor([3])).scale == F  # a public constant takes the secret's scale
    assert e.mul(x, torch.tensor([2])).scale is None  # 2 at scale 0 or 2^-15 at scale 16: unknown
    assert e.add(e.mul(x, torch.tensor([2])), x).scale == F
    assert e.trunc(_s(None), 4).scale is None


def test_adding_values_at_different_scales_raises():
    e = ScaleCheckingEngine(F)
    with pytest.raises(ScaleError, match=r"add of values at different fixed-point scales \[16, 32\]"):
        e.add(_s(F), e.mul(_s(F), _s(F)))
    with pytest.raises(ScaleError, match="cat"):
        e.cat([_s(F), _s(2 * F)], 0)


# ---- plans: the normal ones run clean, a broken handler or plan fails naming the step ----------------
class _Block(torch.nn.Module):
    """A transformer layer: single-head self-attention over 4 tokens of width 16, layer norms, a GELU MLP."""

    def __init__(self, d: int = 16, t: int = 4, k: int = 5):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.f1, self.f2 = torch.nn.Linear(d, 32), torch.nn.Linear(32, d)
        self.head = torch.nn.Linear(t * d, k)
        self.t, self.d = t, d

    def forward(self, x):
        x = x.reshape(-1, self.t, self.d)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, dim=-1) @ self.v(x)
        x = self.ln1(x + self.o(a))
        x = self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))
        return self.head(x.reshape(-1, self.t * self.d))


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("block") / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Block().eval(), (torch.zeros(1, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def plans(mlp_onnx, cnn_onnx, block_onnx, digits):
    x = digits[0][:16].astype(np.float32)
    out = {}
    for name, path, cal in (("mlp", mlp_onnx, x), ("cnn", cnn_onnx, x.reshape(-1, 1, 8, 8)), ("block", block_onnx, x)):
        res = compile_model(path, CompileOptions(batch=2, calibration=cal))
        out[name] = (res.plan, res.weights, cal[:2])
    return out


def _run(plan: Plan, weights, x, engine):
    ex = Executor(plan, engine)
    ex.share_weights(weights)
    revealed = ex.run({plan.inputs[0]["name"]: encode(x, plan.frac_bits)})
    return ex, decode(revealed[plan.outputs[0]["name"]], plan.frac_bits)


@pytest.mark.parametrize("name", ["mlp", "cnn", "block"])
def test_the_normal_plans_run_clean_under_the_scale_checks(plans, name):
    plan, weights, x = plans[name]
    ex, checked = _run(plan, weights, x, ScaleCheckingEngine(plan.frac_bits))
    _, plain = _run(plan, weights, x, PlainEngine(plan.frac_bits))
    assert np.array_equal(checked, plain)  # the same arithmetic: only the scales are added
    ops = {s.name: s.op for s in plan.steps}
    unchecked = {ops[step] for step, _ in ex.scale_check.unchecked}
    assert unchecked <= NONLINEAR, unchecked  # only a kernel's own public constants lose a scale
    if name in ("mlp", "cnn"):
        assert not unchecked  # every step's output checked
    checked_steps = [s for s in plan.steps if s.op not in ("input", "reveal")]
    assert len(ex.scale_check.unchecked) < len(checked_steps) / 10


def _skip_truncation(ctx, step, args):
    """A broken ``truncate`` handler: forgets to truncate (the kind of slip hand-kept scales invite)."""
    return [args[0]]


def test_a_handler_that_skips_a_truncation_fails_naming_the_step(plans, monkeypatch):
    plan, weights, x = plans["mlp"]
    monkeypatch.setitem(handlers.HANDLERS, "truncate", _skip_truncation)
    _, wrong = _run(plan, weights, x, PlainEngine(plan.frac_bits))  # without the checks: a wrong number
    assert np.abs(wrong).max() > 1e3
    first = next(i for i, s in enumerate(plan.steps) if s.op == "truncate")
    step = plan.steps[first]
    with pytest.raises(RuntimeFault) as info:
        _run(plan, weights, x, ScaleCheckingEngine(plan.frac_bits))
    message = str(info.value)
    assert message.startswith(f"step {first} '{step.name}' (op truncate, impl {step.impl}) failed on the reference")
    assert f"wrote {step.outputs[0]!r} at scale {2 * F}, the plan's value table declares {F}" in message


def test_a_weight_declared_at_the_wrong_scale_fails_naming_the_step(plans):
    plan, weights, x = plans["mlp"]
    doc = plan.to_dict()
    matmul = next(s for s in plan.steps if s.op == "matmul" and len(s.inputs) == 3)
    bias = matmul.inputs[2]
    spec = next(w for w in doc["weights"] if w["name"] == bias)
    assert spec["scale"] == 2 * F
    spec["scale"] = F  # encoded and shared at f: the product it meets is at 2f
    broken = Plan(doc)
    with pytest.raises(RuntimeFault, match=rf"'{matmul.name}' \(op matmul.*add of values at different fixed-point "
                                           rf"scales \[16, 32\]"):
        _run(broken, weights, x, ScaleCheckingEngine(plan.frac_bits))
