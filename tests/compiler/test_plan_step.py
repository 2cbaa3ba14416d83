"""Typed plan steps: PlanStep and Impl read and write plan.json without changing a byte or the plan hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siguard.compiler.impl import Impl, split_numbered
from siguard.compiler.plan import Plan, PlanStep, compute_hash
from siguard.pipeline import CompileOptions, compile_model, write_plan

#: a transformer block's plan (attention, softmax with tuned exp and Newton, layer norms, GELU), written by
#: the compiler at commit 700d6cc, when plan steps were dicts
GOLDEN = Path(__file__).parent / "data" / "block_plan_700d6cc.json"


def _file_text(doc: dict) -> str:
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"  # as Plan.save writes plan.json


def test_a_plan_written_with_dict_steps_loads_into_plan_steps_and_writes_back_the_same_bytes():
    text = GOLDEN.read_text()
    plan = Plan.load(GOLDEN)  # validates the recorded hash
    assert all(isinstance(s, PlanStep) for s in plan.steps)
    assert _file_text(plan.to_dict()) == text
    assert compute_hash(plan.doc) == compute_hash(plan.to_dict()) == json.loads(text)["plan_hash"]
    for entry in json.loads(text)["steps"]:  # each step on its own, key order included
        assert json.dumps(PlanStep.from_dict(entry).to_dict()) == json.dumps(entry)


def test_compiling_and_round_tripping_through_plan_steps_keeps_the_hash_and_the_json(mlp_onnx, digits, tmp_path):
    x = digits[0][:16].astype("float32")
    res = compile_model(mlp_onnx, CompileOptions(batch=2, calibration=x))
    d = write_plan(res, tmp_path / "plan")
    text = (d / "plan.json").read_text()
    doc = json.loads(text)
    again = Plan(json.loads(text))
    assert again.to_dict() == doc and _file_text(again.to_dict()) == text
    assert compute_hash(again.doc) == doc["plan_hash"] == res.plan.plan_hash
    assert any(s.approx for s in again.steps)  # the approximation pass's records ride along


def test_plan_steps_read_by_attribute_and_keep_what_they_do_not_know():
    entry = {"name": "s", "op": "softmax", "impl": "max_exp_recip", "inputs": ["a"], "outputs": ["b"],
             "attrs": {"axis": -1}, "source": "n", "cost": {"rounds": 3, "bytes": 8, "bytes_per_party": [8, 8, 8]},
             "impl_params": {"exp_impl": "limit8", "iterations": 4}, "approx": {"impl": "limit8+newton4"},
             "note": "kept"}
    step = PlanStep.from_dict(entry)
    assert (step.op, step.impl.family, step.impl_params["iterations"], step.extra) == (
        "softmax", "max_exp_recip", 4, {"note": "kept"})
    assert step["impl"] == "max_exp_recip" and step.get("missing", 1) == 1  # read-only compatibility
    assert list(step.to_dict()) == list(entry) and step.to_dict() == entry
    step.set_impl("exp2")
    assert "impl_params" not in step.to_dict() and step.to_dict()["impl"] == "exp2"


@pytest.mark.parametrize("text,family,number,iterations,degree", [
    ("limit8", "limit", 8, 8, None),
    ("newton4", "newton", 4, 4, None),
    ("chebyshev24", "chebyshev", 24, None, 24),
    ("fit6", "fit", 6, None, 6),
    ("chebyshev", "chebyshev", None, None, None),
    ("exp2", "exp2", None, None, None),  # a name that ends in a digit, not exp with 2
    ("exact", "exact", None, None, None),
    ("newton_rsqrt", "newton_rsqrt", None, None, None),
    ("client-share", "client-share", None, None, None),
])
def test_impl_parses_and_prints_back(text, family, number, iterations, degree):
    impl = Impl.parse(text, "op")
    assert (impl.family, impl.number, impl.iterations, impl.degree) == (family, number, iterations, degree)
    assert str(impl) == impl.name == text and Impl.parse(str(impl), "op") == impl


def test_impl_refuses_what_is_not_a_name_and_checks_its_family():
    for bad in ("", "limit8+newton4", "8limit", "a b", None):
        with pytest.raises(ValueError):
            Impl.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown exp implementation 'newton4'"):
        Impl.parse("newton4").numbered("limit", "exp implementation")
    assert split_numbered("recip3", ("exp", "recip", "norm")) == ("recip", 3)
    assert split_numbered("recip", ("exp", "recip", "norm")) == ("recip", None)
