"""SIGuard: compile ONNX models into 3-party secret-sharing plans with a membership-inference guard."""

from compiler.errors import SiguardError

from .api import compile, inspect, load_plan, run
from .api_guard import audit, format_audit, train_defender

__all__ = ["compile", "inspect", "load_plan", "run", "train_defender", "audit", "format_audit", "SiguardError"]
__version__ = "0.1.0"
