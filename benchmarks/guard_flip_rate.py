"""How often does the secure truncation's +-1 ulp change a guard decision? The tolerance of the secure-guard tests.

    python benchmarks/guard_flip_rate.py [--queries 200] [--seeds 1 2] [--out benchmarks/results/guard_flip_rate.json]

The secure truncation returns floor(x / 2^d) or one less, depending on the shares; the reference engine always
returns the floor. This script runs the default guard on the fixed-point reference engine twice per seed:
as is, and with each truncation's result lowered by a random 0 or 1 (numpy's generator: a simulation of the
error, nothing is secret here), on a trained target's logits and defender (Fashion-MNIST where installed,
else digits; the test suite's scenario), and counts the queries whose released vector differs (the default rounds
it to multiples of 2^-7, so a difference is a whole grid step: a candidate chosen differently, or a probability
within a few ulp of a grid point). tests/privacy/test_guard_secure.py takes its bound from this.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.core.errors import InputError  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "guard_flip_rate.json"


def main(argv: list[str] | None = None) -> int:
    from siguard.core.config import GuardConfig
    from siguard.passes.guard import guard_bounds
    from siguard.privacy.datasets import load_dataset
    from siguard.privacy.defender import DefenderWeights, export_defender, to_probabilities, train_defender
    from siguard.privacy.targets import export_onnx, make_mlp, predict_onnx, train_classifier
    from siguard.runtime.kernels.guard import secure_guard
    from siguard.runtime.kernels.plain import Clear, PlainEngine
    from siguard.runtime.ring import decode, encode

    ap = argparse.ArgumentParser(prog="python benchmarks/guard_flip_rate.py", description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    try:
        data = load_dataset("fashion-mnist")
    except InputError:
        data = load_dataset("digits")
    n = 1000 if data.name == "fashion-mnist" else 400
    order = np.random.default_rng(1).permutation(len(data.x))  # the split of tests/privacy/test_guard_secure.py
    members, reference, outsiders = order[:n], order[n : 2 * n], order[2 * n : 2 * n + 250]
    torch.manual_seed(0)
    model = train_classifier(make_mlp(data.input_shape, 10), data.x[members], data.y[members], epochs=150)
    with tempfile.TemporaryDirectory() as tmp:
        target = export_onnx(model, Path(tmp) / "target.onnx", data.input_shape)
        probs_m = to_probabilities(predict_onnx(target, data.x[members]))
        probs_r = to_probabilities(predict_onnx(target, data.x[reference]))
        module, _ = train_defender(probs_m, probs_r, seed=0)
        w = DefenderWeights.from_onnx(export_defender(module, Path(tmp) / "defender.onnx"))
        x = data.x[np.concatenate([members[:250], outsiders])][: args.queries]
        logits = predict_onnx(target, x).astype(np.float64)
    base = GuardConfig()
    cfg = GuardConfig.for_schedule(**guard_bounds(w, base))
    f = 16

    def guard(engine: PlainEngine) -> np.ndarray:
        args_ = [Clear(encode(a, f)) for a in (logits, w.W1.T, w.b1, w.W2.T, w.b2, w.w3.T, w.b3)]
        return decode(secure_guard(engine, *args_, config=cfg).v, f)

    exact = guard(PlainEngine(f))
    runs = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        floor = PlainEngine.trunc

        def trunc(self, x, bits, floor=floor, rng=rng):  # the secure error: floor or floor - 1
            y = floor(self, x, bits)
            if int(bits) == 0:
                return y
            return type(y)(y.v - torch.from_numpy(rng.integers(0, 2, tuple(y.v.shape))).to(torch.int64))

        PlainEngine.trunc = trunc
        try:
            noisy = guard(PlainEngine(f))
        finally:
            PlainEngine.trunc = floor
        flips = int((np.abs(exact - noisy).max(1) > 1e-9).sum())
        runs.append({"seed": seed, "queries": len(logits), "flips": flips,
                     "max_l1_difference": float(np.abs(exact - noisy).sum(1).max()),
                     "labels_kept": float((noisy.argmax(1) == logits.argmax(1)).mean())})
        print(f"seed {seed}: {flips} of {len(logits)} released vectors differ; max L1 difference "
              f"{runs[-1]['max_l1_difference']:.2e}; labels kept {runs[-1]['labels_kept']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": data.name, "config": cfg.oracle_options(), "runs": runs},
                                         indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
