"""Calibration and the approximation pass: ranges against onnxruntime, the per-node choice against
CrypTen's defaults on held-out data, modes, overrides and what inspect shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.compiler.report import inspect_json, render
from siguard.core.config import AccuracyBudget, parse_budget, parse_overrides
from siguard.core.errors import InputError
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.local import run_reference
from tests.conftest import ort_run

N_CAL = 256


@pytest.fixture(scope="module")
def softmax_models(tmp_path_factory):
    """The digits MLP and CNN of tests/models.py with a softmax head, exported to ONNX."""
    import torch
    from torch import nn

    from tests.models import export, train_digits_cnn, train_digits_mlp

    d = tmp_path_factory.mktemp("approx")
    mlp = export(nn.Sequential(train_digits_mlp(), nn.Softmax(dim=1)), d / "mlp_softmax.onnx", torch.zeros(1, 64),
                 opset=17, dynamic_batch=True)
    cnn = export(nn.Sequential(train_digits_cnn(), nn.Softmax(dim=1)), d / "cnn_softmax.onnx",
                 torch.zeros(1, 1, 8, 8), opset=13, dynamic_batch=True, fold_constants=False)
    return {"mlp": mlp, "cnn": cnn}


def _data(digits, kind):
    x_train, _, x_test, _ = digits
    if kind == "cnn":
        return x_train[:N_CAL].reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    return x_train[:N_CAL], x_test


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_calibrated_choice_cuts_rounds_vs_crypten_and_keeps_top1_on_held_out_data(kind, softmax_models, digits):
    path = softmax_models[kind]
    cal, held_out = _data(digits, kind)
    want = ort_run(path, held_out)
    crypten = compile_model(path, CompileOptions(batch=len(held_out), calibration=cal, approx="crypten"))
    auto = compile_model(path, CompileOptions(batch=len(held_out), calibration=cal))
    r_crypten, r_auto = crypten.plan.totals["rounds"], auto.plan.totals["rounds"]
    assert r_auto <= 0.7 * r_crypten, (r_auto, r_crypten)
    got = run_reference(auto.plan, held_out, auto.weights).output
    top1 = (got.argmax(1) == want.argmax(1)).mean()
    assert top1 >= 0.995, top1
    assert np.abs(got - want).max() <= 2e-2  # the budget (1e-2) is enforced on calibration data only
    # the CrypTen configuration is itself accurate: the saving is not bought by a broken baseline
    base = run_reference(crypten.plan, held_out, crypten.weights).output
    assert (base.argmax(1) == want.argmax(1)).mean() >= 0.995


def test_budget_holds_on_the_calibration_data(softmax_models, digits):
    path = softmax_models["mlp"]
    cal, _ = _data(digits, "mlp")
    res = compile_model(path, CompileOptions(batch=len(cal), calibration=cal, accuracy_budget="top1=0.995,prob=0.01"))
    got = run_reference(res.plan, cal, res.weights).output
    want = ort_run(path, cal)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.995
    assert np.abs(got - want).max() <= 1e-2
    measured = res.plan.doc["approximation"]["measured"]
    assert measured["top1"] >= 0.995 and measured["max_abs"] <= 1e-2


def test_a_tighter_budget_costs_more_rounds(softmax_models, digits):
    path = softmax_models["mlp"]
    cal, _ = _data(digits, "mlp")
    loose = compile_model(path, CompileOptions(calibration=cal, accuracy_budget="prob=0.02"))
    tight = compile_model(path, CompileOptions(calibration=cal, accuracy_budget="prob=0.0005"))
    assert tight.plan.totals["rounds"] > loose.plan.totals["rounds"]


def test_calibrated_ranges_match_onnxruntime(softmax_models, digits):
    import torch

    from tests.models import train_digits_mlp

    path = softmax_models["mlp"]
    cal, _ = _data(digits, "mlp")
    res = compile_model(path, CompileOptions(calibration=cal))
    with torch.no_grad():
        logits = train_digits_mlp()(torch.from_numpy(cal)).numpy()
    (softmax,) = [n for n in res.graph.nodes if n.op == "softmax"]
    lo, hi = res.graph.values[softmax.inputs[0]].range
    assert lo == pytest.approx(logits.min(), abs=1e-4) and hi == pytest.approx(logits.max(), abs=1e-4)
    probs = ort_run(path, cal)
    assert res.plan.values[res.graph.outputs[0]]["range"] == pytest.approx([probs.min(), probs.max()], abs=1e-6)


def test_without_calibration_defaults_are_kept_with_a_warning(softmax_models):
    res = compile_model(softmax_models["mlp"], CompileOptions())
    assert any("no calibration data" in w and "default" in w for w in res.warnings)
    steps = {s.op: s for s in res.plan.steps if s.approx}
    assert steps["softmax"]["impl"] == "exp2" and steps["softmax"]["approx"]["how"] == "default"


def test_exact_mode_takes_the_most_accurate_everywhere(softmax_models, digits):
    cal, _ = _data(digits, "mlp")
    res = compile_model(softmax_models["mlp"], CompileOptions(calibration=cal, approx="exact"))
    recs = [s.approx for s in res.plan.steps if s.approx]
    assert recs and all(r["impl"] == r["most_accurate"]["impl"] and r["how"] == "exact" for r in recs)
    assert all(r["cost"] == {k: r["most_accurate"][k] for k in ("rounds", "bytes")} for r in recs)


def test_override_wins_and_shows_in_every_inspect_format(softmax_models, digits, tmp_path):
    cal, _ = _data(digits, "mlp")
    opts = CompileOptions(calibration=cal, overrides={"1_Softmax": "limit8+newton4"})
    res = compile_model(softmax_models["mlp"], opts)
    write_plan(res, tmp_path / "plan")
    plan = Plan.load(tmp_path / "plan")
    (step,) = [s for s in plan.steps if s.name == "1_Softmax"]
    assert step.impl.name == "max_exp_recip"
    assert step.impl_params["exp_impl"] == "limit8" and step.impl_params["iterations"] == 4
    assert step.approx["how"] == "override" and step.approx["impl"] == "limit8+newton4"
    j = inspect_json(plan)
    (js,) = [s for s in j["steps"] if s["name"] == "1_Softmax"]
    assert js["approx"]["impl"] == "limit8+newton4"
    assert js["approx"]["cost"]["rounds"] == step.cost["rounds"]
    assert js["approx"]["most_accurate"]["impl"] == "exp2"
    for fmt in ("text", "html", "dot"):
        out = render(plan, fmt)
        assert "limit8+newton4" in out and "override" in out, fmt
    # the overridden plan runs, and its output is a softmax close to onnxruntime's
    got = run_reference(plan, cal[:1]).output
    assert np.abs(got - ort_run(softmax_models["mlp"], cal[:1])).max() <= 1e-2
    json.dumps(j)


def test_registered_implementation_name_is_a_valid_override(softmax_models, digits):
    cal, _ = _data(digits, "mlp")
    res = compile_model(softmax_models["mlp"], CompileOptions(calibration=cal, overrides={"1_Softmax": "piranha"}))
    (step,) = [s for s in res.plan.steps if s.name == "1_Softmax"]
    assert step.impl.name == "piranha" and step.approx["how"] == "override"


@pytest.mark.parametrize("overrides,match", [({"nosuch": "exact"}, "no nonlinear node named 'nosuch'"),
                                             ({"1_Softmax": "bogus"}, "no implementation 'bogus'")])
def test_bad_overrides_are_input_errors_naming_them(softmax_models, overrides, match):
    with pytest.raises(InputError, match=match):
        compile_model(softmax_models["mlp"], CompileOptions(overrides=overrides))


def test_cli_flags_and_one_line_errors(softmax_models, digits, tmp_path, capsys):
    from siguard.cli import main

    cal, _ = _data(digits, "mlp")
    np.save(tmp_path / "cal.npy", cal)
    rc = main(["compile", str(softmax_models["mlp"]), "-o", str(tmp_path / "p"), "--calibration",
               str(tmp_path / "cal.npy"), "--accuracy-budget", "top1=0.99,prob=0.02", "--objective", "bytes",
               "--approx", "0_0.1_Relu=exact"])
    assert rc == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["approximation"]["objective"] == "bytes" and doc["approximation"]["budget"]["prob"] == 0.02
    capsys.readouterr()
    assert main(["compile", str(softmax_models["mlp"]), "-o", str(tmp_path / "q"), "--approx", "1_Softmax=nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["compile", str(softmax_models["mlp"]), "-o", str(tmp_path / "q"), "--calibration",
                 str(tmp_path / "missing.npy")]) != 0
    assert main(["compile", str(softmax_models["mlp"]), "-o", str(tmp_path / "q"), "--accuracy-budget", "x=1"]) != 0


def test_bytes_objective_never_costs_more_bytes_than_the_most_accurate(softmax_models, digits):
    cal, _ = _data(digits, "mlp")
    res = compile_model(softmax_models["mlp"], CompileOptions(calibration=cal, objective="bytes"))
    for s in res.plan.steps:
        if s.approx:
            assert s.approx["cost"]["bytes"] <= s.approx["most_accurate"]["bytes"]


def test_calibration_data_of_the_wrong_shape_is_refused(softmax_models):
    with pytest.raises(InputError, match="calibration data has shape"):
        compile_model(softmax_models["mlp"], CompileOptions(calibration=np.zeros((4, 63), np.float32)))
    with pytest.raises(InputError, match="NaN"):
        compile_model(softmax_models["mlp"], CompileOptions(calibration=np.full((4, 64), np.nan, np.float32)))


def test_parse_budget_and_overrides():
    assert parse_budget(None) == AccuracyBudget()
    assert parse_budget("top1=0.99,prob=0.05") == AccuracyBudget(0.99, 0.05)
    assert parse_budget("abs=0.001") == AccuracyBudget(0.995, 0.001)
    assert parse_budget("0.98") == AccuracyBudget(0.98, 0.01)
    for bad in ("top1=2", "prob=0", "top1=x", "speed=1"):
        with pytest.raises(InputError):
            parse_budget(bad)
    assert parse_overrides(["exact", "a=b", "c=fit8"]) == ("exact", {"a": "b", "c": "fit8"})
    for bad in (["fast"], ["=x"], ["a="]):
        with pytest.raises(InputError):
            parse_overrides(bad)


# ---- the guard's internal approximations ------------------------------------------------------------
@pytest.fixture(scope="module")
def guard_scenario(tmp_path_factory):
    """digits: an MLP target trained on 400 members, a defender against 400 reference non-members."""
    import torch

    from siguard.privacy.datasets import load_dataset
    from siguard.privacy.defender import export_defender, to_probabilities, train_defender
    from siguard.privacy.targets import export_onnx, make_mlp, predict_onnx, train_classifier

    d = tmp_path_factory.mktemp("guard_approx")
    data = load_dataset("digits")
    order = np.random.default_rng(1).permutation(len(data.x))  # data split only
    members, reference, others = order[:400], order[400:800], order[800:]
    torch.manual_seed(0)
    model = train_classifier(make_mlp(data.input_shape, 10), data.x[members], data.y[members], epochs=150)
    target = export_onnx(model, d / "target.onnx", data.input_shape)
    defender, _ = train_defender(to_probabilities(predict_onnx(target, data.x[members])),
                                 to_probabilities(predict_onnx(target, data.x[reference])), seed=0)
    dpath = export_defender(defender, d / "defender.onnx")
    cal = np.concatenate([data.x[members[:8]], data.x[others[:8]]])
    return {"target": target, "defender": dpath, "cal": cal}


def test_parse_guard_label_round_trips():
    from siguard.passes.candidates import guard_label, parse_guard_label

    knobs = {"exp_degree": 3, "recip_degree": 4, "norm_iterations": 1}
    assert parse_guard_label(guard_label(knobs)) == knobs
    for bad in ("exp3,recip4", "exp1,recip4,norm1", "fast"):
        with pytest.raises(InputError):
            parse_guard_label(bad)


def test_guard_knobs_override_and_search(guard_scenario):
    """The knobs of the sequential schedules' internals (the parallel default has none: its sign steps need
    neither exp nor a normaliser, test below)."""
    s = guard_scenario
    seq = {"schedule": "freeze"}
    base = compile_model(s["target"], CompileOptions(guard=s["defender"], guard_config=seq))
    low = compile_model(s["target"], CompileOptions(guard=s["defender"], overrides={"guard": "exp2,recip2,norm0"},
                                                    guard_config=seq))
    (g0,) = [st for st in base.plan.steps if st.op == "guard"]
    (g1,) = [st for st in low.plan.steps if st.op == "guard"]
    assert g0.approx["impl"] == "exp4,recip4,norm2" and g0.approx["how"] == "default"
    assert (g1.attrs["exp_degree"], g1.attrs["recip_degree"], g1.attrs["norm_iterations"]) == (2, 2, 0)
    assert g1.approx["how"] == "override" and g1.cost["rounds"] < g0.cost["rounds"]
    assert g1.approx["most_accurate"]["rounds"] == g0.cost["rounds"]
    assert "exp2,recip2,norm0" in render(low.plan, "text")
    # the search runs the fixed-point guard against the float oracle on the calibration logits
    found = compile_model(s["target"], CompileOptions(guard=s["defender"], calibration=s["cal"], guard_config=seq))
    (g2,) = [st for st in found.plan.steps if st.op == "guard"]
    a = g2.approx
    assert a["how"] == "search" and a["error"]["labels_kept"] == 1.0
    assert a["cost"]["rounds"] <= a["most_accurate"]["rounds"]
    assert (g2.attrs["exp_degree"], g2.attrs["recip_degree"], g2.attrs["norm_iterations"]) == tuple(
        int(p[len(k):]) for p, k in zip(a["impl"].split(","), ("exp", "recip", "norm"), strict=True))


def test_the_parallel_guard_has_no_internal_approximation(guard_scenario):
    s = guard_scenario
    plan = compile_model(s["target"], CompileOptions(guard=s["defender"], calibration=s["cal"])).plan
    (g,) = [st for st in plan.steps if st.op == "guard"]
    assert g.attrs["schedule"] == "parallel" and g.approx["impl"] == "sign-steps"
    assert g.approx["cost"]["rounds"] == g.cost["rounds"] and g.approx["candidates"] == 0
