"""Per-round cost of the secure engine in threads mode: mul, msb, trunc, mul_bit and the guard.

    python benchmarks/bench_rounds.py [--batches 1 64] [--repeat 3] [--iters 400] [--guard-steps 10]
                                      [--out benchmarks/results/rounds.json]

Each primitive runs ``--iters`` times back to back between the three server threads of
:func:`siguard.runtime.mpc.inprocess.run_threads` (after a warm-up), on a secret of shape (batch, 10) -- the guard's
logits shape; the table gives wall microseconds per protocol round at P0 (best of ``--repeat``
runs: on a shared machine the minimum is the stable statistic; the JSON records the load average
before and after, as other processes on the cores change the numbers by 2-3x). "ping" is the
transport alone (every server passes a (batch, 10) tensor around the ring once per round). The guard row
runs :func:`siguard.runtime.kernels.guard.secure_guard` with one outer round of ``--guard-steps`` inner steps on
the defender shape of the design (k = 10 -> 128 -> 64 -> 1); "guard step" is the cost of one
inner step, from the difference between ``--guard-steps`` and 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.core.config import GuardConfig  # noqa: E402
from siguard.passes.guard import guard_bounds  # noqa: E402
from siguard.privacy.defender import DefenderWeights  # noqa: E402
from siguard.runtime.kernels.guard import secure_guard  # noqa: E402
from siguard.runtime.mpc.inprocess import run_threads  # noqa: E402
from siguard.runtime.ring import encode  # noqa: E402

K = 10


def _secret(e, batch: int):
    rng = np.random.default_rng(1)
    x = encode(rng.normal(0, 3, (batch, K)), e.frac_bits)
    return e.input("model", x if e.party == 0 else None, (batch, K))


def _primitive(name: str, batch: int, iters: int) -> tuple[float, int]:
    """(seconds at P0 for ``iters`` calls after warm-up, rounds per call)."""

    def party(e):
        x = _secret(e, batch)
        bits = e.msb(x)
        t = e.transport
        ops = {
            "ping": lambda: t.exchange({e.prev: x.a}, {e.next: tuple(x.shape)}),
            "mul": lambda: e.mul(x, x),
            "trunc": lambda: e.trunc(x, 16),
            "msb": lambda: e.msb(x),
            "mul_bit": lambda: e.mul_bit(x, bits),
        }
        op = ops[name]
        for _ in range(max(20, iters // 10)):
            op()
        r0 = t.total().rounds
        t0 = time.perf_counter()
        for _ in range(iters):
            op()
        return time.perf_counter() - t0, t.total().rounds - r0

    res, _, _ = run_threads(party, timeout=600)
    seconds, rounds = res[0]
    return seconds, rounds // iters


def _guard(batch: int, steps: int) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    shapes = [(K, 128), (128,), (128, 64), (64,), (64, 1), (1,)]
    scales = [0.3, 0.1, 0.1, 0.1, 0.2, 0.1]
    weights = [rng.normal(0, s, shape) for s, shape in zip(scales, shapes, strict=True)]
    z = rng.normal(0, 3, (batch, K))
    cfg = GuardConfig(rounds=1, steps=steps)
    d = DefenderWeights(weights[0].T, weights[1], weights[2].T, weights[3], weights[4].T, weights[5])
    cfg = replace(cfg, **guard_bounds(d, cfg))  # the public bounds a compiled plan carries (the guard pass's)

    def party(e):
        ws = [e.input("model", encode(w, 16) if e.party == 0 else None, w.shape) for w in weights]
        x = e.input("P1", encode(z, 16) if e.party == 1 else None, z.shape)
        r0 = e.transport.total().rounds
        t0 = time.perf_counter()
        e.reveal(secure_guard(e, x, *ws, config=cfg), "P0")
        return time.perf_counter() - t0, e.transport.total().rounds - r0

    res, _, _ = run_threads(party, timeout=600)
    return res[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--guard-steps", type=int, default=10)
    ap.add_argument("--ops", nargs="+", default=["ping", "mul", "trunc", "msb", "mul_bit", "guard"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rounds.json")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    rows = []
    print(f"{'op':<12}{'batch':>6}{'rounds':>8}{'us/round':>10}{'ms/call':>10}")
    for batch in args.batches:
        for name in args.ops:
            if name == "guard":
                best = min((_guard(batch, args.guard_steps) for _ in range(args.repeat)), key=lambda r: r[0])
                short = min((_guard(batch, 2) for _ in range(args.repeat)), key=lambda r: r[0])
                seconds, rounds = best
                per_step = (seconds - short[0]) / (args.guard_steps - 2)
                step_rounds = (rounds - short[1]) // (args.guard_steps - 2)
                row = {"op": "guard", "batch": batch, "steps": args.guard_steps, "rounds": rounds,
                       "us_per_round": 1e6 * seconds / rounds, "seconds": seconds,
                       "step_rounds": step_rounds, "step_ms": 1e3 * per_step}
                rows.append(row)
                print(f"{'guard':<12}{batch:>6}{rounds:>8}{row['us_per_round']:>10.1f}{1e3 * seconds:>10.1f}")
                print(f"{'guard step':<12}{batch:>6}{step_rounds:>8}{1e6 * per_step / step_rounds:>10.1f}"
                      f"{1e3 * per_step:>10.2f}")
                continue
            seconds, per_call = min((_primitive(name, batch, args.iters) for _ in range(args.repeat)),
                                    key=lambda r: r[0])
            us = 1e6 * seconds / (args.iters * per_call)
            rows.append({"op": name, "batch": batch, "rounds": per_call, "us_per_round": us,
                         "iters": args.iters, "seconds": seconds})
            print(f"{name:<12}{batch:>6}{per_call:>8}{us:>10.1f}{1e3 * seconds / args.iters:>10.3f}")
    doc = {
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "repeat": args.repeat,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
