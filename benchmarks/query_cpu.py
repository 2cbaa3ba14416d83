"""CPU seconds per warm secure query, a measure that other jobs on a shared machine barely disturb.

    python benchmarks/query_cpu.py PLAN --shape 1 3 32 32 [--queries 4] [--json out.json]

The three parties run as greenlets in this one OS thread (``lockstep``) with one torch thread, so
the process's user + system CPU time is the work of all three parties and nothing else. One run
with 1 query and one with ``--queries`` (both after a warm-up run) give the CPU time per warm query
as the difference over ``queries - 1`` (key set-up and weight sharing cancel out). Wall times under
load are printed too, with the load average, but only the CPU time is comparable across runs on a
busy machine. On an idle 2-core machine the threads-mode query time is roughly between half and all
of this CPU time (the parties' products overlap on two cores; rounds add latency).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--shape", nargs="+", type=int, required=True)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    from siguard.compiler.plan import Plan
    from siguard.runtime.linalg import cpu_profile
    from siguard.runtime.local import run_threads

    torch.set_num_threads(1)
    plan = Plan.load(args.plan)
    x = np.random.default_rng(0).uniform(0.0, 1.0, tuple(args.shape)).astype(np.float32)
    run_threads(plan, x, scheduler="lockstep", queries=1, timeout=3600)  # warm-up
    c0 = _cpu()
    run_threads(plan, x, scheduler="lockstep", queries=1, timeout=3600)
    c1 = _cpu()
    r = run_threads(plan, x, scheduler="lockstep", queries=args.queries, timeout=3600)
    c2 = _cpu()
    per_query = ((c2 - c1) - (c1 - c0)) / (args.queries - 1)
    out = {
        "plan": args.plan,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "ring_gemm": cpu_profile()["backend"],
        "cpu_seconds_per_query": round(per_query, 3),
        "wall_seconds_lockstep": [round(v, 3) for v in r.stats["query_seconds_all"]],
        "load": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
