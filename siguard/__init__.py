"""SIGuard: compile ONNX models into 3-party secret-sharing plans with a membership-inference guard."""

import os

# A source checkout keeps the subpackages in the repository's top-level folders (compiler/, passes/, runtime/,
# privacy/), which pyproject.toml maps under siguard.; a wheel puts them inside this directory. Imported from a
# checkout (pytest from the root, PYTHONPATH=checkout, an editable install), siguard.compiler must be that
# checkout's compiler/, whichever checkout an editable install's finder points at: so search the root too.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "pyproject.toml")) and not os.path.isdir(os.path.join(__path__[0], "compiler")):
    __path__.append(_ROOT)


from siguard.core.errors import SiguardError  # noqa: E402

from .api import compile, inspect, load_plan, run  # noqa: E402
from .api_guard import audit, format_audit, train_defender  # noqa: E402

__all__ = ["compile", "inspect", "load_plan", "run", "train_defender", "audit", "format_audit", "SiguardError"]
__version__ = "0.1.0"
