"""Backend: lower a compiled IR graph into a plan document and the model owner's weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from siguard.core.errors import ModelError

from .impl import Impl
from .ir import Graph, Node
from .plan import PLAN_FORMAT, PLAN_VERSION, PROTOCOL, PROTOCOL_VERSION, Plan
from .step import PlanStep

__all__ = ["build_plan", "node_step"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _zero_cost() -> dict[str, Any]:
    return {"rounds": 0, "bytes": 0, "bytes_per_party": [0, 0, 0]}


def node_step(node: Node, cost: dict[str, Any] | None = None) -> PlanStep:
    """The plan step of an IR node (its ``_impl_params`` attribute becomes the implementation's tuning)."""
    attrs = _jsonable(node.attrs)
    params = attrs.pop("_impl_params", None)
    return PlanStep(node.name, node.op, Impl.parse(node.impl or "local", node.op, params), list(node.inputs),
                    list(node.outputs), attrs, cost or _zero_cost(), node.source)


def build_plan(
    graph: Graph,
    *,
    frac_bits: int,
    model_info: dict[str, Any],
    passes: list[dict[str, Any]] | None = None,
    warnings: list[str] | None = None,
    version_string: str = "siguard",
) -> tuple[Plan, dict[str, np.ndarray]]:
    """Turn ``graph`` (after all passes) into a :class:`Plan` and the weights dict.

    Steps are: one ``input`` step per client input (the client secret-shares it), the graph's
    nodes in order, and one ``reveal`` step per output (opened to the client only). Costs come
    from the cost pass: ``node.cost`` per node, ``graph.meta["io_costs"]`` for input/reveal/setup (zero
    where the pass has not run, as for the approximation pass's evaluation plans).
    """

    values: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    weights_meta: list[dict[str, Any]] = []
    weights: dict[str, np.ndarray] = {}
    for name, v in graph.values.items():
        if v.is_const:
            if v.visibility == "secret":
                weights_meta.append({"name": name, "shape": list(v.shape), "scale": int(v.scale)})
                weights[name] = np.asarray(v.data, dtype=np.float64)
            else:
                constants[name] = {"shape": list(v.shape), "scale": int(v.scale),
                                   "data": np.asarray(v.data, dtype=np.float64).reshape(-1).tolist()}
            continue
        values[name] = {
            "shape": list(v.shape),
            "visibility": v.visibility,
            "owner": v.owner,
            "scale": None if v.scale is None else int(v.scale),
            "range": None if v.range is None else [float(v.range[0]), float(v.range[1])],
        }
    for name in graph.outputs:
        if graph.values[name].is_const:
            raise ModelError(f"output {name!r} is a constant: nothing to compute securely")

    costs = graph.meta.get("io_costs", {})
    steps: list[PlanStep] = []
    for name in graph.inputs:
        steps.append(PlanStep(f"input:{name}", "input", Impl.parse("client-share", "input"), [], [name],
                              {"owner": "client"}, costs.get("input", {}).get(name) or _zero_cost()))
    steps += [node_step(node, node.cost) for node in graph.nodes]
    for name in graph.outputs:
        steps.append(PlanStep(f"reveal:{name}", "reveal", Impl.parse("to-client", "reveal"), [name], [],
                              {"to": "client"}, costs.get("reveal", {}).get(name) or _zero_cost()))

    per_party = [sum(s.cost["bytes_per_party"][p] for s in steps) for p in range(3)]
    totals = {"rounds": sum(s.cost["rounds"] for s in steps), "bytes": sum(s.cost["bytes"] for s in steps),
              "bytes_per_party": per_party, "steps": len(steps)}
    doc = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "protocol": PROTOCOL,
        "protocol_version": PROTOCOL_VERSION,
        "frac_bits": int(frac_bits),
        "created_by": version_string,
        "model": _jsonable(model_info),
        "inputs": [{"name": n, "shape": list(graph.values[n].shape), "dtype": "float32", "owner": "client"}
                   for n in graph.inputs],
        "outputs": [{"name": n, "shape": list(graph.values[n].shape), "reveal_to": "client"} for n in graph.outputs],
        "values": values,
        "weights": weights_meta,
        "constants": constants,
        "steps": steps,
        "totals": totals,
        "setup": costs.get("setup") or _zero_cost(),
        "passes": passes or [],
        "warnings": warnings or [],
        "plan_hash": "0" * 64,
    }
    return Plan(doc), weights
