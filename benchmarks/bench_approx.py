"""The calibrated approximation pass against fixed global configurations, on digits models with a softmax head.

    python benchmarks/bench_approx.py [--calibration 256] [--out benchmarks/results/approx.json]

For the digits MLP and CNN of tests/models.py (trained by the product's loop) with a softmax head,
compiles four plans at the held-out set's batch size: ``default`` (each op's default
implementation), ``crypten`` (CrypTen's defaults: softmax by limit-8 exp and 10 Newton steps from
3 exp(1 - 2x) + 0.003), ``exact`` (the most accurate candidates) and ``auto`` (the approximation
pass: calibrated on the first ``--calibration`` training images, default budget top-1 >= 99.5 %
and max change <= 1e-2). Each plan runs on the fixed-point reference executor over the 540
held-out test images (not the calibration data); the table gives total rounds and bytes of the
plan (from the cost model = the protocol), top-1 agreement and max absolute difference against
onnxruntime, the compile time, and the softmax implementation chosen.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.pipeline import CompileOptions, compile_model  # noqa: E402
from siguard.runtime.local import run_reference  # noqa: E402

CONFIGS = ("default", "crypten", "exact", "auto")


def _models(tmp: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    import torch
    from torch import nn

    from tests.models import export, train_digits_cnn, train_digits_mlp

    mlp = export(nn.Sequential(train_digits_mlp(), nn.Softmax(dim=1)), tmp / "mlp_softmax.onnx", torch.zeros(1, 64),
                 opset=17, dynamic_batch=True)
    cnn = export(nn.Sequential(train_digits_cnn(), nn.Softmax(dim=1)), tmp / "cnn_softmax.onnx",
                 torch.zeros(1, 1, 8, 8), opset=13, dynamic_batch=True, fold_constants=False)
    return {"digits MLP + softmax": (mlp, (-1, 64)), "digits CNN + softmax": (cnn, (-1, 1, 8, 8))}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, default=256, help="number of training images to calibrate on")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "approx.json"))
    args = ap.parse_args(argv)

    from tests.models import digits

    x_train, _, x_test, _ = digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, (path, shape) in _models(Path(tmp)).items():
            cal = x_train[: args.calibration].reshape(shape)
            held = x_test.reshape(shape)
            want = _ort(path, held)
            for config in CONFIGS:
                t0 = time.perf_counter()
                res = compile_model(path, CompileOptions(batch=len(held), calibration=cal, approx=config))
                seconds = time.perf_counter() - t0
                got = run_reference(res.plan, held, res.weights).output
                soft = [s for s in res.plan.steps if s.op == "softmax"]
                rows.append({
                    "model": model,
                    "config": config,
                    "rounds": res.plan.totals["rounds"],
                    "bytes": res.plan.totals["bytes"],
                    "top1_vs_onnxruntime": float((got.argmax(1) == want.argmax(1)).mean()),
                    "max_abs_vs_onnxruntime": float(np.abs(got - want).max()),
                    "compile_seconds": round(seconds, 2),
                    "softmax": soft[0].approx["impl"] if soft else None,
                    "softmax_rounds": soft[0].cost["rounds"] if soft else None,
                })
    head = ("model", "config", "rounds", "MB", "top-1", "max |d|", "compile s")
    print("{:22s} {:8s} {:>7s} {:>8s} {:>7s} {:>9s} {:>9s}  softmax".format(*head))
    for r in rows:
        print(f"{r['model']:22s} {r['config']:8s} {r['rounds']:7d} {r['bytes'] / 1e6:8.3f} "
              f"{r['top1_vs_onnxruntime']:7.4f} {r['max_abs_vs_onnxruntime']:9.2e} {r['compile_seconds']:9.2f}  "
              f"{r['softmax']} ({r['softmax_rounds']} rounds)")
    summary = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        cut = 1.0 - by["auto"]["rounds"] / by["crypten"]["rounds"]
        summary[model] = {"rounds_crypten": by["crypten"]["rounds"], "rounds_auto": by["auto"]["rounds"],
                          "rounds_cut_vs_crypten": round(cut, 4), "top1_auto": by["auto"]["top1_vs_onnxruntime"]}
        print(f"{model}: rounds {by['crypten']['rounds']} (CrypTen defaults) -> {by['auto']['rounds']} "
              f"(calibrated), {100 * cut:.1f} % fewer; top-1 agreement {by['auto']['top1_vs_onnxruntime']:.4f} "
              f"on {len(x_test)} held-out images")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "calibration_inputs": args.calibration,
                               "held_out_inputs": len(x_test), "machine": platform.platform()}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
