"""SIGuard: compile ONNX models into 3-party secret-sharing plans with a membership-inference guard."""

from compiler.errors import SiguardError

from .api import compile, inspect, load_plan, run

__all__ = ["compile", "inspect", "load_plan", "run", "SiguardError"]
__version__ = "0.1.0"
