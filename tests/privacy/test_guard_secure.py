"""The secure guard against its float64 oracle (siguard.privacy.memguard.guard_reference), end to end.

A small real scenario on scikit-learn's digits: an overfitted target MLP, a defender trained on
the owner's members against the owner's reference non-members, the guard compiled into the plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siguard.compiler.plan import Plan
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.privacy.datasets import FASHION_MNIST_DIR, load_dataset
from siguard.privacy.defender import DefenderWeights, export_defender, to_probabilities, train_defender
from siguard.privacy.memguard import guard_reference
from siguard.privacy.targets import export_onnx, make_mlp, predict_onnx, train_classifier
from siguard.runtime.local import run_reference, run_threads

ACCEPT_L1 = 2e-3  # a revealed vector this far from softmax(z) carries accepted noise


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Fashion-MNIST (Debian's package) when installed, else digits: 1000 (digits: 400) members, an
    overfitted MLP target, a defender trained on members against the owner's reference non-members,
    and 500 evaluation queries (250 members, 250 outsiders)."""
    d = tmp_path_factory.mktemp("guard")
    name = "fashion-mnist" if FASHION_MNIST_DIR.exists() else "digits"
    data = load_dataset(name)
    n = 1000 if name == "fashion-mnist" else 400
    order = np.random.default_rng(1).permutation(len(data.x))  # data split only
    members, reference, outsiders = order[:n], order[n : 2 * n], order[2 * n : 2 * n + 250]
    torch.manual_seed(0)
    model = train_classifier(make_mlp(data.input_shape, 10), data.x[members], data.y[members], epochs=150)
    target = export_onnx(model, d / "target.onnx", data.input_shape)
    probs_m = to_probabilities(predict_onnx(target, data.x[members]))
    probs_r = to_probabilities(predict_onnx(target, data.x[reference]))
    defender, report = train_defender(probs_m, probs_r, seed=0)
    dpath = export_defender(defender, d / "defender.onnx")
    queries = np.concatenate([members[:250], outsiders])
    x = data.x[queries]
    logits = predict_onnx(target, x)
    return {"dir": d, "target": target, "defender": dpath, "weights": DefenderWeights.from_onnx(dpath), "x": x,
            "logits": logits, "dataset": name, "defender_report": report}


def _plan(s, batch: int, name: str, **guard_config) -> Plan:
    if not (s["dir"] / name / "plan.json").exists():
        res = compile_model(s["target"], CompileOptions(batch=batch, guard=s["defender"], guard_config=guard_config))
        write_plan(res, s["dir"] / name)
    return Plan.load(s["dir"] / name)


def _accepted(revealed: np.ndarray, logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return np.abs(revealed - p).sum(axis=1) > ACCEPT_L1


def test_guarded_plan_reveals_only_the_guarded_vector(scenario):
    plan = _plan(scenario, 2, "plan-small", rounds=2, steps=3)
    assert [o["name"] for o in plan.outputs] == ["guarded_probs"]
    assert [s.op for s in plan.steps].count("guard") == 1
    assert not any(s.op == "softmax" for s in plan.steps)
    guard = next(s for s in plan.steps if s.op == "guard")
    assert guard.impl.name == "memguard-parallel" and guard.cost["rounds"] > 0
    assert {w["name"] for w in plan.doc["weights"]} >= {f"guard.{n}" for n in ("W1", "b1", "W2", "b2", "w3", "b3")}
    ph = guard.cost["phases"]  # the split inspect shows adds up to the step's cost
    assert ph["iterations"] == 3 + 1
    assert ph["once"]["rounds"] + 3 * ph["per_iteration"]["rounds"] + ph["final"]["rounds"] == guard.cost["rounds"]


def test_default_guard_costs_at_most_3000_rounds(scenario):
    plan = _plan(scenario, 1, "plan-default")
    guard = next(s for s in plan.steps if s.op == "guard")
    assert guard.attrs["schedule"] == "parallel"
    assert guard.cost["rounds"] <= 3000, guard.cost


def test_the_plan_carries_public_bounds_that_the_sign_tests_respect(scenario):
    """The guard pass records powers of two bounding the defender's activations; with them every per-step sign
    test runs on 32 bits (38 rounds per step, 1,060 per query), and on the 500 queries no bounded test sees a
    value outside its bound (the fixed-point reference counts them)."""
    from siguard.core.config import GuardConfig
    from siguard.runtime.kernels.guard import secure_guard
    from siguard.runtime.kernels.plain import Clear, PlainEngine
    from siguard.runtime.ring import encode

    guard = next(s for s in _plan(scenario, 1, "plan-default").steps if s.op == "guard")
    cfg = GuardConfig.from_attrs(guard.attrs)
    assert None not in (cfg.h1_bound_bits, cfg.h2_bound_bits, cfg.score_bound_bits)
    ph = guard.cost["phases"]
    assert (ph["once"]["rounds"], ph["per_iteration"]["rounds"], ph["final"]["rounds"]) == (64, 38, 46)
    assert guard.cost["rounds"] == 1060
    w = scenario["weights"]
    e = PlainEngine()
    args = [Clear(encode(a, 16)) for a in (scenario["logits"], w.W1.T, w.b1, w.W2.T, w.b2, w.w3.T, w.b3)]
    secure_guard(e, *args, config=cfg)
    assert e.bound_violations == 0
    assert e.bound_peak <= 0.51, e.bound_peak  # measured 0.5001: the direction test's hinge term, the rest < 0.05


@pytest.mark.parametrize("schedule,options", [("parallel", {}), ("parallel", {"release_bits": 0}),
                                              pytest.param("freeze", {}, marks=pytest.mark.slow),
                                              pytest.param("paper", {}, marks=pytest.mark.slow)],
                         ids=["parallel", "parallel-full-precision", "freeze", "paper"])
def test_fixed_point_guard_agrees_with_float_reference(scenario, schedule, options):
    """500 queries: labels kept for every query; the default's released vectors (rounded to multiples of 2^-7) are
    the oracle's exactly, and at full precision the noise decisions agree and the vectors are close."""
    from siguard.core.config import GuardConfig

    x, logits = scenario["x"], scenario["logits"]
    plan = _plan(scenario, len(x), f"plan-{schedule}-{len(options)}", schedule=schedule, **options)
    guard = next(s for s in plan.steps if s.op == "guard")
    cfg = GuardConfig.from_attrs(guard.attrs)
    out = run_reference(plan, x).output
    ref = guard_reference(logits, scenario["weights"], **cfg.oracle_options())
    assert len(x) >= 500
    assert ref.accepted.mean() >= 0.3, "the scenario must exercise acceptance"
    assert (out.argmax(1) == logits.argmax(1)).all(), "the guard changed a label"
    assert np.allclose(out.sum(1), 1.0, atol=5e-3)
    if cfg.release_bits:
        # measured on Fashion-MNIST: 500 of 500 identical (and 2,000 of 2,000 on each of two other targets)
        same = (np.abs(out - ref.guarded).max(1) < 1e-9).mean()
        assert same >= 0.98, same
        assert np.array_equal(out * 2**cfg.release_bits, np.round(out * 2**cfg.release_bits))
        return
    noised, ref_noised = _accepted(out, logits), _accepted(ref.guarded, logits)
    agree = (noised == ref_noised).mean()
    # measured on Fashion-MNIST: parallel 0.998, freeze and paper 0.984
    assert agree >= (0.98 if schedule == "parallel" else 0.95), agree
    both = noised & ref_noised
    # where both accepted, the revealed vectors are close to the oracle's
    assert np.median(np.abs(out[both] - ref.guarded[both]).sum(1)) < (1e-3 if schedule == "parallel" else 0.05)


#: Secure and reference runs differ by the secure truncation's +-1 ulp (floor or floor - 1, at random); a released
#: vector (rounded to multiples of 2^-7) changes only when that moves a test across its threshold on the way to the
#: query's first success, or a probability across a grid point. Measured by giving the reference engine the same
#: random -1/0 error (benchmarks/guard_flip_rate.py --queries 500 --seeds 1 2 3 4): 1, 0, 1, 0 released vectors of
#: 500 changed (before the rounding: 0 and 1 noise decisions of 200); FLIPS_PER_QUERY = 0.01 is a generous bound.
#: With it the chance of more than MAX_FLIPS flips in QUERIES queries is below 2e-6 (binomial tail, checked below),
#: so one unlucky draw does not fail the suite, while a protocol error (a wrong share, a misaligned candidate) flips
#: tens.
QUERIES = 100
FLIPS_PER_QUERY = 0.01
MAX_FLIPS = 8


def test_secure_guard_agrees_with_fixed_point_reference_and_its_cost(scenario):
    """Three parties (lockstep) on 100 queries: labels kept, the reference's released vectors exactly up to the
    truncation's flips, and the guard's rounds and bytes as the plan says."""
    from math import comb

    tail = sum(comb(QUERIES, j) * FLIPS_PER_QUERY**j * (1 - FLIPS_PER_QUERY) ** (QUERIES - j)
               for j in range(MAX_FLIPS + 1, QUERIES + 1))
    assert tail < 2e-6
    x, logits = scenario["x"][:QUERIES], scenario["logits"][:QUERIES]
    plan = _plan(scenario, len(x), "plan-secure")
    run = run_threads(plan, x, timeout=600, scheduler="lockstep")
    secure, ref = run.output, run_reference(plan, x).output
    assert (secure.argmax(1) == logits.argmax(1)).all()
    flips = int((np.abs(secure - ref).max(1) > 1e-9).sum())  # both on the 2^-7 grid: equal or a step apart
    assert flips <= MAX_FLIPS, flips
    guard = next(s for s in plan.steps if s.op == "guard")
    measured = next(r for r in run.stats["steps"] if r["name"] == guard.name)
    assert measured["rounds"] == guard.cost["rounds"]
    assert measured["bytes_per_party"] == guard.cost["bytes_per_party"]


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_messages_do_not_depend_on_acceptance(scenario, scheduler):
    """A query that gets noise at once and a query that never does send identical message sizes and counts."""
    from siguard.core.config import GuardConfig

    cfg = {"rounds": 2, "steps": 4, "lr": 0.5}
    x, logits = scenario["x"], scenario["logits"]
    ref = guard_reference(logits, scenario["weights"], **GuardConfig.for_schedule(**cfg).oracle_options())
    fixed = run_reference(_plan(scenario, len(x), "plan-all", **cfg), x).output
    l1 = np.abs(fixed - ref.plain).sum(1)
    early = np.flatnonzero(ref.accepted & (ref.accept_round == 1) & (ref.accept_step <= 2) & (l1 > 0.01))
    never = np.flatnonzero(~ref.accepted & (l1 < 1e-3))
    if len(early) == 0 or len(never) == 0:
        pytest.fail(f"scenario lacks an early ({len(early)}) or a never ({len(never)}) accepted query")
    plan = _plan(scenario, 1, "plan-one", **cfg)
    runs = [run_threads(plan, x[i : i + 1], timeout=300, scheduler=scheduler) for i in (early[0], never[0])]
    assert _accepted(runs[0].output, logits[early[0] : early[0] + 1])[0]
    assert not _accepted(runs[1].output, logits[never[0] : never[0] + 1])[0]
    views = [[(s["name"], s["rounds"], s["bytes_per_party"], s["received_per_party"]) for s in r.stats["steps"]]
             for r in runs]
    assert views[0] == views[1]


def test_every_server_rehearses_a_guarded_session_alone(scenario, monkeypatch):
    """A server's warm-up (runtime/net/warmup.py) runs the guard too -- its forks and merged rounds -- on a
    transport that sends nothing, to the end, touching only the warm-up session's randomness."""
    from tests.net.test_warmup import check_rehearsal

    check_rehearsal(_plan(scenario, 1, "plan-default"), monkeypatch)
