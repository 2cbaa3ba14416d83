"""Imports inside functions: of a siguard module only where listed, and third-party ones only for listed heavy deps.

A function-level import of another siguard module is how a layer used to reach upward past a cycle; the
layers themselves are import-linter contracts (pyproject.toml, run in CI by `lint-imports`).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("compiler", "passes", "runtime", "privacy", "siguard")

#: files that may import inside functions whatever a command needs, and why (nothing else may import siguard
#: modules inside a function)
FRONT_DOOR = {
    "siguard/cli.py": "a command loads only what it runs: `siguard run` does not import the compiler and onnx",
    "siguard/cli_audit.py": "as cli.py",
    "siguard/cli_bench.py": "as cli.py",
    "siguard/cli_guard.py": "as cli.py",
    "siguard/cli_net.py": "as cli.py: a party server does not import the compiler",
    "siguard/api.py": "the Python API loads a function's packages when it is called",
    "siguard/api_guard.py": "as api.py",
}

#: third-party modules imported inside functions, and why (each is heavy or needed on one path only)
LAZY = {
    "onnxruntime": "calibration and plaintext targets only; ~0.5 s to import",
    "onnx": "onnx.reference for the frontend's constant folding check; the defender's ONNX export",
    "sklearn": "the audit's attacks and the bundled digits dataset only",
    "matplotlib": "the audit report's figures only",
    "jinja2": "rendering a report only",
    "jsonschema": "validating a plan or audit document only",
    "greenlet": "the lockstep scheduler only",
    "threadpoolctl": "pinning BLAS threads while training the defender only",
    "tqdm": "the audit's progress bar only",
    "torch": "privacy helpers, the net CLI and Transport.exchange, the torch face of mpc/transport.py, whose "
             "module the torch-free query client imports",
    "scipy": "special functions for fitted approximations only; a one-shot run does not load scipy",
}


def _function_level_imports():
    for folder in PACKAGE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        for alias in node.names:
                            yield path, node.lineno, alias.name, 0
                    elif isinstance(node, ast.ImportFrom):
                        yield path, node.lineno, node.module or "", node.level


def test_no_function_level_import_of_a_siguard_module():
    found = [f"{p.relative_to(ROOT)}:{line}: {'.' * level}{mod}" for p, line, mod, level in _function_level_imports()
             if (level or mod.split(".")[0] == "siguard") and p.relative_to(ROOT).as_posix() not in FRONT_DOOR]
    assert not found, "import these at module level (or move the shared thing lower):\n" + "\n".join(found)


def test_function_level_third_party_imports_are_listed():
    unlisted = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p, line, mod, level in _function_level_imports()
                if not level and mod.split(".")[0] not in sys.stdlib_module_names
                and mod.split(".")[0] != "siguard" and mod.split(".")[0] not in LAZY
                and p.relative_to(ROOT).as_posix() not in FRONT_DOOR]
    assert not unlisted, "list these in LAZY with a reason, or import them at module level:\n" + "\n".join(unlisted)


def test_the_checker_sees_a_function_level_import(tmp_path, monkeypatch):
    """The scan is not vacuous: a planted function-level siguard import is reported."""
    pkg = tmp_path / "compiler"
    pkg.mkdir()
    (pkg / "planted.py").write_text("def f():\n    from siguard.passes import base\n    return base\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = [mod for _, _, mod, _ in _function_level_imports()]
    assert found == ["siguard.passes"]


def test_every_module_is_imported_once_under_the_namespace():
    """Loading the package and its templates never imports a top-level ``compiler``/``privacy``/... as a second
    copy (a resource loader given the bare folder name did: two module objects, two classes per exception)."""
    code = (
        "import sys, siguard.pipeline, siguard.privacy.audit, siguard.compiler.report as r, siguard.runtime.local\n"
        "r._env().get_template('plan.txt.j2')\n"
        "import jinja2; jinja2.PackageLoader('siguard.privacy', 'templates')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('compiler', 'passes', 'runtime', 'privacy')))\n"
    )
    sources = [p for folder in PACKAGE_FOLDERS for p in (ROOT / folder).rglob("*.py")]
    loaders = [p for p in sources if "PackageLoader(" in p.read_text()]
    assert loaders and all('PackageLoader("siguard.' in p.read_text() for p in loaders), loaders
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
