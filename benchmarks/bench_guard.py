"""The guard's share of secure inference: ResNet (CIFAR-10 form) with and without the guard, one run.

    python benchmarks/bench_guard.py [--model resnet34] [--batch 1] [--repeat 1] [--rounds 6 --steps 49]
        [--guard-batch 32] [--out benchmarks/results/guard.json]

Compiles the same ONNX model twice (plain plan; plan with the guard after the logits), runs both
between three parties (threads mode) on the same input, and reports wall time, rounds and MB per
party of each, the guard's share of the guarded total next to the paper's (1.1 s of 4.39 s, 25 %),
and the guard's cost per query when ``--guard-batch`` queries share one run. A timing does not
depend on weight values, so the model and the defender have random weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.pipeline import CompileOptions, compile_model, write_plan  # noqa: E402
from compiler.plan import Plan  # noqa: E402
from privacy.defender import DefenderWeights  # noqa: E402
from runtime.local import run_threads  # noqa: E402
from tests.models import export, resnet_cifar  # noqa: E402

PAPER = {"guard_s": 1.1, "total_s": 4.39, "share": 1.1 / 4.39}


def _defender(k: int) -> DefenderWeights:
    g = torch.Generator().manual_seed(0)
    r = lambda *s, sd=0.1: (torch.randn(*s, generator=g, dtype=torch.float64) * sd).numpy()  # noqa: E731
    return DefenderWeights(W1=r(128, k, sd=0.3), b1=r(128), W2=r(64, 128), b2=r(64), w3=r(1, 64, sd=0.2), b3=r(1))


def _run(plan: Plan, x: np.ndarray, repeat: int):
    times, stats = [], None
    for _ in range(repeat):
        r = run_threads(plan, x, timeout=3600)
        times.append(r.seconds)
        stats = r.stats
    return statistics.median(times), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet34", choices=["resnet18", "resnet34"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=49)
    ap.add_argument("--guard-batch", type=int, default=32, help="batch for the per-query guard cost (0 = skip)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guard.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    guard_cfg = {"rounds": args.rounds, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx_path = work / f"{args.model}.onnx"
        export(resnet_cifar(int(args.model[6:])), onnx_path, torch.zeros(1, 3, 32, 32), opset=17, dynamic_batch=True)
        x = np.random.default_rng(0).uniform(0, 1, (args.batch, 3, 32, 32)).astype(np.float32)
        plans = {}
        for name, guard in (("plain", None), ("guarded", _defender(10))):
            t0 = time.perf_counter()
            res = compile_model(onnx_path, CompileOptions(batch=args.batch, guard=guard, guard_config=guard_cfg))
            write_plan(res, work / name)
            plans[name] = Plan.load(work / name)
            print(f"compiled {name} plan in {time.perf_counter() - t0:.1f} s: {plans[name].totals['rounds']} rounds",
                  flush=True)
        rows = {}
        for name, plan in plans.items():
            t, stats = _run(plan, x, args.repeat)
            rows[name] = {"seconds": t, "rounds": stats["totals"]["rounds"],
                          "mb_per_party": [b / 1e6 for b in stats["totals"]["bytes_per_party"]]}
            print(f"{name:8s} {t:8.2f} s {rows[name]['rounds']:7d} rounds "
                  f"{max(rows[name]['mb_per_party']):9.2f} MB/party", flush=True)
        guard_s = rows["guarded"]["seconds"] - rows["plain"]["seconds"]
        share = guard_s / rows["guarded"]["seconds"]
        result = {"model": args.model, "batch": args.batch, "guard_config": guard_cfg, "rows": rows,
                  "guard_seconds": guard_s, "guard_share": share, "paper": PAPER}
        if args.guard_batch:
            from runtime.guard import GuardConfig, secure_guard
            from runtime.ring import encode
            from runtime.rss import run_threads as run_parties

            d = _defender(10)
            ws = [d.W1.T, d.b1, d.W2.T, d.b2, d.w3.T, d.b3]
            z = np.random.default_rng(1).normal(0, 3, (args.guard_batch, 10))
            cfg = GuardConfig(**guard_cfg)

            def party(e):
                shared = [e.input("model", encode(w, 16) if e.party == 0 else None, w.shape) for w in ws]
                logits = e.input("P1", encode(z, 16) if e.party == 1 else None, z.shape)
                return e.reveal(secure_guard(e, logits, *shared, config=cfg), "P0")

            t0 = time.perf_counter()
            run_parties(party, None, timeout=3600)
            tb = time.perf_counter() - t0
            result["guard_batch"] = {"batch": args.guard_batch, "seconds": tb,
                                     "seconds_per_query": tb / args.guard_batch}
            print(f"guard alone at batch {args.guard_batch}: {tb:.2f} s, {tb / args.guard_batch:.3f} s per query")
    result["meta"] = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"), "mode": "threads"}
    print(f"\nguard: {guard_s:.2f} s of {rows['guarded']['seconds']:.2f} s = {100 * share:.1f} % "
          f"(paper: {PAPER['guard_s']} s of {PAPER['total_s']} s = {100 * PAPER['share']:.0f} %)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
