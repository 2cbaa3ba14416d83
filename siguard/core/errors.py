"""Errors that reach the user as one clear line (the CLI prints them and exits 2)."""

from __future__ import annotations

__all__ = ["SiguardError", "UnsupportedOpsError", "ModelError", "PlanError", "InputError", "RuntimeFault"]


class SiguardError(Exception):
    """Base class: the message is shown to the user as one line; no traceback."""

    exit_code = 2


class ModelError(SiguardError):
    """The ONNX model cannot be read, checked, converted or shape-inferred."""


#: how many node names an error lists before "and N more"
FIRST_FEW = 5


def _first_few(names: list[str], n: int = FIRST_FEW) -> str:
    """``a, b, c`` or, for a long list, its first ``n`` and "and N more"."""
    if len(names) <= n + 1:  # "and 1 more" would be no shorter than the name
        return ", ".join(names)
    return f"{', '.join(names[:n])} and {len(names) - n} more"


class UnsupportedOpsError(ModelError):
    """The model uses ONNX ops (or attributes) that SIGuard cannot compile.

    ``unsupported`` maps op type -> list of node names, so that one message names every op type
    (and the first few nodes of each, plus how many more: the full lists stay in ``unsupported``).
    """

    def __init__(self, unsupported: dict[str, list[str]], supported: list[str]):
        self.unsupported = unsupported
        self.supported = supported
        parts = [f"{op} (nodes: {_first_few(names)})" for op, names in sorted(unsupported.items())]
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
