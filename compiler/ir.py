"""SIGuard's intermediate representation: a Graph of Nodes over named Values, in topological order.

The IR is deliberately small. Semantics of every op (what it computes on real numbers) are
given in :mod:`siguard.compiler.ops`; the float interpreter in :mod:`siguard.compiler.interp` executes them and
is the oracle for passes. Visibility says who may see a value:

* ``secret`` values exist only as secret shares at run time (the client's input, the model
  owner's weights, and everything computed from either);
* ``public`` values are part of the public plan (shape constants, scalar constants of the
  architecture such as 0.5 in GELU, pooling divisors).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Value", "Node", "Graph"]


@dataclass
class Value:
    """A tensor in the graph.

    ``owner`` is ``"client"`` for graph inputs, ``"model"`` for the model owner's weights
    (secret, shipped in ``weights.npz``), ``None`` for computed values and public constants.
    ``data`` holds the float (or int) array of a constant or weight. ``scale`` is the number of
    fractional bits of its fixed-point encoding (set by the fixed-point pass; 0 = integer).
    ``range`` is the calibrated (min, max) of the real value, when known.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float"  # "float" or "int" (int tensors are always public: shapes, indices)
    visibility: str = "secret"  # "secret" or "public"
    owner: str | None = None
    data: np.ndarray | None = None
    scale: int | None = None
    range: tuple[float, float] | None = None

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class Node:
    """One operation. ``impl`` names the protocol implementation (chosen by passes; a default
    is filled in for every op so the IR always says *which* implementation runs). ``cost`` is
    ``{"rounds": int, "bytes": int, "bytes_per_party": [b0, b1, b2]}`` after the cost pass.
    ``source`` is the ONNX node the op came from, for messages and inspection.
    """

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    impl: str | None = None
    cost: dict[str, Any] | None = None
    source: str | None = None


class Graph:
    """Nodes in topological order over a table of Values; ``inputs``/``outputs`` are value names."""

    def __init__(self, name: str = "model"):
        self.name = name
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.meta: dict[str, Any] = {}
        self._counter = 0

    # ---- construction -------------------------------------------------------------------
    def add_value(self, value: Value) -> Value:
        if value.name in self.values:
            raise ValueError(f"duplicate value name {value.name!r}")
        self.values[value.name] = value
        return value

    def fresh_name(self, base: str) -> str:
        """A value/node name not used yet, derived from ``base``."""
        while True:
            self._counter += 1
            name = f"{base}__{self._counter}"
            if name not in self.values and all(n.name != name for n in self.nodes):
                return name

    def add_node(self, node: Node, index: int | None = None) -> Node:
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    # ---- queries ------------------------------------------------------------------------
    def producer(self, value_name: str) -> Node | None:
        for n in self.nodes:
            if value_name in n.outputs:
                return n
        return None

    def consumers(self, value_name: str) -> list[Node]:
        return [n for n in self.nodes if value_name in n.inputs]

    def weights(self) -> list[Value]:
        """Secret constants owned by the model owner, in a stable order."""
        return [v for v in self.values.values() if v.owner == "model"]

    def remove_unused(self) -> int:
        """Drop nodes whose outputs are never used and values nobody references. Returns count."""
        removed = 0
        changed = True
        while changed:
            changed = False
            used = set(self.outputs)
            for n in self.nodes:
                used.update(n.inputs)
            keep = []
            for n in self.nodes:
                if any(o in used for o in n.outputs):
                    keep.append(n)
                else:
                    removed += 1
                    changed = True
            self.nodes = keep
        referenced = set(self.inputs) | set(self.outputs)
        for n in self.nodes:
            referenced.update(n.inputs)
            referenced.update(n.outputs)
        for name in list(self.values):
            if name not in referenced:
                del self.values[name]
        return removed

    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of ``old`` (and the graph outputs) read ``new`` instead."""
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def copy(self) -> Graph:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes, inputs={self.inputs}, outputs={self.outputs})"
