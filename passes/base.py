"""The pass interface and the PassManager that runs passes in order and records what changed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from siguard.compiler.ir import Graph

__all__ = ["Pass", "PassContext", "PassRecord", "PassManager"]

log = logging.getLogger("siguard.passes")


@dataclass
class PassContext:
    """Options shared by all passes of one compilation."""

    frac_bits: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)


@dataclass
class PassRecord:
    """What one pass did: its name, the changes it made (one line each) and its run time."""

    name: str
    changes: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "changes": self.changes, "seconds": round(self.seconds, 4)}


class Pass:
    """A graph-to-graph transformation. Subclasses set ``name`` and implement :meth:`run`, which
    mutates the graph in place and returns one human-readable line per change."""

    name = "pass"

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext) -> PassRecord:
        t0 = time.perf_counter()
        changes = self.run(graph, ctx)
        for c in changes:
            log.debug("%s: %s", self.name, c)
        return PassRecord(self.name, list(changes), time.perf_counter() - t0)


class PassManager:
    """Runs passes in order; ``records`` keeps what each changed (shown by ``inspect``)."""

    def __init__(self, passes: list[Pass]):
        self.passes = passes
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        for p in self.passes:
            self.records.append(p(graph, ctx))
        return graph
