"""``siguard demo`` from a fresh virtual environment, installed with the README's own set-up command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _readme_main_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"Run the main job.*?```bash\n(.*?)\n```", readme, re.S)
    assert m, "README: no bash block after 'Run the main job'"
    return [p.strip() for p in m.group(1).strip().split("&&")]


def test_demo_runs_in_a_fresh_venv_after_the_readme_install(tmp_path):
    parts = _readme_main_command()
    assert parts[-1] == "siguard demo", parts
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    for install in parts[:-1]:
        proc = subprocess.run(install, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{install}: {proc.stderr[-3000:]}"
    where = subprocess.run("command -v siguard", shell=True, env=env, capture_output=True, text=True).stdout.strip()
    assert where == str(venv / "bin" / "siguard")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(parts[-1], shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("best attack AUC", "secure + guard", "label accuracy", "HTML report:"):
        assert needle in out, out
    report = work / "siguard-demo" / "report"
    doc = json.loads((report / "audit.json").read_text())
    assert (report / "index.html").exists()
    # the story the demo tells: labels kept by the guard, secure = plaintext labels
    assert doc["outputs"]["guarded"]["top1_agreement"] == 1.0
    assert doc["outputs"]["secure"]["top1_agreement"] >= 0.99
    # the guard ran between the parties: its rounds (1,240 per batch at the default) on top of the plain plan's
    assert doc["mode"] == "threads" and doc["outputs"]["guarded"]["rounds"] > doc["outputs"]["secure"]["rounds"] + 1000
