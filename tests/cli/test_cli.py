"""The command line: exit codes and one-line messages on bad input, and the happy path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from siguard.compiler.plan import Plan
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[2]


def siguard(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "siguard.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"siguard {args} failed: {proc.stderr}")
    return proc


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("siguard: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def plan_dir(mlp_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "plan"
    siguard("compile", mlp_onnx, "-o", d, "--batch", "4", check=True)
    return d


def _dataflow_edges(plan) -> set[tuple[int, int]]:
    """(producer step index, consumer step index) for every value a step reads from another step."""
    producer = {v: i for i, s in enumerate(plan.steps) for v in s.outputs}
    return {(producer[v], j) for j, s in enumerate(plan.steps) for v in s.inputs if v in producer}


def test_compile_writes_a_plan_directory(plan_dir, mlp_onnx):
    """plan.json validates and describes the model; weights.npz holds exactly the plan's weights (hash-tied);
    the reports on disk are those of this plan (the text report's rows carry each step's rounds)."""
    plan = Plan.load(plan_dir)
    model = onnx.load(str(mlp_onnx))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights = plan.load_weights()
    assert {k: v.shape for k, v in weights.items()} == {w["name"]: tuple(w["shape"]) for w in plan.doc["weights"]}
    assert weights and all(np.isfinite(v).all() for v in weights.values())
    assert sum(v.size for v in weights.values()) == sum(int(np.prod(d)) for d in inits.values())  # all of them
    assert plan.inputs[0]["shape"][0] == 4 and plan.totals["rounds"] == sum(s.cost["rounds"] for s in plan.steps)
    rows = _text_rows((plan_dir / "report.txt").read_text())
    assert rows == {s.name: s.cost["rounds"] for s in plan.steps}
    assert f"plan {plan.plan_hash[:16]}" in (plan_dir / "plan.dot").read_text()


def _text_rows(text: str) -> dict[str, int]:
    """Step name -> rounds from the text report's step table (rows start with the step index)."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*\d+  (\S+) ", line)
        if m:
            rows[m.group(1)] = int(line.split()[-2])
    return rows


@pytest.mark.parametrize("fmt", ["text", "json", "html", "dot"])
def test_inspect_formats(plan_dir, fmt):
    """Each format carries the plan: json the document, text a row per step with its rounds and the total,
    html the steps and the total, dot a node per step and exactly the plan's dataflow edges."""
    plan = Plan.load(plan_dir)
    proc = siguard("inspect", plan_dir, "--format", fmt, check=True)
    out = proc.stdout
    total = plan.totals["rounds"]
    if fmt == "json":
        doc = json.loads(out)
        assert doc["plan_hash"] == plan.plan_hash and doc["totals"]["rounds"] == total
        assert doc["totals"]["rounds"] == sum(s["rounds"] for s in doc["steps"])
    elif fmt == "text":
        assert _text_rows(out) == {s.name: s.cost["rounds"] for s in plan.steps}
        total_line = next(ln for ln in out.splitlines() if "TOTAL (sum of steps)" in ln)
        assert int(total_line.split()[-2]) == total
    elif fmt == "html":
        assert f'<td id="total-rounds">{total} rounds</td>' in out
        assert all(s.name in out for s in plan.steps)
    else:
        nodes = dict(re.findall(r'^  s(\d+) \[label="([^\\"]+)\\n', out, flags=re.M))
        assert {int(k): v for k, v in nodes.items()} == {i: s.name for i, s in enumerate(plan.steps)}
        edges = {(int(a), int(b)) for a, b in re.findall(r"^  s(\d+) -> s(\d+);", out, flags=re.M)}
        assert edges == _dataflow_edges(plan) and edges


def test_run_reference_matches_onnxruntime(plan_dir, mlp_onnx, digits, tmp_path):
    x = digits[2][:4].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    siguard("run", plan_dir, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--mode", "reference",
            check=True)
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - ort_run(mlp_onnx, x)).max() <= 1e-2


_EXIT_SCRIPT = r"""
import atexit, sys, threading, time
from pathlib import Path
from siguard.cli import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
if sys.argv[2] == "thread":  # a non-daemon thread still working: the exit must wait for it
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
sys.stdout.write("no newline, buffered")  # a pipe: block-buffered, so only a flush writes it
sys.stderr.write("to stderr")
exit_now(3)
print("not reached")
"""


@pytest.mark.parametrize("threads", ["none", "thread"])
def test_fast_exit_keeps_what_a_command_relies_on(tmp_path, threads):
    """The command's fast exit (siguard.cli.exit_now, which skips the interpreter's teardown): the exit code,
    everything written to stdout and stderr, the atexit handlers, and non-daemon threads finishing first."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path), threads], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, buffered" and proc.stderr == "to stderr"
    assert (tmp_path / "atexit").read_text() == "ran"
    if threads == "thread":
        assert (tmp_path / "thread").read_text() == "done"


_PAGES_SCRIPT = r"""
import numpy as np
from siguard.cli import small_pages
core = getattr(np, "_core", None) or np.core
print(small_pages(), core.multiarray._set_madvise_hugepage(True))  # (now off?, what it was)
"""


@pytest.mark.parametrize("env, expect", [(None, "True False"), ("1", "False True"), ("0", "True False")])
def test_commands_allocate_without_huge_pages_unless_numpy_is_told(tmp_path, env, expect):
    """main() turns numpy's transparent huge pages off (slow first touches: see siguard.cli.small_pages),
    unless NUMPY_MADVISE_HUGEPAGE gives numpy the user's own choice."""
    import os

    child = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if env is not None:
        child["NUMPY_MADVISE_HUGEPAGE"] = env
    proc = subprocess.run([sys.executable, "-c", _PAGES_SCRIPT], cwd=ROOT, env=child, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expect.split()


def _unsupported_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h1"], name="hard_a"),
        helper.make_node("Relu", ["h1"], ["r"], name="relu_ok"),
        helper.make_node("Hardmax", ["r"], ["h2"], name="hard_b"),
        helper.make_node("Round", ["h2"], ["y"], name="round_c"),
    ]
    g = helper.make_graph(nodes, "bad", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_unsupported_ops_are_listed_whole(tmp_path):
    proc = siguard("compile", _unsupported_model(tmp_path / "bad.onnx"), "-o", tmp_path / "p")
    line = _assert_one_line_error(proc)
    assert "Hardmax" in line and "hard_a" in line and "hard_b" in line
    assert "Round" in line and "round_c" in line
    assert "relu_ok" not in line
    assert "Supported ops:" in line and "Conv" in line


def test_malformed_onnx_file(tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(bytes(range(256)) * 7)
    _assert_one_line_error(siguard("compile", bad, "-o", tmp_path / "p"))


def test_missing_model_file(tmp_path):
    line = _assert_one_line_error(siguard("compile", tmp_path / "nope.onnx", "-o", tmp_path / "p"))
    assert "nope.onnx" in line


def test_tampered_plan_fails_inspect_and_run(plan_dir, tmp_path, digits):
    import shutil

    d = tmp_path / "tampered"
    shutil.copytree(plan_dir, d)
    doc = json.loads((d / "plan.json").read_text())
    doc["steps"][1]["impl"] = "something-else"
    (d / "plan.json").write_text(json.dumps(doc))
    line = _assert_one_line_error(siguard("inspect", d))
    assert "hash mismatch" in line
    np.save(tmp_path / "x.npy", digits[2][:4].astype(np.float32))
    _assert_one_line_error(siguard("run", d, "--input", tmp_path / "x.npy", "--mode", "reference"))


@pytest.mark.parametrize("bad", ["shape", "nan", "dtype"])
def test_bad_inputs_get_one_line(plan_dir, tmp_path, bad):
    x = np.zeros((4, 64), np.float32)
    if bad == "shape":
        x = np.zeros((3, 64), np.float32)
    elif bad == "nan":
        x[1, 3] = np.nan
    else:
        x = np.array([["a"] * 64] * 4)
    np.save(tmp_path / "x.npy", x)
    line = _assert_one_line_error(siguard("run", plan_dir, "--input", tmp_path / "x.npy", "--mode", "reference"))
    assert {"shape": "shape", "nan": "NaN", "dtype": "dtype"}[bad] in line
