"""``siguard bench PLAN``: run one plan between three parties and show where the time goes."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from siguard.core.errors import InputError

__all__ = ["register", "cmd_bench"]


def _bench_input(plan, path: str | None, seed: int) -> np.ndarray:
    """The user's .npy input, or uniform values in [0, 1) of the plan's input shape."""
    if path is not None:
        from siguard.cli import _load_npy

        return _load_npy(path)
    if len(plan.inputs) != 1:
        raise InputError(f"the plan has {len(plan.inputs)} inputs; give one with --input")
    shape = tuple(plan.inputs[0]["shape"])
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def cmd_bench(args: argparse.Namespace) -> int:
    from siguard.compiler.plan import Plan
    from siguard.runtime.local import run_threads
    from siguard.runtime.stats import format_breakdown, op_breakdown

    if args.repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {args.repeat}")
    plan = Plan.load(args.plan)
    x = _bench_input(plan, args.input, args.seed)
    if not args.no_warmup:
        run_threads(plan, x, timeout=args.timeout)
    runs = [run_threads(plan, x, timeout=args.timeout) for _ in range(args.repeat)]
    times = [r.stats["query_seconds"] for r in runs]
    median = statistics.median(times)
    result = min(runs, key=lambda r: abs(r.stats["query_seconds"] - median))
    totals = result.stats["totals"]
    rows = op_breakdown(plan, result.stats)
    mb = [b / 1e6 for b in totals["bytes_per_party"]]
    print(f"plan {args.plan}: {len(plan.steps)} steps, batch {plan.inputs[0]['shape'][0] if plan.inputs else '?'}")
    print(f"query (threads, median of {args.repeat}{'' if args.no_warmup else ' warm'}): {median:.3f} s, "
          f"{totals['rounds']} rounds, MB per party {' / '.join(f'{m:.2f}' for m in mb)}")
    print(format_breakdown(rows[: args.top] if args.top else rows))
    if args.json:
        doc = {"plan": str(args.plan), "seconds": median, "seconds_all": times, "rounds": totals["rounds"],
               "bytes_per_party": totals["bytes_per_party"], "breakdown": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``siguard bench`` to the main parser's subcommands."""
    b = subparsers.add_parser("bench", help="time a plan between three parties (threads) with a per-op breakdown",
                              description="Run PLAN between three in-process parties and a client, and print the "
                                          "query time (median of warm runs; weight sharing excluded), rounds, MB "
                                          "per party and the time, rounds and bytes of every op kind. The full "
                                          "side-by-side benchmark (models, modes, CrypTen) is benchmarks/run.py.")
    b.add_argument("plan")
    b.add_argument("--input", default=None, help=".npy input (default: uniform [0, 1) of the plan's input shape)")
    b.add_argument("--repeat", type=int, default=3, help="timed runs after a warm-up (default 3)")
    b.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    b.add_argument("--top", type=int, default=0, help="show only the N slowest op kinds (default all)")
    b.add_argument("--seed", type=int, default=0, help="seed of the default input (default 0)")
    b.add_argument("--json", default=None, help="also write the result as JSON to this file")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds a party waits for a peer (default 300)")
    b.set_defaults(func=cmd_bench)
