"""Secure inference benchmark: SIGuard threads mode against onnxruntime's plaintext time, same run.

    python benchmarks/bench_secure.py [--models mlp cnn resnet18] [--batches 1 8] [--repeat 3] [--out results.json]

Prints a table (wall time, rounds, MB per party, onnxruntime time, MPC overhead = ratio) and
writes the rows as JSON. Times are medians of ``--repeat`` warm runs. Models are built in the
script (digits MLP and CNN trained on scikit-learn's digits; ResNet-18 in its CIFAR-10 form with
random weights, which is all a timing needs).
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
from runtime.local import run_threads  # noqa: E402
from tests.models import export, resnet_cifar, train_digits_cnn, train_digits_mlp  # noqa: E402


def _models(names, work: Path):
    for name in names:
        path = work / f"{name}.onnx"
        if name == "mlp":
            export(train_digits_mlp(), path, torch.zeros(1, 64), opset=17, dynamic_batch=True)
            yield name, path, (64,)
        elif name == "cnn":
            export(train_digits_cnn(), path, torch.zeros(1, 1, 8, 8), opset=17, dynamic_batch=True)
            yield name, path, (1, 8, 8)
        elif name in ("resnet18", "resnet34"):
            export(resnet_cifar(int(name[6:])), path, torch.zeros(1, 3, 32, 32), opset=17, dynamic_batch=True)
            yield name, path, (3, 32, 32)
        else:
            raise SystemExit(f"unknown model {name}")


def _ort_time(path: Path, x: np.ndarray, repeat: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(max(repeat, 5)):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "secure.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, path, shape in _models(args.models, work):
            for batch in args.batches:
                res = compile_model(path, CompileOptions(batch=batch))
                write_plan(res, work / f"{name}-{batch}")
                plan = Plan.load(work / f"{name}-{batch}")
                x = np.random.default_rng(0).uniform(0, 1, (batch, *shape)).astype(np.float32)
                run_threads(plan, x, timeout=600)  # warm-up
                times, stats = [], None
                for _ in range(args.repeat):
                    r = run_threads(plan, x, timeout=600)
                    times.append(r.seconds)
                    stats = r.stats
                ort_t = _ort_time(path, x, args.repeat)
                t = statistics.median(times)
                mb = [b / 1e6 for b in stats["totals"]["bytes_per_party"]]
                row = {"model": name, "batch": batch, "mode": "threads", "seconds": t,
                       "rounds": stats["totals"]["rounds"],
                       "mb_per_party": mb, "ort_seconds": ort_t, "overhead": t / ort_t,
                       "plan_rounds": plan.totals["rounds"]}
                rows.append(row)
                print(f"{name:9s} b={batch:<3d} {t:8.3f} s  {row['rounds']:6d} rounds  "
                      f"{max(mb):9.3f} MB/party  ort {ort_t * 1e3:8.3f} ms  x{row['overhead']:.0f}", flush=True)
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print("| model | batch | SIGuard threads (s) | rounds | MB/party (max) | onnxruntime (ms) | MPC overhead |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['seconds']:.3f} | {r['rounds']} | {max(r['mb_per_party']):.2f} | "
              f"{r['ort_seconds'] * 1e3:.2f} | {r['overhead']:.0f}x |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
