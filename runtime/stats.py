"""Communication statistics of a secure run: per step, per party, and totals."""

from __future__ import annotations

from typing import Any

__all__ = ["summarize", "format_stats"]

CLIENT = 3


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
