"""``siguard demo``: the paper's two claims on real data, in one command.

1. Train a target MLP that overfits (few records, many epochs, as deployed models do) and export it to ONNX.
2. Train the guard's defender on the target's outputs: its training records against a held-out reference
   set the owner keeps (``siguard guard train``).
3. Compile the model twice: without the guard, and with it (``siguard compile --guard``).
4. Audit (``siguard audit``): run members and non-members through onnxruntime, through the plan between
   the three parties, and through the guarded plan; fit every attack on the attacker's own shadow model
   and data; measure AUC and advantage, labels, distortion, time and traffic.
5. Print one table (plain / secure / guarded) and where the HTML report is.

Data splits (disjoint, drawn once from a seeded permutation; the permutation is not cryptographic and is
never used for shares): target training set (members), evaluation non-members, the owner's reference
non-members (defender only), and the attacker's shadow set (half shadow members, half shadow non-members).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from siguard.pipeline import CompileOptions, compile_model, write_plan

from .audit import OUTPUT_KINDS, AuditData, run_audit
from .datasets import load_dataset, save_npz
from .defender import export_defender, train_defender
from .memguard import softmax
from .targets import export_onnx, make_mlp, predict_onnx, train_classifier

__all__ = ["run_demo", "SPLITS", "format_demo_table"]

#: per dataset: (target training set = members, evaluated members, evaluation non-members, reference
#: non-members of the owner, shadow records of the attacker, plan batch, training epochs). Digits: 200
#: training images and 200 epochs make an MLP whose confidences leak (defender validation ~0.67, attacks
#: AUC ~0.61-0.66 against a label-only floor of ~0.54); with 400+ images its softmax saturates for members
#: and non-members alike and neither the defender nor the attacks learn much beyond the label (measured).
#: The evaluation set runs as one batch: the guard's ~40k rounds are paid once.
SPLITS = {
    "digits": (200, 200, 200, 300, 400, 400, 200),
    "fashion-mnist": (1000, 1000, 1000, 1000, 2000, 500, 150),
}


def run_demo(dataset: str = "digits", out_dir: str | Path = "siguard-demo", mode: str = "threads",
             seed: int = 0, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (models, data files, plans, report); returns the audit document.

    ``mode``: how the plans run, one of :data:`siguard.privacy.audit.MODES` (see
    :func:`siguard.privacy.audit.run_audit`)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_dataset(dataset)
    n_train, n_mem, n_non, n_ref, n_shadow, batch, epochs = SPLITS[dataset]
    order = np.random.default_rng(seed).permutation(len(data.x))  # data split only
    cuts = np.cumsum([n_train, n_non, n_ref, n_shadow])
    train, non, ref, shadow = np.split(order[: cuts[-1]], cuts[:-1])
    mem = train[:n_mem]
    files = {}
    for name, idx in (("members", mem), ("nonmembers", non), ("reference", ref), ("shadow", shadow)):
        files[name] = save_npz(out / "data" / f"{name}.npz", data.x[idx], data.y[idx])

    log(f"[1/5] training the target: an MLP on {n_train} {dataset} images, {epochs} epochs (it overfits, as "
        "deployed models do) …")
    model = train_classifier(make_mlp(data.input_shape, data.num_classes, seed=seed), data.x[train], data.y[train],
                             epochs=epochs, seed=seed)
    onnx_path = export_onnx(model, out / "target.onnx", data.input_shape)
    z_train, z_ref = predict_onnx(onnx_path, data.x[train]), predict_onnx(onnx_path, data.x[ref])

    log(f"[2/5] training the guard's defender: {n_train} members against {n_ref} reference non-members …")
    module, report = train_defender(softmax(z_train.astype(np.float64)), softmax(z_ref.astype(np.float64)), seed=seed)
    defender_path = export_defender(module, out / "defender.onnx")
    log(f"      defender validation accuracy {report.val_accuracy:.3f}")

    log(f"[3/5] compiling {onnx_path.name} without and with the guard (batch {batch}) …")
    plan_dir = write_plan(compile_model(onnx_path, CompileOptions(batch=batch)), out / "plan")
    gplan_dir = write_plan(compile_model(onnx_path, CompileOptions(batch=batch, guard=defender_path)),
                           out / "plan-guarded")

    log(f"[4/5] audit: {n_mem} members and {n_non} non-members, plaintext / secure ({mode}) / guarded …")
    audit_data = AuditData.from_files(files["members"], files["nonmembers"], files["shadow"])
    doc = run_audit(onnx_path, plan_dir, gplan_dir, audit_data, report_dir=out / "report", mode=mode,
                    shadow_epochs=epochs, seed=seed, progress=progress, log=lambda m: log("      " + m))
    doc["demo"] = {"dataset": dataset, "target_train_accuracy": float((z_train.argmax(1) == data.y[train]).mean()),
                   "defender_val_accuracy": float(report.val_accuracy),
                   "total_seconds": time.perf_counter() - t_start}
    log("[5/5] results")
    log("")
    log(format_demo_table(doc))
    log("")
    log(f"HTML report: {out / 'report' / 'index.html'}   all numbers: {out / 'report' / 'audit.json'}")
    log(f"plans: siguard inspect {plan_dir}  |  siguard inspect {gplan_dir}")
    log(f"demo finished in {doc['demo']['total_seconds']:.0f} s")
    return doc


def format_demo_table(doc: dict[str, Any]) -> str:
    """Plain / secure / guarded (and plaintext MemGuard for reference): best attack, shadow neural attack,
    labels, distortion, time and traffic."""

    outs = doc["outputs"]
    # wide enough for every title and the longest attack name (never cut: "true-label confidence")
    w = max([20, *(len(outs[k]["title"]) + 2 for k in OUTPUT_KINDS),
             *(len(outs[k]["best_attack"]["name"]) + 2 for k in OUTPUT_KINDS)])
    head = f"{'':34s}" + "".join(f"{outs[k]['title']:>{w}s}" for k in OUTPUT_KINDS)
    lines = [head, "-" * len(head)]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"{label:34s}" + "".join(f"{cell(outs[k]):>{w}s}" for k in OUTPUT_KINDS))

    row("best attack AUC (advantage)", lambda o: f"{o['best_attack']['auc']:.3f} ({o['best_attack']['advantage']:.3f})")
    row("  which attack", lambda o: o["best_attack"]["name"])
    row("shadow neural attack AUC (adv)", lambda o: f"{o['attacks']['neural']['auc']:.3f} "
                                                     f"({o['attacks']['neural']['advantage']:.3f})")
    row("label accuracy", lambda o: f"{o['label_accuracy']:.3f}")
    row("labels equal to plaintext", lambda o: f"{o['top1_agreement']:.3f}")
    row("mean L1 distortion", lambda o: f"{o['mean_l1']:.4f}")
    row("time (s)", lambda o: f"{o['seconds']:.2f}")
    row("MB sent per party (max)", lambda o: f"{max(o['mb_per_party']):.2f}" if o["mb_per_party"] else "-")
    gap = doc["floor"]["label_only_gap"]
    lines.append(f"{'label-only gap attack (floor)':34s}{gap['auc']:>{w}.3f}  (advantage {gap['advantage']:.3f}; "
                 "no label-preserving guard can go below it)")
    return "\n".join(lines)
