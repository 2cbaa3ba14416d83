"""Human renderings of a plan: text table, JSON summary, HTML page and Graphviz DOT (jinja2)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
import networkx as nx

from .plan import Plan

__all__ = ["render", "inspect_json", "dataflow_graph", "critical_path_rounds", "FORMATS"]

FORMATS = ("text", "json", "html", "dot")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("siguard.compiler", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def dataflow_graph(plan: Plan) -> nx.DiGraph:
    """Steps as nodes (weighted by rounds), an edge where one step's output feeds another."""
    g = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, s in enumerate(plan.steps):
        g.add_node(i, rounds=s.cost["rounds"], name=s.name, op=s.op, impl=s.impl.name)
        for name in s.inputs:
            if name in producer:
                g.add_edge(producer[name], i)
        for name in s.outputs:
            producer[name] = i
    return g


def critical_path_rounds(plan: Plan) -> tuple[int, list[int]]:
    """Rounds on the longest dependency chain (what a perfectly parallel scheduler would pay)
    and the step indices on it. Execution today is sequential, so the plan's total is larger
    when branches (e.g. residual shortcuts) could overlap."""
    g = dataflow_graph(plan)
    best: dict[int, tuple[int, int | None]] = {}
    for n in nx.topological_sort(g):
        preds = [(best[p][0], p) for p in g.predecessors(n)]
        base, prev = max(preds) if preds else (0, None)
        best[n] = (base + g.nodes[n]["rounds"], prev)
    if not best:
        return 0, []
    end = max(best, key=lambda n: best[n][0])
    path, cur = [], end
    while cur is not None:
        path.append(cur)
        cur = best[cur][1]
    return best[end][0], path[::-1]


def _mb(b: int) -> float:
    return b / 1e6


def _rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for i, s in enumerate(plan.steps):
        shapes = [plan.values[o]["shape"] for o in s.outputs if o in plan.values] or [
            plan.values[n]["shape"] for n in s.inputs if n in plan.values
        ]
        rows.append({
            "index": i,
            "name": s.name,
            "op": s.op,
            "impl": s.impl.name,
            "params": s.impl_params,
            "shape": "x".join(str(d) for d in shapes[0]) if shapes else "",
            "rounds": s.cost["rounds"],
            "bytes": s.cost["bytes"],
            "mb": _mb(s.cost["bytes"]),
            "source": s.source or "",
            "approx": _approx_row(s.approx),
        })
    return rows


def _fmt_range(r: Any) -> str:
    return "" if not r else f"[{r[0]:.4g}, {r[1]:.4g}]"


def _approx_row(a: dict[str, Any] | None) -> dict[str, Any] | None:
    """Display fields of a step's approximation record (see siguard.passes.approx.Approximate)."""
    if not a:
        return None
    err = a.get("error") or {}
    knob = (f"degree {a['degree']}" if a.get("degree") is not None else "") + (
        (", " if a.get("degree") is not None and a.get("iterations") is not None else "")
        + (f"{a['iterations']} iterations" if a.get("iterations") is not None else ""))
    ma = a.get("most_accurate") or {}
    return {
        "impl": a.get("impl", ""),
        "how": a.get("how", ""),
        "knob": knob or "-",
        "range": _fmt_range(a.get("range")) or "-",
        "top1": "-" if err.get("top1") is None else f"{err['top1']:.4f}",
        "max_abs": "-" if err.get("max_abs") is None else f"{err['max_abs']:.3g}",
        "local": "-" if err.get("local_max_abs") is None else f"{err['local_max_abs']:.3g}",
        "rounds": a.get("cost", {}).get("rounds", 0),
        "bytes": a.get("cost", {}).get("bytes", 0),
        "best_impl": ma.get("impl", ""),
        "best_rounds": ma.get("rounds", 0),
        "best_bytes": ma.get("bytes", 0),
        "candidates": a.get("candidates", 0),
    }


def inspect_json(plan: Plan) -> dict[str, Any]:
    """The machine-readable summary printed by ``siguard inspect --format json``."""
    plan = plan.with_owner_facts()
    crit, _ = critical_path_rounds(plan)
    d = plan.doc
    return {
        "plan_hash": d["plan_hash"],
        "protocol": d["protocol"],
        "protocol_version": d["protocol_version"],
        "frac_bits": d["frac_bits"],
        "model": d["model"],
        "inputs": [{"name": i["name"], "shape": i["shape"]} for i in d["inputs"]],
        "outputs": [{"name": o["name"], "shape": o["shape"], "reveal_to": o.get("reveal_to", "client")}
                    for o in d["outputs"]],
        "steps": [
            {"name": s.name, "op": s.op, "impl": s.impl.name, "impl_params": s.impl_params,
             "inputs": s.inputs, "outputs": s.outputs, "source": s.source,
             "rounds": s.cost["rounds"], "bytes": s.cost["bytes"],
             "bytes_per_party": s.cost["bytes_per_party"],
             **({"approx": s.approx} if s.approx else {}),
             **({"phases": s.cost["phases"]} if s.cost.get("phases") else {})}
            for s in plan.steps
        ],
        "approximation": d.get("approximation"),
        "totals": {**d["totals"], "critical_path_rounds": crit},
        "setup": d["setup"],
        "passes": d.get("passes", []),
        "warnings": d.get("warnings", []),
    }


def _op_summary(plan: Plan) -> list[dict[str, Any]]:
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for s in plan.steps:
        k = (s.op, s.impl.name)
        a = agg.setdefault(k, {"op": s.op, "impl": s.impl.name, "count": 0, "rounds": 0, "bytes": 0})
        a["count"] += 1
        a["rounds"] += s.cost["rounds"]
        a["bytes"] += s.cost["bytes"]
    total_r = max(1, plan.totals["rounds"])
    out = sorted(agg.values(), key=lambda a: (-a["rounds"], -a["bytes"]))
    for a in out:
        a["share"] = 100.0 * a["rounds"] / total_r
        a["mb"] = _mb(a["bytes"])
    return out


def render(plan: Plan, fmt: str = "text") -> str:
    """Render ``plan`` in one of :data:`FORMATS` (with the owner's facts where available)."""
    plan = plan.with_owner_facts()
    if fmt == "json":
        return json.dumps(inspect_json(plan), indent=1)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    crit, path = critical_path_rounds(plan)
    rows = _rows(plan)
    ctx = {
        "plan": plan.doc,
        "rows": rows,
        # step names are shown whole (a convolution and its truncation differ only at the end)
        "name_width": max([len("TOTAL (sum of steps)"), *(len(r["name"]) for r in rows)]),
        "ops": _op_summary(plan),
        "totals": plan.totals,
        "total_mb": _mb(plan.totals["bytes"]),
        "party_mb": [_mb(b) for b in plan.totals["bytes_per_party"]],
        "setup_mb": _mb(plan.doc["setup"]["bytes"]),
        "critical_rounds": crit,
        "critical_path": set(path),
        "edges": list(dataflow_graph(plan).edges()),
        "approximation": plan.doc.get("approximation"),
        "guards": [{"name": s.name, "impl": s.impl.name, **s.cost["phases"]} for s in plan.steps
                   if s.cost.get("phases")],
    }
    return _env().get_template(f"plan.{ 'txt' if fmt == 'text' else fmt }.j2").render(**ctx)
