"""The fixed cost of one protocol round in threads mode: sequential 1-element multiplications.

    python benchmarks/round_cost.py [--rounds 10000] [--repeat 3] [--schedulers threads lockstep]
        [--out benchmarks/results/round_cost.json]

Three servers (threads, or greenlets in one thread with ``lockstep``) run ``--rounds`` dependent
1-element secret x secret multiplications
(each waits for the previous one: one round each) and, for comparison, as many bare exchange
rounds (a 1-word message around the ring, no protocol arithmetic). Reports microseconds per
round (median of ``--repeat`` runs), wall and CPU (user + system time of the whole process, which
a busy machine disturbs less than wall time), so changes to the transport, the thread synchronisation and
the per-call overhead of :mod:`siguard.runtime.mpc.rss` can be judged before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.runtime.mpc.inprocess import run_threads  # noqa: E402


def _measure(kind: str, rounds: int, scheduler: str = "threads") -> tuple[float, float]:
    """(wall, CPU) microseconds per round; CPU is the whole process's user + system time."""
    c0 = time.process_time()
    res = _run(kind, rounds, scheduler)
    return res / rounds * 1e6, (time.process_time() - c0) / rounds * 1e6


def _run(kind: str, rounds: int, scheduler: str = "threads") -> float:
    def party(e):
        x = e.input("P0", torch.tensor([3]) if e.party == 0 else None, (1,))
        one = torch.ones(1, dtype=torch.int64)
        t0 = time.perf_counter()
        if kind == "mul":
            for _ in range(rounds):
                x = e.mul(x, x)
        elif kind == "trunc":
            for _ in range(rounds // 2):
                x = e.trunc(x, 1)
        else:
            tr = e.transport
            for _ in range(rounds):
                tr.exchange({e.prev: one}, {e.next: (1,)})
        return time.perf_counter() - t0

    res, _, _ = run_threads(party, None, timeout=120, scheduler=scheduler)
    return max(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval before running (seconds; default: leave as is)")
    ap.add_argument("--schedulers", nargs="+", choices=("threads", "lockstep"), default=["threads", "lockstep"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(f"switch interval {sys.getswitchinterval() * 1e6:.0f} us")
    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    for scheduler in args.schedulers:
        for kind in ("exchange", "mul", "trunc"):
            runs = [_measure(kind, args.rounds, scheduler) for _ in range(args.repeat)]
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            out.setdefault(scheduler, {})[kind] = {"wall_us": wall, "cpu_us": cpu}
            print(f"{scheduler:8s} {kind:9s} {wall:7.1f} us per round (wall), {cpu:7.1f} us CPU", flush=True)
    if args.out:
        meta = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "us_per_round": out}, indent=1))


if __name__ == "__main__":
    main()
