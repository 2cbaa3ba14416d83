"""``siguard demo``: the whole pipeline on bundled real data, in one command.

Today's story: train a target model on real data, export it to ONNX, compile it, run secure
inference between three parties and compare with onnxruntime. (The membership-inference audit
with and without the guard extends this story; see the README's roadmap.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]


def run_demo(dataset: str = "digits", out_dir: str | Path = "siguard-demo", queries: int = 200,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the numbers it prints."""
    from compiler.pipeline import CompileOptions, compile_model, write_plan
    from compiler.plan import Plan
    from runtime.local import run_threads

    from .datasets import load_dataset
    from .targets import export_onnx, make_mlp, predict_onnx, train_classifier

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_dataset(dataset)
    rng = np.random.default_rng(0)  # data split only; never used for shares or masks
    order = rng.permutation(len(data.x))
    n_train = min(1000, len(order) // 2)
    train, test = order[:n_train], order[n_train:]
    log(f"[1/4] training a {dataset} MLP on {n_train} images …")
    model = train_classifier(make_mlp(data.input_shape, data.num_classes), data.x[train], data.y[train], epochs=40)
    onnx_path = export_onnx(model, out / "target.onnx", data.input_shape)
    q = test[:queries]
    x, y = data.x[q], data.y[q]
    plain = predict_onnx(onnx_path, x)
    log(f"[2/4] compiling {onnx_path} for a batch of {len(q)} queries …")
    res = compile_model(onnx_path, CompileOptions(batch=len(q)))
    plan_dir = write_plan(res, out / "plan")
    plan = Plan.load(plan_dir)
    log(f"[3/4] secure inference between P0, P1, P2 (threads): {plan.totals['rounds']} rounds …")
    secure = run_threads(plan, x, timeout=600)
    log("[4/4] comparing with onnxruntime …")
    s = secure.output
    summary = {
        "dataset": dataset,
        "queries": int(len(q)),
        "accuracy_plain": float((plain.argmax(1) == y).mean()),
        "accuracy_secure": float((s.argmax(1) == y).mean()),
        "top1_agreement": float((plain.argmax(1) == s.argmax(1)).mean()),
        "max_logit_error": float(np.abs(plain - s).max()),
        "secure_seconds": secure.seconds,
        "rounds": secure.stats["totals"]["rounds"],
        "mb_per_party": [b / 1e6 for b in secure.stats["totals"]["bytes_per_party"]],
        "plan": str(plan_dir),
        "total_seconds": time.perf_counter() - t_start,
    }
    mb = summary["mb_per_party"]
    log("")
    log(f"{'':24s} {'plaintext (onnxruntime)':>24s} {'secure (3 parties)':>20s}")
    log(f"{'label accuracy':24s} {summary['accuracy_plain']:24.3f} {summary['accuracy_secure']:20.3f}")
    log(f"{'top-1 agreement':24s} {'':24s} {summary['top1_agreement']:20.3f}")
    log(f"{'max |logit error|':24s} {'':24s} {summary['max_logit_error']:20.2e}")
    log(f"{'time (s)':24s} {'':24s} {summary['secure_seconds']:20.3f}")
    log(f"{'rounds':24s} {'':24s} {summary['rounds']:20d}")
    log(f"{'MB sent per party':24s} {'':24s} {' / '.join(f'{m:.2f}' for m in mb):>20s}")
    log("")
    log(f"plan and reports: {plan_dir} (siguard inspect {plan_dir})")
    return summary
