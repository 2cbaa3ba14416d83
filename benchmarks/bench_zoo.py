"""Secure inference on graphs nobody here wrote: the light model zoo's ResNet-50 (from the installed
``onnx`` package) and MobileNetV3-small (torchvision's architecture rebuilt with torch.nn, random
weights, recalibrated BatchNorm), batch 1, three parties.

    python benchmarks/bench_zoo.py [--models resnet50 mobilenet_v3_small] [--repeat 3]
        [--modes threads] [--out benchmarks/results/zoo.json]

Prints one row per model and mode: median query time over ``--repeat`` runs (after the weights were
shared), rounds, MB sent per party, the largest difference to onnxruntime, and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.pipeline import CompileOptions, compile_model  # noqa: E402
from siguard.runtime.local import run_threads  # noqa: E402


def _model(name: str, workdir: Path) -> tuple[str, tuple[int, ...]]:
    if name == "resnet50":
        path = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
        return str(path), (1, 3, 224, 224)
    if name == "mobilenet_v3_small":
        import torch

        from tests.compiler.test_secure_wild_models import _export, _recalibrated, mobilenet_v3_small

        torch.manual_seed(0)
        shape = (1, 3, 224, 224)
        return _export(_recalibrated(mobilenet_v3_small(), shape), workdir / "mnv3.onnx", shape), shape
    raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_small"])
    ap.add_argument("--modes", nargs="+", default=["threads"], choices=["threads", "lockstep"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo.json"))
    args = ap.parse_args()
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path, shape = _model(name, Path(tmp))
            res = compile_model(path, CompileOptions(batch=1))
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            for mode in args.modes:
                times, loads = [], []
                for _ in range(args.repeat):
                    loads.append(os.getloadavg()[0])
                    run = run_threads(res.plan, x, res.weights, timeout=600, scheduler=mode)
                    times.append(run.stats["query_seconds"])
                totals = run.stats["totals"]
                rows.append({
                    "model": name, "batch": 1, "mode": mode, "seconds_median": statistics.median(times),
                    "seconds_all": times, "rounds": totals["rounds"],
                    "mb_per_party": [round(b / 1e6, 1) for b in totals["bytes_per_party"]],
                    "max_abs_diff_vs_onnxruntime": float(np.abs(run.output - want).max()),
                    "load_average_1min": loads,
                })  # fmt: skip
    print(f"{'model':20s} {'mode':9s} {'s (median)':>10s} {'rounds':>7s} {'MB per party (P0/P1/P2)':>26s} "
          f"{'max |diff|':>10s} load")  # fmt: skip
    for r in rows:
        mb = "/".join(f"{m:.1f}" for m in r["mb_per_party"])
        print(f"{r['model']:20s} {r['mode']:9s} {r['seconds_median']:10.2f} {r['rounds']:7d} {mb:>26s} "
              f"{r['max_abs_diff_vs_onnxruntime']:10.1e} {statistics.median(r['load_average_1min']):.1f}")
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
