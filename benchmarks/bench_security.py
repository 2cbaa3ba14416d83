"""What the defences against a malicious client cost.

    python benchmarks/bench_security.py [--repeat 5] [--out benchmarks/results/security.json]

1. Fresh weight shares: :meth:`siguard.runtime.mpc.rss.RSSEngine.rerandomise` of the weights at a session start
   (one common-key AES word and one add per weight at each server; 0 rounds, 0 bytes), for the weight
   counts of the digits MLP, ResNet-18 and ResNet-34 (CIFAR form). Median seconds of ``--repeat``.
2. The client input step: rounds and bytes per party from the cost model (share 1 round, consistency
   check 1, clamp 11), and the wall time of one input step in lockstep mode with and without the check
   and the clamp, for input shapes (1, 64), (1, 3, 32, 32) and (8, 3, 32, 32). Median of ``--repeat``.
Prints a table and writes JSON; the load (``os.getloadavg``) is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.runtime.kernels.cost import CostEngine  # noqa: E402
from siguard.runtime.kernels.inputs import client_input  # noqa: E402
from siguard.runtime.mpc.inprocess import run_threads  # noqa: E402
from siguard.runtime.mpc.prg import PartyKeys, new_key  # noqa: E402
from siguard.runtime.mpc.rss import RSSEngine, ServerInput  # noqa: E402
from siguard.runtime.mpc.transport import InProcessNetwork  # noqa: E402

WEIGHTS = {"digits MLP": 64 * 64 + 64 * 32 + 32 * 10, "ResNet-18": 11_173_962, "ResNet-34": 21_282_122}
SHAPES = [(1, 64), (1, 3, 32, 32), (8, 3, 32, 32)]


def _rerandomise_seconds(n: int, repeat: int) -> float:
    keys = PartyKeys(0, own=new_key(), next_key=new_key(), common=new_key())
    net = InProcessNetwork(4)
    engine = RSSEngine(0, net.transport(0), keys.session("bench"), 16)
    w = ServerInput(torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), 2)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine.rerandomise(w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _input_seconds(shape: tuple[int, ...], checked: bool, repeat: int) -> float:
    x = torch.zeros(shape, dtype=torch.int64)
    bound = (-(1 << 46), 1 << 46)

    def party(e):
        t0 = time.perf_counter()
        for _ in range(repeat):
            if checked:
                client_input(e, None, shape, bound)
            else:
                e.transport.exchange({}, {3: (2, *shape)})  # the share round alone
        return (time.perf_counter() - t0) / repeat

    def client(c):
        for _ in range(repeat):
            c.share_input(x)

    results, _, _ = run_threads(party, client, scheduler="lockstep")
    return max(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "security.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows_w = []
    print(f"{'weights':14s} {'count':>12s} {'rerandomise (s)':>16s}")
    for name, n in WEIGHTS.items():
        s = _rerandomise_seconds(n, args.repeat)
        rows_w.append({"model": name, "weights": n, "seconds": s})
        print(f"{name:14s} {n:12d} {s:16.4f}")
    rows_i = []
    print(f"\n{'input shape':16s} {'rounds':>6s} {'B/party (P0,P1,P2)':>24s} {'plain (ms)':>11s} "
          f"{'checked+clamped (ms)':>21s}")
    for shape in SHAPES:
        e = CostEngine(16)
        client_input(e, None, shape, (0, 0))
        plain = _input_seconds(shape, False, args.repeat)
        checked = _input_seconds(shape, True, args.repeat)
        row = {"shape": list(shape), "rounds": e.total["rounds"], "bytes_per_party": e.total["bytes_per_party"],
               "client_bytes": e.total["client_bytes"], "plain_seconds": plain, "checked_seconds": checked}
        rows_i.append(row)
        print(f"{str(shape):16s} {row['rounds']:6d} {str(row['bytes_per_party']):>24s} {1e3 * plain:11.2f} "
              f"{1e3 * checked:21.2f}")
    doc = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "load_before": load_before, "load_after": os.getloadavg(), "repeat": args.repeat,
           "rerandomise": rows_w, "client_input": rows_i}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nload average {load_before[0]:.1f} -> {doc['load_after'][0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
