"""The lockstep scheduler (all parties as greenlets in one thread): same outputs and statistics as threads,
deadlocks reported at once (a failing party or client: tests/runtime/test_rss.py, in both schedulers),
and the ``lockstep`` mode of the CLI and the Python API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.local import run_reference
from siguard.runtime.local import run_threads as run_plan
from siguard.runtime.mpc.inprocess import SCHEDULERS, PartyFailure, run_threads

ROOT = Path(__file__).resolve().parents[2]
BATCH = 8


@pytest.fixture(scope="module")
def mlp_plan(mlp_onnx, tmp_path_factory) -> Plan:
    d = tmp_path_factory.mktemp("lockstep") / "plan"
    write_plan(compile_model(mlp_onnx, CompileOptions(batch=BATCH)), d)
    return Plan.load(d)


@pytest.fixture(scope="module")
def x(digits) -> np.ndarray:
    return digits[2][:BATCH].astype(np.float32)


@pytest.fixture(scope="module")
def runs(mlp_plan, x):
    return {s: run_plan(mlp_plan, x, timeout=30, scheduler=s) for s in SCHEDULERS}


def _comm(stats: dict) -> list[dict]:
    """The per-step communication rows without the (scheduler-dependent) wall times."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in stats["steps"]]


def test_lockstep_matches_the_reference_as_threads_does(runs, mlp_plan, x):
    ref = run_reference(mlp_plan, x).output
    for s in SCHEDULERS:
        diff = np.abs(runs[s].output - ref).max()
        assert diff <= 2e-3, (s, diff)  # the tolerance of tests/runtime/test_secure_plans.py
    assert (runs["lockstep"].output.argmax(1) == ref.argmax(1)).all()


def test_lockstep_counts_the_same_rounds_and_bytes_as_threads(runs, mlp_plan):
    threads, lockstep = runs["threads"].stats, runs["lockstep"].stats
    assert _comm(lockstep) == _comm(threads)
    assert lockstep["totals"] == threads["totals"] and lockstep["setup"] == threads["setup"]
    assert lockstep["totals"]["rounds"] == mlp_plan.totals["rounds"]
    assert set(lockstep["step_seconds"]) == set(threads["step_seconds"])


def test_lockstep_repeated_queries(mlp_plan, x, runs):
    r = run_plan(mlp_plan, x, timeout=30, queries=2, scheduler="lockstep")
    assert len(r.stats["query_seconds_all"]) == 2
    assert _comm(r.stats) == _comm(runs["threads"].stats)  # the last query's counts, setup kept


def test_a_deadlock_is_reported_at_once_naming_who_waits_for_whom():
    def party(e):  # every server waits for its next peer; nobody sends
        return e.transport.exchange({}, {(e.party + 1) % 3: (1,)})

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match="deadlock") as info:
        run_threads(party, timeout=20, scheduler="lockstep")
    assert time.monotonic() - t0 < 1.0  # not the 20 s timeout
    msg = str(info.value)
    for p in range(3):
        assert f"party {p} waits for party {(p + 1) % 3}" in msg, msg


def test_unknown_scheduler_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler 'greenlets'"):
        run_threads(lambda e: None, scheduler="greenlets")


def test_every_front_end_offers_lockstep():
    import siguard.api
    import siguard.privacy.audit
    from siguard.cli import build_parser

    assert "lockstep" in siguard.api.MODES and "lockstep" in siguard.privacy.audit.MODES
    parser = build_parser()
    assert parser.parse_args(["run", "p", "--input", "x.npy", "--mode", "lockstep"]).mode == "lockstep"
    assert parser.parse_args(["run", "p", "--input", "x.npy"]).mode == "threads"  # the default stays
    assert parser.parse_args(["demo", "--mode", "lockstep"]).mode == "lockstep"
    assert parser.parse_args(["demo"]).mode == "threads"
    audit = ["audit", "m.onnx", "--plan", "p", "--guarded-plan", "g", "--members", "a.npz", "--nonmembers",
             "b.npz", "--shadow", "c.npz"]
    assert parser.parse_args([*audit, "--mode", "lockstep"]).mode == "lockstep"
    assert parser.parse_args(audit).mode == "threads"


def test_audit_schema_accepts_every_audit_mode():
    """audit.json records ``mode``; the audit validates its document, so every mode must be in the schema."""
    import json

    import siguard.privacy.audit

    schema = json.loads((ROOT / "privacy" / "schema" / "audit.schema.json").read_text())
    assert set(schema["properties"]["mode"]["enum"]) == set(siguard.privacy.audit.MODES)


def test_python_api_runs_lockstep(mlp_plan, x, runs):
    import siguard

    r = siguard.run(mlp_plan, x, mode="lockstep", timeout=30)
    assert _comm(r.stats) == _comm(runs["threads"].stats)
    assert np.abs(r.output - runs["threads"].output).max() <= 4e-3


def test_cli_run_lockstep(mlp_plan, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-m", "siguard.cli", "run", str(mlp_plan.directory), "--input",
                           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--mode", "lockstep",
                           "--stats"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lockstep: output") and "TOTAL per query" in proc.stdout
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (BATCH, 10)
    assert np.abs(y - run_reference(mlp_plan, x).output).max() <= 2e-3
