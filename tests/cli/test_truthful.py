"""A CLI that tells the truth (issue 14, items 5 and 6): help defaults are the code's, dtypes and files get the
errors the README promises, inspect's lines agree, tables are aligned and uncut, warnings are printed once, and a
run off a terminal reports progress in plain lines."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.cli.test_cli import _assert_one_line_error, siguard
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_dir(mlp_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("truthful") / "plan"
    proc = siguard("compile", mlp_onnx, "-o", d, "--batch", "4", check=True)
    return d, proc


# ---- help text -----------------------------------------------------------------------------------
def _compile_help(capsys) -> str:
    from siguard.cli import main

    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    return capsys.readouterr().out


def _help_defaults(text: str) -> dict[str, str]:
    """Option -> the X of "(default X)" in its help entry (an entry starts with a line "  --option")."""
    entries, cur = [], None
    for line in text.splitlines():
        if re.match(r"  -", line):
            cur = [line]
            entries.append(cur)
        elif cur is not None and line.startswith("   "):
            cur.append(line)
        else:
            cur = None
    shown = {}
    for entry in entries:
        joined = " ".join(" ".join(entry).split())  # argparse wraps lines: one space everywhere
        m = re.search(r"\(default ([^)]+)\)", joined)
        if m:
            shown[re.search(r"--[a-z-]+", joined).group(0)] = m.group(1)
    return shown


def _code_defaults() -> dict[str, str]:
    """Each option's default as the code has it (the dataclasses' own field defaults, read here independently)."""
    from siguard.core.config import AccuracyBudget, GuardConfig
    from siguard.pipeline import CompileOptions

    def fields(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}

    c, g, b = fields(CompileOptions), fields(GuardConfig), AccuracyBudget()

    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    return {
        "--batch": show(c["batch"]), "--frac-bits": show(c["frac_bits"]), "--approx": show(c["approx"]),
        "--objective": show(c["objective"]), "--accuracy-budget": f"top1={b.top1:g},prob={b.prob:g}",
        "--guard-rounds": show(g["rounds"]), "--guard-steps": show(g["steps"]), "--guard-lr": show(g["lr"]),
        "--guard-lr-growth": show(g["lr_growth"]),
        "--guard-schedule": show(g["schedule"]), "--guard-validator": show(g["validator"]),
        "--guard-margin": show(g["margin"]), "--guard-sharpen-lr": show(g["sharpen_lr"]),
        "--guard-sharpen-margin": show(g["sharpen_margin"]),
        "--guard-release-bits": show(g["release_bits"]),
    }


def test_compile_help_states_the_codes_defaults(capsys):
    shown = _help_defaults(_compile_help(capsys))
    assert shown == _code_defaults()  # every "(default X)" of the help is the code's; none missing


def test_compile_help_follows_a_changed_default(capsys, monkeypatch):
    """Derived, not restated: change the code's default and the help changes with it."""
    import siguard.core.config

    @dataclasses.dataclass(frozen=True)
    class Changed(siguard.core.config.GuardConfig):
        margin: float = 0.375
        rounds: int = 11

    monkeypatch.setattr(siguard.core.config, "GuardConfig", Changed)
    shown = _help_defaults(_compile_help(capsys))
    assert shown["--guard-margin"] == "0.375" and shown["--guard-rounds"] == "11"


# ---- input files and dtypes ------------------------------------------------------------------------
def test_a_text_file_named_npy_gets_a_true_error(plan_dir, tmp_path):
    bad = tmp_path / "x.npy"
    bad.write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n")
    line = _assert_one_line_error(siguard("run", plan_dir[0], "--input", bad, "--mode", "reference"))
    assert "not an .npy file" in line and "pickled" not in line
    np.savez(tmp_path / "z.npy", x=np.zeros(3))  # np.savez keeps the name given... an archive
    archive = next(tmp_path.glob("z.npy*"))
    line = _assert_one_line_error(siguard("run", plan_dir[0], "--input", archive, "--mode", "reference"))
    assert "zip archive" in line


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_inputs_are_refused(plan_dir, tmp_path, dtype):
    np.save(tmp_path / "x.npy", np.ones((4, 64), dtype=dtype))
    line = _assert_one_line_error(siguard("run", plan_dir[0], "--input", tmp_path / "x.npy", "--mode", "reference"))
    assert np.dtype(dtype).name in line and "float32" in line


def test_float64_inputs_are_accepted_and_exact(plan_dir, mlp_onnx, digits, tmp_path):
    """float64 goes to the same fixed-point encoding as float32 (both round to the 2^-16 grid)."""
    x32 = digits[2][:4].astype(np.float32)
    ys = {}
    for dt in (np.float32, np.float64):
        np.save(tmp_path / "x.npy", x32.astype(dt))
        siguard("run", plan_dir[0], "--input", tmp_path / "x.npy", "--output", tmp_path / f"y{dt.__name__}.npy",
                "--mode", "reference", check=True)
        ys[dt] = np.load(tmp_path / f"y{dt.__name__}.npy")
    assert np.array_equal(ys[np.float32], ys[np.float64])  # x32 is exactly representable in float64
    assert np.abs(ys[np.float64] - ort_run(mlp_onnx, x32)).max() <= 1e-2


# ---- inspect ----------------------------------------------------------------------------------------
def test_inspect_cost_line_and_total_agree(plan_dir):
    text = siguard("inspect", plan_dir[0], check=True).stdout
    total = int(re.search(r"TOTAL \(sum of steps\)\s+(\d+)", text).group(1))
    cost_line = re.search(r"nodes costed: (\d+) rounds, (\d+) in total with the input sharing and reveal steps "
                          r"\((\d+)\)", text)
    assert cost_line, text
    nodes, in_total, io_rounds = map(int, cost_line.groups())
    assert in_total == total == nodes + io_rounds
    doc = json.loads((plan_dir[0] / "plan.json").read_text())
    io_steps = [s for s in doc["steps"] if s["op"] in ("input", "reveal")]
    assert io_rounds == sum(s["cost"]["rounds"] for s in io_steps)


def test_inspect_shows_step_names_whole(plan_dir):
    from siguard.compiler.plan import Plan
    from siguard.compiler.report import render

    plan = Plan.load(plan_dir[0])
    long_a = "/encoder/layers.0/self_attn/out_proj/MatMul_with_a_long_name"
    long_b = long_a + "/trunc"
    plan.steps[1].name, plan.steps[2].name = long_a, long_b
    text = render(plan, "text")
    rows = [ln for ln in text.splitlines() if re.match(r"\s+\d+  ", ln)]
    assert any(long_a + " " in r for r in rows) and any(long_b + " " in r for r in rows)
    starts = {r.index(" ", r.index(r.split()[1])) for r in rows}  # the op column: one position for all rows
    assert len({len(r.split()[1]) <= len(long_b) for r in rows}) == 1 and len(starts) >= 1
    op_col = {r.split()[1]: r.index(r.split()[2], len(r.split()[0]) + 2 + len(r.split()[1])) for r in rows}
    assert len(set(op_col.values())) == 1, op_col


# ---- warnings -----------------------------------------------------------------------------------
def test_each_compile_warning_is_printed_once(plan_dir):
    from siguard.compiler.plan import Plan

    _, proc = plan_dir
    doc = Plan.load(plan_dir[0]).with_owner_facts().doc  # warnings quote measured ranges: owner.json keeps them
    assert doc["warnings"], "the plan was compiled without calibration: it records warnings"
    err = proc.stderr
    for w in doc["warnings"]:
        assert err.count(w) == 1, err
    assert "WARNING" not in err


def test_the_cli_silences_the_passes_logger_unless_debugging(plan_dir, capsys):
    from siguard.cli import main

    logger = logging.getLogger("siguard.passes")
    before = logger.level
    try:
        assert main(["inspect", str(plan_dir[0])]) == 0
        assert not logger.isEnabledFor(logging.WARNING)  # the demo's compilations print nothing either
    finally:
        logger.setLevel(before)


def _many_unsupported(path: Path, n: int) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    names = [f"hard_{i:02d}" for i in range(n)]
    nodes = [helper.make_node("Hardmax", ["x" if i == 0 else f"h{i - 1}"], [f"h{i}" if i < n - 1 else "y"], name=nm)
             for i, nm in enumerate(names)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "bad", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_long_unsupported_node_list_is_cut(tmp_path):
    from siguard.core.errors import FIRST_FEW

    n = 19
    line = _assert_one_line_error(siguard("compile", _many_unsupported(tmp_path / "m.onnx", n), "-o", tmp_path / "p"))
    shown = re.findall(r"hard_\d\d", line)
    assert shown == [f"hard_{i:02d}" for i in range(FIRST_FEW)]
    assert f"and {n - FIRST_FEW} more" in line


# ---- tables -------------------------------------------------------------------------------------
def _audit_doc() -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / "audit_digits.json").read_text())


def _table_lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n\n")[0].splitlines() if ln.strip() and not set(ln) <= {"-"}]


def test_audit_table_rows_are_aligned():
    from siguard.privacy.audit import format_table

    doc = _audit_doc()
    lines = _table_lines(format_table(doc))
    assert len({len(ln) for ln in lines}) == 1, lines
    for row in doc["outputs"]["plaintext"]["attacks"].values():  # label-aware rows too, names whole
        assert any(row["name"] in ln for ln in lines), row["name"]


def test_demo_table_shows_attack_names_whole():
    from siguard.privacy.demo import format_demo_table

    doc = _audit_doc()
    names = {doc["outputs"][k]["best_attack"]["name"] for k in doc["outputs"]}
    assert "true-label confidence" in names  # the case the issue saw cut
    text = format_demo_table(doc)
    which = next(ln for ln in text.splitlines() if ln.strip().startswith("which attack"))
    for name in names:
        assert name in which
    lines = [ln for ln in text.splitlines()[2:] if not ln.startswith("label-only gap")]
    assert len({len(ln) for ln in lines}) == 1, lines


# ---- progress off a terminal ----------------------------------------------------------------------
def test_progress_off_a_terminal_is_a_plain_line_every_few_seconds():
    from siguard.progress import PlainProgress, progress_bar

    out = io.StringIO()  # not a terminal
    now = [0.0]
    bar = progress_bar(100, "guarded inference", file=out, interval=5.0)
    assert isinstance(bar, PlainProgress)
    bar._clock = lambda: now[0]
    bar._start = bar._last = 0.0
    with bar:
        for _ in range(100):
            now[0] += 0.5  # 50 s in all: one line per 5 s
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11, lines
    assert "\r" not in out.getvalue()
    assert lines[0] == "guarded inference: 10/100 it (10%), 5 s"
    assert lines[-1].startswith("guarded inference: 100/100 it (100%)")
    quiet = io.StringIO()
    with progress_bar(10, "x", file=quiet, enabled=False) as off:
        off.update(10)
    assert quiet.getvalue() == ""


# ---- guard train --output -----------------------------------------------------------------------------
def _multi_output_model(path: Path) -> Path:
    """x (N, 4) -> label (N,) int64 first (as skl2onnx puts it), then probs (N, 3) and feat (N, 5)."""
    rng = np.random.default_rng(0)  # test data only
    w3 = helper.make_tensor("w3", TensorProto.FLOAT, [4, 3], rng.normal(size=12).astype(np.float32).tolist())
    w5 = helper.make_tensor("w5", TensorProto.FLOAT, [4, 5], rng.normal(size=20).astype(np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w3"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
             helper.make_node("MatMul", ["x", "w5"], ["feat"])]
    g = helper.make_graph(nodes, "multi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                           helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 5])], [w3, w5])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_guard_train_takes_the_output_named_by_output(tmp_path, capsys):
    model = _multi_output_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for name, shift in (("members", 0.5), ("nonmembers", -0.5)):
        np.savez(tmp_path / f"{name}.npz", x=(rng.normal(size=(60, 4)) + shift).astype(np.float32),
                 y=np.zeros(60, dtype=np.int64))
    from siguard.cli import main

    data = ["--members", str(tmp_path / "members.npz"), "--nonmembers", str(tmp_path / "nonmembers.npz"),
            "--epochs", "3"]
    for output, k in (("probs", 3), ("feat", 5)):
        assert main(["guard", "train", str(model), *data, "-o", str(tmp_path / f"d-{output}.onnx"),
                     "--output", output]) == 0
        defender = onnx.load(tmp_path / f"d-{output}.onnx")
        assert defender.graph.input[0].type.tensor_type.shape.dim[1].dim_value == k  # trained on that output
    capsys.readouterr()
    assert main(["guard", "train", str(model), *data, "-o", str(tmp_path / "d.onnx"), "--output", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siguard: error: ")
    assert "no output 'nope'" in err[0] and "label, probs, feat" in err[0]
