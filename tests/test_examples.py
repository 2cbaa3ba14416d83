"""The examples run as documented (docs that match the code)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args: str, cwd: Path, timeout: float = 900) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_resnet_example_compiles_inspects_and_matches_onnxruntime(tmp_path):
    out = _run(str(EXAMPLES / "resnet_compile_inspect.py"), "--out", "r", cwd=tmp_path)
    assert (tmp_path / "r" / "plan.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "r" / "plan" / "plan.json").exists()
    m = re.search(r"max \|logit - onnxruntime\| = ([0-9.]+); top-1 (\d+) \(onnxruntime (\d+)\)", out)
    assert m, out
    assert float(m.group(1)) < 0.05 and m.group(2) == m.group(3)


@pytest.mark.slow
def test_bring_your_own_example_audits_its_model(tmp_path):
    out = _run(str(EXAMPLES / "bring_your_own.py"), "--out", "b", "--mode", "reference", "--epochs", "100",
               cwd=tmp_path, timeout=1800)
    assert "defender: validation accuracy" in out and "secure + guard" in out
    import json

    doc = json.loads((tmp_path / "b" / "report" / "audit.json").read_text())
    assert doc["outputs"]["guarded"]["top1_agreement"] == 1.0
    assert doc["data"] == {"members": 200, "nonmembers": 200, "shadow_members": 200, "shadow_nonmembers": 200}


def test_fashion_mnist_script_uses_real_commands_and_flags():
    """Every ``siguard`` line of the shell example parses with the real CLI parser."""
    from siguard.cli import build_parser

    script = (EXAMPLES / "fashion_mnist_audit.sh").read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "fashion_mnist_audit.sh")]).returncode == 0
    lines = re.sub(r"\\\n\s*", " ", script).splitlines()
    commands = [ln.split("|")[0].strip() for ln in lines if ln.strip().startswith("siguard ")]
    assert len(commands) >= 5
    parser = build_parser()
    for cmd in commands:
        argv = shlex.split(cmd.replace('"$OUT', '"out').replace('"$MODE"', "threads"))[1:]
        ns = parser.parse_args(argv)
        assert callable(ns.func), cmd


def test_examples_readme_lists_every_example():
    listed = (EXAMPLES / "README.md").read_text()
    for f in EXAMPLES.iterdir():
        if f.suffix in (".py", ".sh"):
            assert f"`{f.name}`" in listed, f.name
