"""Secure execution of compiled plans (three parties as threads) against the reference and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.local import run_reference, run_threads
from tests.conftest import ort_run


def _plan(path, tmp_path, batch: int) -> Plan:
    res = compile_model(path, CompileOptions(batch=batch))
    write_plan(res, tmp_path / "plan")
    return Plan.load(tmp_path / "plan")


@pytest.fixture(scope="module")
def digits_runs(mlp_onnx, cnn_onnx, digits, tmp_path_factory):
    """Secure and reference runs of the MLP and the CNN on 200 real held-out digits."""
    _, _, x_test, y_test = digits
    x = x_test[:200]
    out = {}
    for name, path, xs in (("mlp", mlp_onnx, x), ("cnn", cnn_onnx, x.reshape(-1, 1, 8, 8))):
        plan = _plan(path, tmp_path_factory.mktemp(name), batch=len(xs))
        out[name] = {
            "plan": plan,
            "secure": run_threads(plan, xs),
            "reference": run_reference(plan, xs).output,
            "ort": ort_run(path, xs),
        }
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_secure_matches_reference_within_truncation_error(digits_runs, name):
    r = digits_runs[name]
    diff = np.abs(r["secure"].output - r["reference"]).max()
    # each secure truncation differs from the reference's floor by at most 1 ulp = 2^-16;
    # through a few layers this stays far below 1e-2 (measured ~1e-4)
    assert diff <= 2e-3, diff


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_secure_top1_agrees_with_onnxruntime(digits_runs, name):
    r = digits_runs[name]
    agree = (r["secure"].output.argmax(1) == r["ort"].argmax(1)).mean()
    assert agree >= 0.995, agree
    assert np.abs(r["secure"].output - r["ort"]).max() <= 2e-2


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_counted_rounds_and_bytes_equal_the_cost_model(digits_runs, name):
    r = digits_runs[name]
    plan, stats = r["plan"], r["secure"].stats
    measured = {s["name"]: s for s in stats["steps"]}
    for step in plan.steps:
        want = step.cost
        got = measured.get(step.name, {"rounds": 0, "bytes_per_party": [0, 0, 0]})
        assert got["rounds"] == want["rounds"], step.name
        assert got["bytes_per_party"] == want["bytes_per_party"], step.name
    assert stats["totals"]["rounds"] == plan.totals["rounds"]
    assert stats["totals"]["bytes_per_party"] == plan.totals["bytes_per_party"]
    setup = [s for s in stats["steps"] if s["name"] == "setup:weights"]
    assert setup and setup[0]["bytes_per_party"] == plan.doc["setup"]["bytes_per_party"]


def test_only_the_client_receives_the_output(digits_runs):
    stats = digits_runs["mlp"]["secure"].stats
    reveal = [s for s in stats["steps"] if s["name"].startswith("reveal:")]
    assert reveal
    for s in reveal:
        assert s["received_per_party"][:3] == [0, 0, 0]  # no server receives anything
        assert s["received_per_party"][3] == sum(s["bytes_per_party"]) > 0


def test_resnet18_runs_end_to_end(resnet18_onnx, tmp_path):
    plan = _plan(resnet18_onnx, tmp_path, batch=1)
    # every ReLU reads an untruncated product: 9 directly, 8 through a residual add (fused truncations)
    relus = [s for s in plan.steps if s.op == "relu"]
    assert len(relus) == 17 and all(s.attrs.get("shift") == 16 for s in relus)
    assert sum(1 for s in plan.steps if s.op == "add" and s.attrs.get("shift_b") == 16) == 8
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    run = run_threads(plan, x, timeout=300)
    want = ort_run(resnet18_onnx, x)
    assert np.abs(run.output - want).max() <= 0.05
    # the merged rounds of the fused ReLUs are what the plan's cost model says, step by step
    measured = {s["name"]: s for s in run.stats["steps"]}
    for step in plan.steps:
        got = measured.get(step.name, {"rounds": 0, "bytes_per_party": [0, 0, 0]})
        assert got["rounds"] == step.cost["rounds"], step.name
        assert got["bytes_per_party"] == step.cost["bytes_per_party"], step.name
