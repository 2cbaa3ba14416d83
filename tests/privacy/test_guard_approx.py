"""The guard's internal approximations against CrypTen's defaults (issue: calibrated approximation pass):
the same guard algorithm with CrypTen's exp/reciprocal/inverse-square-root costs at least 30 % more rounds,
and both keep every label of held-out queries. These are the sequential schedule's internals (``freeze``); the
default parallel schedule has no per-step approximation (its sign steps need neither exp nor a normaliser)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("mode", ["crypten", "auto"])
def test_guard_keeps_labels_with_either_internals(world, tmp_path, mode):
    from siguard.compiler.plan import Plan
    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from siguard.runtime.local import run_reference
    from tests.conftest import ort_run

    data = world["data"]
    x = data.x[world["non"]][:64]  # held out: never seen by the target or the defender
    res = compile_model(world["onnx"], CompileOptions(batch=len(x), guard=world["dir"] / "defender.onnx",
                                                      approx=mode, guard_config={"schedule": "freeze"}))
    plan = Plan.load(write_plan(res, tmp_path / mode))
    guard = next(s for s in plan.steps if s.op == "guard")
    assert guard.attrs.get("internals", "siguard") == ("crypten" if mode == "crypten" else "siguard")
    y = run_reference(plan, x).output
    z = ort_run(world["onnx"], x)
    assert (y.argmax(1) == z.argmax(1)).mean() >= 0.995
    assert np.allclose(y.sum(1), 1, atol=1e-3)


def test_siguard_guard_needs_30_percent_fewer_rounds_than_crypten_defaults(world):
    from siguard.pipeline import CompileOptions, compile_model

    rounds = {}
    for mode in ("crypten", "auto"):
        res = compile_model(world["onnx"], CompileOptions(batch=8, guard=world["dir"] / "defender.onnx", approx=mode,
                                                          guard_config={"schedule": "freeze"}))
        rounds[mode] = res.plan.totals["rounds"]
    assert rounds["auto"] <= 0.7 * rounds["crypten"], rounds
