"""The command line: exit codes and one-line messages on bad input, and the happy path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

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


def test_compile_writes_a_plan_directory(plan_dir):
    for f in ("plan.json", "weights.npz", "report.txt", "report.html", "plan.dot"):
        assert (plan_dir / f).exists(), f


@pytest.mark.parametrize("fmt", ["text", "json", "html", "dot"])
def test_inspect_formats(plan_dir, fmt):
    proc = siguard("inspect", plan_dir, "--format", fmt, check=True)
    if fmt == "json":
        doc = json.loads(proc.stdout)
        assert doc["totals"]["rounds"] == sum(s["rounds"] for s in doc["steps"])
    else:
        assert proc.stdout.strip()


def test_run_reference_matches_onnxruntime(plan_dir, mlp_onnx, digits, tmp_path):
    x = digits[2][:4].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    siguard("run", plan_dir, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--mode", "reference",
            check=True)
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - ort_run(mlp_onnx, x)).max() <= 1e-2


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
