"""Communication statistics of a secure run: per step, per party, and totals."""

from __future__ import annotations

from typing import Any

from siguard.compiler.plan import Plan
from siguard.runtime.mpc.transport import CLIENT

__all__ = ["summarize", "format_stats", "op_breakdown", "format_breakdown"]



def summarize(per_party: list[dict[str, Any]], step_order: list[str]) -> dict[str, Any]:
    """Merge the transports' per-step counters of parties 0..3 into one report.

    ``rounds`` of a step is the largest count among the servers (every server takes part in
    every round); bytes are payload bytes sent, per server, plus the client's. Steps whose name
    starts with ``setup`` (key agreement, weight sharing: once per server start) are reported
    apart from the per-query totals."""
    names = list(step_order)
    for stats in per_party:
        for n in stats:
            if n not in names:
                names.append(n)
    steps = []
    for n in names:
        rounds = max((per_party[p][n].rounds for p in range(3) if n in per_party[p]), default=0)
        sent = [per_party[p][n].payload_bytes if n in per_party[p] else 0 for p in range(3)]
        client = per_party[CLIENT][n].payload_bytes if len(per_party) > CLIENT and n in per_party[CLIENT] else 0
        if rounds == 0 and not any(sent) and not client:
            continue
        received = [
            sum(per_party[p][n].received.values()) if p < len(per_party) and n in per_party[p] else 0 for p in range(4)
        ]
        steps.append(
            {
                "name": n,
                "rounds": rounds,
                "bytes_per_party": sent,
                "bytes": max(sent),
                "client_bytes": client,
                "received_per_party": received,
            }
        )
    query = [s for s in steps if not s["name"].startswith("setup")]
    setup = [s for s in steps if s["name"].startswith("setup")]

    def total(rows):
        per = [sum(r["bytes_per_party"][p] for r in rows) for p in range(3)]
        return {
            "rounds": sum(r["rounds"] for r in rows),
            "bytes_per_party": per,
            "bytes": max(per, default=0),
            "client_bytes": sum(r["client_bytes"] for r in rows),
        }

    return {"steps": steps, "totals": total(query), "setup": total(setup)}


def format_stats(stats: dict[str, Any], top: int | None = None) -> str:
    """A readable table of rounds and MB per party per step, then totals."""
    rows = stats["steps"]
    lines = [f"{'step':40s} {'rounds':>7s} {'P0 MB':>9s} {'P1 MB':>9s} {'P2 MB':>9s} {'client MB':>9s}"]
    shown = sorted(rows, key=lambda r: -r["rounds"])[:top] if top else rows
    for r in shown:
        b = r["bytes_per_party"]
        lines.append(
            f"{r['name'][:40]:40s} {r['rounds']:7d} {b[0] / 1e6:9.4f} {b[1] / 1e6:9.4f} {b[2] / 1e6:9.4f} "
            f"{r['client_bytes'] / 1e6:9.4f}"
        )
    for label in ("totals", "setup"):
        t = stats[label]
        b = t["bytes_per_party"]
        name = "TOTAL per query" if label == "totals" else "set-up (once per server start)"
        lines.append(
            f"{name:40s} {t['rounds']:7d} {b[0] / 1e6:9.4f} {b[1] / 1e6:9.4f} {b[2] / 1e6:9.4f} "
            f"{t['client_bytes'] / 1e6:9.4f}"
        )
    return "\n".join(lines)


def op_breakdown(plan: Plan, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a secure run's time goes: the per-step rows of ``stats`` (from :func:`siguard.runtime.local.run_threads`)
    summed per (op, impl) of the plan, slowest first. Each row: op, impl, steps, seconds, share
    (of the steps' total seconds), rounds, bytes (busiest party)."""
    comm = {row["name"]: row for row in stats.get("steps", [])}
    seconds = stats.get("step_seconds", {})
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for step in plan.steps:
        key = (step.op, step.impl.name)
        row = comm.get(step.name, {})  # local steps have no communication row
        a = agg.setdefault(key, {"op": key[0], "impl": key[1], "steps": 0, "seconds": 0.0, "rounds": 0, "bytes": 0})
        a["steps"] += 1
        a["seconds"] += float(seconds.get(step.name, row.get("seconds", 0.0)))
        a["rounds"] += int(row.get("rounds", 0))
        a["bytes"] += int(row.get("bytes", 0))
    total = sum(a["seconds"] for a in agg.values()) or 1.0
    rows = sorted(agg.values(), key=lambda a: -a["seconds"])
    for a in rows:
        a["share"] = a["seconds"] / total
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """:func:`op_breakdown` as a text table."""
    lines = [f"{'op':14s} {'impl':14s} {'steps':>5s} {'seconds':>9s} {'share':>6s} {'rounds':>7s} {'MB/party':>9s}"]
    for a in rows:
        lines.append(
            f"{a['op'][:14]:14s} {a['impl'][:14]:14s} {a['steps']:5d} {a['seconds']:9.3f} {100 * a['share']:5.1f}% "
            f"{a['rounds']:7d} {a['bytes'] / 1e6:9.3f}"
        )
    return "\n".join(lines)
