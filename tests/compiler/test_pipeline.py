"""compile -> plan -> fixed-point reference executor, against onnxruntime on real digits inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.compiler.report import inspect_json, render
from siguard.core.errors import PlanError
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.local import run_reference
from tests.conftest import ort_run


def _compile(path, tmp_path, batch):
    res = compile_model(path, CompileOptions(batch=batch))
    write_plan(res, tmp_path / "plan")
    return Plan.load(tmp_path / "plan")


@pytest.mark.parametrize("model", ["mlp_onnx", "cnn_onnx"])
def test_reference_matches_onnxruntime_on_digits(model, request, digits, tmp_path):
    path = request.getfixturevalue(model)
    _, _, x_test, _ = digits
    x = x_test[:300]
    if model == "cnn_onnx":
        x = x.reshape(-1, 1, 8, 8)
    plan = _compile(path, tmp_path, batch=len(x))
    got = run_reference(plan, x).output
    want = ort_run(path, x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-2
    agree = (got.argmax(1) == want.argmax(1)).mean()
    assert agree >= 0.995, agree


def test_plan_round_trip_and_weights_are_separate(mlp_onnx, tmp_path):
    plan = _compile(mlp_onnx, tmp_path, batch=1)
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    # no weight values in the public plan
    assert all(w["name"] not in doc["constants"] for w in doc["weights"])
    assert doc["weights"], "a trained MLP has secret weights"
    weights = plan.load_weights()
    assert set(weights) == {w["name"] for w in doc["weights"]}


def test_tampered_plan_is_refused(mlp_onnx, tmp_path):
    _compile(mlp_onnx, tmp_path, batch=1)
    p = tmp_path / "plan" / "plan.json"
    doc = json.loads(p.read_text())
    doc["frac_bits"] = 12
    p.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="hash mismatch"):
        Plan.load(tmp_path / "plan")


def test_wrong_version_is_refused(mlp_onnx, tmp_path):
    _compile(mlp_onnx, tmp_path, batch=1)
    p = tmp_path / "plan" / "plan.json"
    doc = json.loads(p.read_text())
    doc["version"] = 99
    p.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="version 99"):
        Plan.load(tmp_path / "plan")


def test_a_guarded_plan_of_the_previous_protocol_is_refused_an_unguarded_one_loads(mlp_onnx, tmp_path):
    """Protocols v2 and v3 changed the guard's messages and costs only: a v1 or v2 plan with a guard step must be
    recompiled (one clear error), one without a guard still runs."""
    from siguard.compiler.plan import PROTOCOL_VERSION, compute_hash

    _compile(mlp_onnx, tmp_path, batch=1)
    p = tmp_path / "plan" / "plan.json"
    doc = json.loads(p.read_text())
    assert doc["protocol_version"] == PROTOCOL_VERSION == 3
    for old in (1, 2):
        doc["protocol_version"] = old
        doc["steps"][-1]["op"] = "reveal"
        doc["plan_hash"] = compute_hash(doc)
        Plan.validate(doc)  # unguarded: the protocols it uses did not change
        doc["steps"][-1]["op"] = "guard"  # as if the last step were the guard (the version check comes first)
        doc["plan_hash"] = compute_hash(doc)
        refused = rf"v{old}, this SIGuard runs v3 \(the guard's protocol changed\): recompile"
        with pytest.raises(PlanError, match=refused):
            Plan.validate(doc)
    doc["protocol_version"] = 7
    doc["steps"][-1]["op"] = "reveal"
    doc["plan_hash"] = compute_hash(doc)
    with pytest.raises(PlanError, match="v7, this SIGuard runs v3: recompile"):
        Plan.validate(doc)


def test_weights_of_another_plan_are_refused(mlp_onnx, cnn_onnx, tmp_path):
    a = _compile(mlp_onnx, tmp_path / "a", batch=1)
    _compile(mlp_onnx, tmp_path / "b", batch=2)
    with pytest.raises(PlanError, match="belong to plan"):
        a.load_weights(tmp_path / "b" / "plan" / "weights.npz")


def test_inspect_all_formats_on_resnet18(resnet18_onnx, tmp_path):
    plan = _compile(resnet18_onnx, tmp_path, batch=1)
    j = inspect_json(plan)
    for key in ("plan_hash", "protocol", "frac_bits", "inputs", "outputs", "steps", "totals"):
        assert key in j
    assert j["totals"]["rounds"] == sum(s["rounds"] for s in j["steps"])
    assert j["totals"]["bytes"] == sum(s["bytes"] for s in j["steps"])
    assert all({"name", "op", "impl", "rounds", "bytes"} <= set(s) for s in j["steps"])
    assert sum(s["op"] == "conv" for s in j["steps"]) == 20  # 17 3x3 convs + 3 shortcut 1x1 convs
    text = render(plan, "text")
    assert "TOTAL" in text and str(plan.totals["rounds"]) in text
    html = render(plan, "html")
    assert html.startswith("<!doctype html>") and f"{plan.totals['rounds']} rounds" in html
    dot = render(plan, "dot")
    assert dot.startswith("digraph") and dot.count("->") >= len(plan.steps) - 2
