"""Cost pass: annotate every node with the rounds and bytes per party of its protocol."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from siguard.compiler.backend import node_step
from siguard.compiler.ir import Graph, Node
from siguard.runtime.executor import StepContext
from siguard.runtime.kernels.cost import CostEngine, MetaShares
from siguard.runtime.kernels.guard import guard_phases
from siguard.runtime.kernels.handlers import handler_for
from siguard.runtime.kernels.inputs import client_input
from siguard.runtime.ring import encode

from .base import Pass, PassContext

__all__ = ["CostAnnotation", "node_cost", "io_costs", "cost_record"]


def cost_record(total: dict[str, Any]) -> dict[str, Any]:
    """The plan's cost fields from a CostEngine total: rounds, bytes (busiest party), per party."""
    per_party = [int(b) for b in total["bytes_per_party"]]
    return {"rounds": int(total["rounds"]), "bytes": max(per_party), "bytes_per_party": per_party}


def _secret(shape) -> MetaShares:
    """A secret argument of the given shape for the cost engine (its sharing costs nothing here)."""
    return MetaShares(torch.empty(tuple(shape), dtype=torch.int64, device="meta"))


def node_cost(graph: Graph, node: Node, frac_bits: int) -> dict[str, Any]:
    """Run the node's runtime handler on the cost engine (shapes only) and return its cost."""
    engine = CostEngine(frac_bits)
    ctx = StepContext(engine, frac_bits, {name: v.scale for name, v in graph.values.items()})
    args = []
    for name in node.inputs:
        v = graph.values[name]
        if v.is_const and v.visibility == "public":
            args.append(encode(np.asarray(v.data, dtype=np.float64), v.scale if v.scale is not None else frac_bits))
        else:
            args.append(_secret(v.shape))
    step = node_step(node)  # as the plan stores it
    if node.op == "guard":
        engine.guard_marks = []
    outs = handler_for(node.op)(ctx, step, args)
    for name, out in zip(node.outputs, outs, strict=True):
        want = tuple(graph.values[name].shape)
        got = tuple(out.shape)
        if got != want:
            raise ValueError(f"{node.name} ({node.op}): runtime shape {got} differs from the IR's {want}")
    record = cost_record(engine.total)
    if engine.guard_marks:

        record["phases"] = guard_phases(engine.guard_marks)
    return record


def io_costs(graph: Graph, frac_bits: int) -> dict[str, Any]:
    """Costs of the client's input sharing, of revealing each output, and of sharing the weights."""
    out: dict[str, Any] = {"input": {}, "reveal": {}}
    for name in graph.inputs:
        e = CostEngine(frac_bits)
        client_input(e, None, graph.values[name].shape, (0, 0))  # share, check, clamp: the bounds cost nothing
        out["input"][name] = cost_record(e.total)
    for name in graph.outputs:
        e = CostEngine(frac_bits)
        e.reveal(_secret(graph.values[name].shape), "client")
        out["reveal"][name] = cost_record(e.total)
    e = CostEngine(frac_bits)
    for v in graph.weights():
        e.input("model", None, v.shape)
    out["setup"] = cost_record(e.total)
    return out


class CostAnnotation(Pass):
    """Annotates each node with ``cost = {rounds, bytes, bytes_per_party}``.

    Rules:

    1. A node's cost is what its runtime handler spends when run on the cost-counting engine
       (:class:`siguard.runtime.kernels.cost.CostEngine`), so the model and the protocols cannot disagree
       (the tests check the engine against the in-process transport's counters).
    2. ``bytes`` is the busiest party's; ``bytes_per_party`` lists P0, P1, P2.
    3. The shape each handler produces must equal the IR's shape, or the pass fails (a
       frontend/runtime mismatch must never reach a plan).
    4. The client's input sharing, each output's reveal and the weights' sharing are costed the same
       way (:func:`io_costs`) into ``graph.meta["io_costs"]``, which the backend puts on those steps.
    """

    name = "cost"

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        node_rounds = 0
        for node in graph.nodes:
            node.cost = node_cost(graph, node, ctx.frac_bits)
            node_rounds += node.cost["rounds"]
        io = graph.meta["io_costs"] = io_costs(graph, ctx.frac_bits)
        io_rounds = sum(c["rounds"] for kind in ("input", "reveal") for c in io[kind].values())
        # the plan's TOTAL counts the input and reveal steps too: say both, so the two lines agree
        return [f"{len(graph.nodes)} nodes costed: {node_rounds} rounds, {node_rounds + io_rounds} in total with "
                f"the input sharing and reveal steps ({io_rounds})"]
