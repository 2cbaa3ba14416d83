"""SIGuard: compile ONNX models into 3-party secret-sharing plans with a membership-inference guard.

The API functions are imported on first use (PEP 562), so that ``import siguard`` -- which every ``siguard``
command pays, ``siguard run`` included -- does not load the compiler's dependencies (onnx and its kin, about
a second and a half) for a command that never compiles."""

from __future__ import annotations

import os

# A source checkout keeps the subpackages in the repository's top-level folders (compiler/, passes/, runtime/,
# privacy/), which pyproject.toml maps under siguard.; a wheel puts them inside this directory. Imported from a
# checkout (pytest from the root, PYTHONPATH=checkout, an editable install), siguard.compiler must be that
# checkout's compiler/, whichever checkout an editable install's finder points at: so search the root too.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "pyproject.toml")) and not os.path.isdir(os.path.join(__path__[0], "compiler")):
    __path__.append(_ROOT)

import importlib  # noqa: E402
from typing import Any  # noqa: E402

from siguard.core.errors import SiguardError  # noqa: E402

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
