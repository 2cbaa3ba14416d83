"""Errors that reach the user as one clear line (the CLI prints them and exits 2)."""

from __future__ import annotations

__all__ = ["SiguardError", "UnsupportedOpsError", "ModelError", "PlanError", "InputError", "RuntimeFault"]


class SiguardError(Exception):
    """Base class: the message is shown to the user as one line; no traceback."""

    exit_code = 2


class ModelError(SiguardError):
    """The ONNX model cannot be read, checked, converted or shape-inferred."""


class UnsupportedOpsError(ModelError):
    """The model uses ONNX ops (or attributes) that SIGuard cannot compile.

    ``unsupported`` maps op type -> list of node names, so that one message lists them all.
    """

    def __init__(self, unsupported: dict[str, list[str]], supported: list[str]):
        self.unsupported = unsupported
        self.supported = supported
        parts = [f"{op} (nodes: {', '.join(names)})" for op, names in sorted(unsupported.items())]
        super().__init__(
            f"unsupported ONNX ops: {'; '.join(parts)}. Supported ops: {', '.join(sorted(supported))}"
        )


class PlanError(SiguardError):
    """A plan directory is missing, malformed, of the wrong version, or tampered with."""


class InputError(SiguardError):
    """A user-supplied input (array file, option) has the wrong shape, dtype or content."""


class RuntimeFault(SiguardError):
    """Secure execution failed (protocol error, peer failure); names step, op and party."""

    exit_code = 3
