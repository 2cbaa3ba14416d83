"""The guard as the plan runs it (fixed-point reference executor = the secure parties' arithmetic),
audited like the float oracle: Fashion-MNIST (digits without it), 1000 members, 1000 non-members.

    python benchmarks/guard_fixed_point_audit.py [--seed 0] [--n 1000] [--out benchmarks/results/guard_fixed_point.json]

Prints, for plaintext outputs, the float oracle and the compiled plan: noise accepted, labels
kept, mean L1, and the shadow attacks' AUC and advantage |AUC - 0.5|.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.compiler.plan import Plan  # noqa: E402
from siguard.pipeline import CompileOptions, compile_model, write_plan  # noqa: E402
from siguard.privacy.attacks import EntropyAttack, MaxProbabilityAttack, NeuralAttack, label_only_gap, train_shadow  # noqa: E402
from siguard.privacy.datasets import FASHION_MNIST_DIR, load_dataset  # noqa: E402
from siguard.privacy.defender import DefenderWeights, export_defender, train_defender  # noqa: E402
from siguard.privacy.memguard import guard_reference, softmax  # noqa: E402
from siguard.privacy.targets import export_onnx, make_mlp, predict_onnx, train_classifier  # noqa: E402
from siguard.runtime.local import run_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guard_fixed_point.json"))
    args = ap.parse_args()
    name = "fashion-mnist" if FASHION_MNIST_DIR.exists() else "digits"
    data = load_dataset(name)
    n = min(args.n, len(data.x) // 6)
    order = np.random.default_rng(args.seed).permutation(len(data.x))  # data split only
    mem, non, ref, s_mem, s_non, s_ref = (order[i * n : (i + 1) * n] for i in range(6))
    target = train_classifier(make_mlp(data.input_shape, data.num_classes, seed=args.seed), data.x[mem], data.y[mem],
                              epochs=args.epochs, seed=args.seed)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(target, Path(tmp) / "target.onnx", data.input_shape)
        z_mem, z_non, z_ref = (predict_onnx(onnx_path, data.x[i]).astype(np.float64) for i in (mem, non, ref))
        module, report = train_defender(softmax(z_mem), softmax(z_ref), seed=args.seed)
        dpath = export_defender(module, Path(tmp) / "defender.onnx")
        defender = DefenderWeights.from_onnx(dpath)
        x = np.concatenate([data.x[mem], data.x[non]])
        logits = np.concatenate([z_mem, z_non])
        t0 = time.perf_counter()
        res = compile_model(onnx_path, CompileOptions(batch=len(x), guard=dpath))
        write_plan(res, Path(tmp) / "plan")
        plan = Plan.load(Path(tmp) / "plan")
        fixed = run_reference(plan, x).output
        fixed_seconds = time.perf_counter() - t0
    membership = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    labels = np.concatenate([data.y[mem], data.y[non]])
    shadow = train_shadow(data.x[s_mem], data.y[s_mem], data.x[s_non], input_shape=data.input_shape,
                          num_classes=data.num_classes, epochs=args.epochs, seed=args.seed + 1000,
                          x_reference=data.x[s_ref])
    attacks = {"neural": NeuralAttack(seed=args.seed), "max-prob": MaxProbabilityAttack(), "entropy": EntropyAttack()}
    for atk in attacks.values():
        atk.fit(shadow.plain_outputs(), shadow.membership)
    plain = softmax(logits)
    oracle = guard_reference(logits, defender, validator="margin", margin=0.1)
    for label, probs in (("plaintext", plain), ("float oracle", oracle.guarded), ("compiled plan", fixed)):
        l1 = np.abs(probs - plain).sum(1)
        rows[label] = {
            "noised": float((l1 > 2e-3).mean()),
            "labels_kept": float((probs.argmax(1) == logits.argmax(1)).mean()),
            "mean_l1": float(l1.mean()),
            "attacks": {k: a.evaluate(probs, membership).to_dict() for k, a in attacks.items()},
        }
    gap = label_only_gap(plain, labels, membership).to_dict()
    print(f"{name}: target train/test {float((z_mem.argmax(1) == data.y[mem]).mean()):.3f}/"
          f"{float((z_non.argmax(1) == data.y[non]).mean()):.3f}; defender validation {report.val_accuracy:.3f}; "
          f"oracle accepted {oracle.accepted.mean():.3f}; compiled plan ran {len(x)} queries in {fixed_seconds:.0f} s")
    print(f"{'':15s} {'noised':>7s} {'labels':>7s} {'L1':>7s} {'neural AUC':>10s} {'adv':>6s} {'maxprob':>8s} "
          f"{'entropy':>8s}")
    for label, r in rows.items():
        a = r["attacks"]
        print(f"{label:15s} {r['noised']:7.3f} {r['labels_kept']:7.3f} {r['mean_l1']:7.4f} {a['neural']['auc']:10.3f} "
              f"{a['neural']['advantage']:6.3f} {a['max-prob']['auc']:8.3f} {a['entropy']['auc']:8.3f}")
    print(f"label-only gap attack (floor): AUC {gap['auc']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": name, "n": n, "seed": args.seed, "rows": rows, "label_only_gap": gap,
                               "oracle_accepted": float(oracle.accepted.mean()), "fixed_seconds": fixed_seconds},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
