"""SIGuard: compile ONNX models into 3-party secret-sharing plans with a membership-inference guard.

The API functions are imported on first use (PEP 562), so that ``import siguard`` -- which every ``siguard``
command pays, ``siguard run`` included -- does not load the compiler's dependencies (onnx and its kin, about
a second and a half) for a command that never compiles."""

from __future__ import annotations

# A source checkout keeps the subpackages in the repository's top-level folders (compiler/, passes/, runtime/,
# privacy/), which pyproject.toml maps under siguard.; this directory holds a relative symlink to each
# (siguard/compiler -> ../compiler, ...), so a checkout has the installed layout: plain imports from the root,
# PYTHONPATH=checkout and import-linter's walk of the package all see the same siguard.compiler.
import importlib
from typing import Any

from siguard.core.errors import SiguardError

__all__ = ["compile", "inspect", "load_plan", "run", "train_defender", "audit", "format_audit", "SiguardError"]
__version__ = "0.1.0"

_LAZY = {"compile": "siguard.api", "inspect": "siguard.api", "load_plan": "siguard.api", "run": "siguard.api",
         "train_defender": "siguard.api_guard", "audit": "siguard.api_guard", "format_audit": "siguard.api_guard"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'siguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
