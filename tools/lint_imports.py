"""Run import-linter on the ``siguard`` namespace as installed, from a source checkout.

pyproject.toml maps the top-level folders (compiler/, passes/, runtime/, privacy/) under ``siguard.``; import
-linter (grimp) finds a package's modules by walking the package's own directory, so it would see siguard/
alone. This builds the installed layout as symlinks in a temporary directory and lints that, against the
contracts in pyproject.toml. Usage: ``python tools/lint_imports.py [lint-imports options]``; exits with
lint-imports' status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]  # {"siguard": "siguard", "siguard.compiler": "compiler", ...}
    with tempfile.TemporaryDirectory(prefix="siguard-lint-") as tmp:
        top = Path(tmp, "siguard")
        top.mkdir()
        for entry in (ROOT / mapping["siguard"]).iterdir():
            if entry.name != "__pycache__":
                (top / entry.name).symlink_to(entry)
        for name, folder in mapping.items():
            if name != "siguard":
                Path(tmp, *name.split(".")).symlink_to(ROOT / folder, target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": tmp}
        cmd = ["lint-imports", str(ROOT / "pyproject.toml"), "--no-cache", *sys.argv[1:]]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
