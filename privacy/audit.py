"""The membership-inference audit: every attack on plaintext, secure and guarded outputs of one model.

``siguard audit MODEL.onnx --plan PLAN --guarded-plan GPLAN --members M.npz --nonmembers N.npz
--shadow S.npz [--report DIR]`` (and :func:`run_audit`) computes the outputs of the evaluation set
(members then non-members) four ways:

* ``plaintext`` -- the model through onnxruntime (what an ordinary inference API reveals);
* ``secure`` -- PLAN between the three parties, without the guard (what secure inference alone reveals);
* ``guarded`` -- GPLAN between the three parties: the guard's noise added inside MPC;
* ``memguard`` -- the float64 reference of the same guard (:func:`siguard.privacy.memguard.guard_reference`,
  the defender and counts read from GPLAN) on the plaintext logits: plaintext MemGuard, the yardstick
  the secure guard is compared with.

The attacker's side is built only from the shadow file: S.npz's records are split into shadow members
(``member`` array if present, else the first half) and shadow non-members; a shadow model with the
target's recipe (:func:`siguard.privacy.targets.make_mlp`, the same epochs) is trained on the shadow members,
and every attack of :func:`siguard.privacy.attacks.standard_attacks` is fitted on the shadow model's outputs.
The fitted attacks are then only evaluated on the four output sets: no threshold, direction or
classifier weight ever sees evaluation data. The label-only gap attack (member iff the label is right)
needs no fitting and is reported as the floor no label-preserving output perturbation can lower.

Output sets are probability vectors: a model or plan revealing logits is passed through softmax by the
client (that reveals nothing logits do not). Every number lands in ``audit.json`` (schema
``privacy/schema/audit.schema.json``, documented in the README), with ROC curves as PNGs and an HTML
report when a report directory is given.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.core.config import GuardConfig
from siguard.core.errors import InputError
from siguard.progress import progress_bar
from siguard.runtime.kernels.guard import guard_progress
from siguard.runtime.local import run_reference, run_threads
from siguard.runtime.net.processes import run_processes

from .attacks import label_only_gap, standard_attacks, train_shadow
from .datasets import load_npz
from .defender import DefenderWeights, to_probabilities
from .memguard import guard_reference, quantize_release
from .targets import model_outputs

__all__ = ["AUDIT_FORMAT", "OUTPUT_KINDS", "run_audit", "format_table", "format_markdown", "validate_audit",
           "AuditData", "write_report"]

AUDIT_FORMAT = "siguard-audit/1"
#: the output sets the audit attacks, in table order
OUTPUT_KINDS = ("plaintext", "secure", "guarded", "memguard")
_TITLES = {"plaintext": "plaintext (onnxruntime)", "secure": "secure, no guard", "guarded": "secure + guard",
           "memguard": "plaintext MemGuard"}
MODES = ("threads", "lockstep", "processes", "reference")
#: rows whose revealed vector moved by more than this (L1) count as "noised"
NOISE_L1 = 2e-3


@dataclass
class AuditData:
    """Evaluation and shadow data of an audit (all float32 inputs, int64 labels)."""

    x_members: np.ndarray
    y_members: np.ndarray
    x_nonmembers: np.ndarray
    y_nonmembers: np.ndarray
    x_shadow: np.ndarray
    y_shadow: np.ndarray
    shadow_member: np.ndarray  # (S,) bool: which shadow records train the shadow model

    @classmethod
    def from_files(cls, members: str | Path, nonmembers: str | Path, shadow: str | Path) -> AuditData:
        xm, ym = load_npz(members, "members")
        xn, yn = load_npz(nonmembers, "non-members")
        xs, ys = load_npz(shadow, "shadow")
        with np.load(shadow, allow_pickle=False) as npz:
            flag = np.asarray(npz["member"]).astype(bool) if "member" in npz.files else None
        if flag is None:
            flag = np.arange(len(xs)) < len(xs) // 2
        elif flag.shape != (len(xs),):
            raise InputError(f"{shadow}: 'member' must have shape ({len(xs)},), got {list(flag.shape)}")
        return cls(xm, ym, xn, yn, xs, ys, flag)

    def check(self) -> None:
        shapes = {tuple(a.shape[1:]) for a in (self.x_members, self.x_nonmembers, self.x_shadow)}
        if len(shapes) != 1:
            raise InputError(f"members, non-members and shadow records differ in per-sample shape: {sorted(shapes)}")
        if self.shadow_member.sum() < 2 or (~self.shadow_member).sum() < 2:
            raise InputError("the shadow file needs at least 2 shadow members and 2 shadow non-members")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _guard_step(plan: Any) -> Any:
    """The plan's guard step (a :class:`siguard.compiler.step.PlanStep`), None in a plan without a guard."""
    return next((s for s in plan.steps if s.op == "guard"), None)


def _defender_from_plan(plan: Any) -> Any:
    """The defender the guarded plan's owner secret-shares (weights.npz stores W^T, see siguard.passes.guard)."""

    w = plan.load_weights()
    return DefenderWeights(W1=w["guard.W1"].T, b1=w["guard.b1"], W2=w["guard.W2"].T, b2=w["guard.b2"],
                           w3=w["guard.w3"].T, b3=w["guard.b3"])


def _guard_config(step: Any) -> Any:
    return GuardConfig.from_attrs(step.attrs)


def _oracle_options(step: dict[str, Any]) -> dict[str, Any]:
    """The float oracle's options for the guard step's configuration (the same algorithm)."""
    return _guard_config(step).oracle_options()


def _as_probabilities(out: np.ndarray, are_probabilities: bool) -> np.ndarray:
    """A revealed output as probability vectors: fixed-point probabilities (a softmax head, or the guard) may
    be a few ulp below 0 or off a sum of 1, so they are clipped and renormalised; logits go through softmax."""

    if not are_probabilities:
        return to_probabilities(out)
    q = np.clip(np.asarray(out, dtype=np.float64), 0.0, None)
    total = q.sum(axis=1, keepdims=True)
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), 1.0 / q.shape[1])


def _load_plans(model: Path, plan_dir: str | Path, guarded_dir: str | Path) -> tuple[Any, Any]:
    if not model.exists():
        raise InputError(f"model file {model} does not exist")
    plan, gplan = Plan.load(plan_dir), Plan.load(guarded_dir)
    digest = _sha256(model)
    for label, p, d in (("--plan", plan, plan_dir), ("--guarded-plan", gplan, guarded_dir)):
        src = p.with_owner_facts().doc["model"].get("source_sha256")  # an owner's fact (owner.json)
        if src != digest:
            raise InputError(f"{label} {d} was compiled from a different model (sha256 {str(src)[:16]}…, "
                             f"{model.name} is {digest[:16]}…)")
        if len(p.inputs) != 1:
            raise InputError(f"{label} {d}: the audit runs single-input plans (this one has {len(p.inputs)})")
    if _guard_step(plan) is not None:
        raise InputError(f"--plan {plan_dir} has a guard; pass the plan compiled without --guard")
    if _guard_step(gplan) is None:
        raise InputError(f"--guarded-plan {guarded_dir} has no guard step; compile it with --guard DEFENDER.onnx")
    return plan, gplan


class _Runner:
    """Runs a plan over many queries in chunks of the plan's batch (the last chunk padded with its own rows)."""

    def __init__(self, plan: Any, mode: str, timeout: float):
        self.plan, self.mode, self.timeout = plan, mode, timeout
        self.batch = int(plan.inputs[0]["shape"][0])
        self.weights = plan.load_weights()

    def _one(self, x: np.ndarray) -> tuple[np.ndarray, float, dict[str, Any]]:
        if self.mode == "reference":
            r = run_reference(self.plan, x, self.weights)
        elif self.mode in ("threads", "lockstep"):
            r = run_threads(self.plan, x, self.weights, timeout=self.timeout, scheduler=self.mode)
        else:

            r = run_processes(self.plan.directory, x, timeout=self.timeout)
        return r.output, r.seconds, r.stats

    def run(self, x: np.ndarray, desc: str, progress: bool) -> dict[str, Any]:
        """Outputs of all rows of ``x``, the summed time, rounds and MB per party. The progress bar counts the
        guard's iterations where the plan has a guard (threads, lockstep and reference mode), else batches."""

        want = tuple(self.plan.inputs[0]["shape"][1:])
        if tuple(x.shape[1:]) != want:
            raise InputError(f"the data's per-sample shape {list(x.shape[1:])} does not match the plan's input "
                             f"{list(want)}")
        chunks = range(0, len(x), self.batch)
        g = _guard_step(self.plan)
        per_batch = _guard_config(g).iterations if g and self.mode != "processes" else 1
        # a tqdm bar on a terminal, a plain line every few seconds otherwise (siguard.progress)
        bar = progress_bar(len(chunks) * per_batch, desc, enabled=progress, unit="batch" if per_batch == 1 else "it")
        outs, seconds, rounds, sent = [], 0.0, 0, np.zeros(3)
        with bar, guard_progress(lambda done, _total: bar.update(1)):
            for i in chunks:
                part = x[i : i + self.batch]
                pad = self.batch - len(part)
                if pad:
                    part = np.concatenate([part, np.resize(part, (pad, *part.shape[1:]))])
                start = bar.n
                y, s, stats = self._one(part)
                bar.update(start + per_batch - bar.n)
                outs.append(y[: self.batch - pad])
                seconds += s
                if stats:
                    rounds += int(stats["totals"]["rounds"])
                    sent += np.asarray(stats["totals"]["bytes_per_party"], dtype=np.float64)
        return {"output": np.concatenate(outs), "seconds": seconds, "batches": len(chunks), "rounds": rounds,
                "mb_per_party": [float(b) / 1e6 for b in sent] if rounds else None}


def _attack_rows(attacks: dict[str, Any], probs: np.ndarray, membership: np.ndarray,
                 labels: np.ndarray) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    rows, curves = {}, {}
    for key, atk in attacks.items():
        res = atk.evaluate(probs, membership, labels)
        metrics = {m: v for m, v in res.to_dict().items() if m != "name"}
        rows[key] = {"name": res.name, "label_aware": bool(atk.label_aware), **metrics}
        curves[key] = res.roc
    return rows, curves


def run_audit(model: str | Path, plan_dir: str | Path, guarded_plan_dir: str | Path, data: AuditData, *,
              report_dir: str | Path | None = None, mode: str = "threads", shadow_epochs: int = 150,
              seed: int = 0, timeout: float = 600.0, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the audit (module docstring); returns the ``audit.json`` document (also written to ``report_dir``).

    ``mode``: how the plans run -- ``threads`` (three parties in this process, a thread each), ``lockstep``
    (the same parties as greenlets in one thread, switched at every wait: rounds cost about half, so a
    round-bound guarded plan at a small batch runs about 1.6-2x faster), ``processes`` (three server
    processes and a client over TLS on loopback) or ``reference`` (the fixed-point cleartext executor: the
    parties' arithmetic without secret sharing; quick, for trials)."""

    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if shadow_epochs < 1:
        raise InputError(f"--shadow-epochs must be at least 1, got {shadow_epochs}")
    model = Path(model)
    plan, gplan = _load_plans(model, plan_dir, guarded_plan_dir)
    data.check()
    t_start = time.perf_counter()
    x = np.concatenate([data.x_members, data.x_nonmembers])
    labels = np.concatenate([data.y_members, data.y_nonmembers])
    membership = np.concatenate([np.ones(len(data.x_members), bool), np.zeros(len(data.x_nonmembers), bool)])
    n_eval = len(x)

    log(f"[audit 1/5] plaintext outputs of {n_eval} queries through onnxruntime …")
    t0 = time.perf_counter()
    plain_out = model_outputs(model, x, "members/non-members")
    plain_seconds = time.perf_counter() - t0
    k = plain_out.shape[1] if plain_out.ndim == 2 else 0
    if k < 2:
        raise InputError(f"the model's output has shape {list(plain_out.shape)}; the audit needs (N, k) scores")
    if labels.max() >= k:
        raise InputError(f"a label ({int(labels.max())}) is out of range for the model's {k} classes")
    probs = {"plaintext": to_probabilities(plain_out)}
    softmax_head = bool(np.array_equal(probs["plaintext"], np.asarray(plain_out, dtype=np.float64)))
    runs: dict[str, dict[str, Any]] = {"plaintext": {"seconds": plain_seconds, "rounds": None, "mb_per_party": None,
                                                      "batches": 1}}

    for step, kind, p, what in ((2, "secure", plan, "without"), (3, "guarded", gplan, "with")):
        batch = int(p.inputs[0]["shape"][0])
        log(f"[audit {step}/5] secure inference {what} the guard ({mode}, {-(-n_eval // batch)} batches of {batch}, "
            f"{p.totals['rounds']} rounds each) …")
        r = _Runner(p, mode, timeout).run(x, f"{kind} inference", progress)
        probs[kind] = _as_probabilities(r.pop("output"), softmax_head or kind == "guarded")
        runs[kind] = r

    log("[audit 4/5] plaintext MemGuard (float64 reference of the same guard) …")
    gstep = _guard_step(gplan)
    assert gstep is not None
    if softmax_head:  # softmax(log p) = p: the logits up to a shift, which the guard ignores
        logits = np.log(np.clip(probs["plaintext"], 1e-300, None))
    else:
        logits = np.asarray(plain_out, dtype=np.float64)
    t0 = time.perf_counter()
    oracle = guard_reference(logits, _defender_from_plan(gplan), **_oracle_options(gstep))
    probs["memguard"] = oracle.guarded
    runs["memguard"] = {"seconds": time.perf_counter() - t0, "rounds": None, "mb_per_party": None, "batches": 1}

    log(f"[audit 5/5] shadow model on {int(data.shadow_member.sum())} shadow members, attacks fitted on its outputs …")
    sm = data.shadow_member
    shadow = train_shadow(data.x_shadow[sm], data.y_shadow[sm], data.x_shadow[~sm],
                          input_shape=tuple(data.x_shadow.shape[1:]), num_classes=k, epochs=shadow_epochs,
                          seed=seed + 1000, y_out=data.y_shadow[~sm])
    attacks = standard_attacks(seed)
    shadow_probs = shadow.plain_outputs()
    for atk in attacks.values():
        atk.fit(shadow_probs, shadow.membership, shadow.labels)

    plain = probs["plaintext"]
    outputs: dict[str, Any] = {}
    bits = {kind: int(_oracle_options(gstep)["release_bits"]) if kind in ("guarded", "memguard") else 0
            for kind in OUTPUT_KINDS}
    curves: dict[str, dict[str, Any]] = {}
    for kind in OUTPUT_KINDS:
        pr = probs[kind]
        rows, curves[kind] = _attack_rows(attacks, pr, membership, labels)
        best = max(rows, key=lambda a: (rows[a]["advantage"], a))
        l1 = np.abs(pr - plain).sum(axis=1)
        outputs[kind] = {
            "title": _TITLES[kind],
            "label_accuracy": float((pr.argmax(1) == labels).mean()),
            "top1_agreement": float((pr.argmax(1) == plain.argmax(1)).mean()),
            "mean_l1": float(l1.mean()),
            "max_l1": float(l1.max()),
            # the guard's noise only: a rounded release counts as noised where it differs from softmax(z) rounded alike
            "noised_fraction": float((np.abs(pr - quantize_release(plain, plain.argmax(1), bits[kind])).sum(axis=1)
                                      > NOISE_L1).mean()),
            **{key: runs[kind][key] for key in ("seconds", "rounds", "mb_per_party", "batches")},
            "attacks": rows,
            "best_attack": {"id": best, "name": rows[best]["name"], "auc": rows[best]["auc"],
                            "advantage": rows[best]["advantage"]},
        }
    gap = label_only_gap(plain, labels, membership)
    curves["plaintext"]["label_only_gap"] = gap.roc
    cfg = _oracle_options(gstep)
    doc: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_by": plan.doc.get("created_by", "siguard"),
        "mode": mode,
        "model": {"path": str(model), "sha256": _sha256(model), "classes": int(k)},
        "plans": {
            "secure": {"path": str(plan_dir), "plan_hash": plan.plan_hash, "batch": int(plan.inputs[0]["shape"][0]),
                       "rounds": int(plan.totals["rounds"])},
            "guarded": {"path": str(guarded_plan_dir), "plan_hash": gplan.plan_hash,
                        "batch": int(gplan.inputs[0]["shape"][0]), "rounds": int(gplan.totals["rounds"]),
                        "guard": cfg},
        },
        "data": {"members": int(membership.sum()), "nonmembers": int((~membership).sum()),
                 "shadow_members": int(sm.sum()), "shadow_nonmembers": int((~sm).sum())},
        "shadow": {"epochs": shadow_epochs, "seed": seed + 1000, "architecture": "siguard.privacy.targets.make_mlp",
                   "train_accuracy": shadow.info.get("shadow_train_accuracy"),
                   "test_accuracy": shadow.info.get("shadow_test_accuracy")},
        "memguard_accepted": float(np.mean(oracle.accepted)),
        "outputs": outputs,
        "floor": {"label_only_gap": gap.to_dict()},
        "seconds": time.perf_counter() - t_start,
        "files": {},
    }
    if report_dir is not None:
        write_report(doc, curves, report_dir)
        np.savez_compressed(Path(report_dir) / "outputs.npz", membership=membership, labels=labels,
                            **{kind: probs[kind] for kind in OUTPUT_KINDS})
        doc["files"]["outputs"] = "outputs.npz"
    validate_audit(doc)
    if report_dir is not None:
        (Path(report_dir) / "audit.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "schema" / "audit.schema.json").read_text())


def validate_audit(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` follows ``privacy/schema/audit.schema.json``."""
    import jsonschema

    jsonschema.validate(doc, _schema())


def _plot_roc(path: Path, title: str, curves: dict[str, tuple[np.ndarray, np.ndarray] | None],
              aucs: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    for label, roc in curves.items():
        if roc is not None:
            ax.plot(roc[0], roc[1], label=f"{label} (AUC {aucs[label]:.3f})", linewidth=1.4)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8, label="coin flip")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(doc: dict[str, Any], curves: dict[str, dict[str, Any]], report_dir: str | Path) -> Path:
    """ROC PNGs (one per attack: the four output sets; one per output set: all attacks) and ``index.html``
    into ``report_dir``; records the file names in ``doc["files"]``. Returns the HTML path."""
    import jinja2

    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"roc_by_attack": {}, "roc_by_output": {}}
    outputs = doc["outputs"]
    for key in outputs["plaintext"]["attacks"]:
        name = f"roc-attack-{key}.png"
        _plot_roc(d / name, outputs["plaintext"]["attacks"][key]["name"],
                  {outputs[o]["title"]: curves[o][key] for o in OUTPUT_KINDS},
                  {outputs[o]["title"]: outputs[o]["attacks"][key]["auc"] for o in OUTPUT_KINDS})
        files["roc_by_attack"][key] = name
    for o in OUTPUT_KINDS:
        name = f"roc-output-{o}.png"
        rows = outputs[o]["attacks"]
        c = {rows[a]["name"]: curves[o][a] for a in rows}
        aucs = {rows[a]["name"]: rows[a]["auc"] for a in rows}
        if o == "plaintext":
            c["label-only gap (floor)"] = curves[o]["label_only_gap"]
            aucs["label-only gap (floor)"] = doc["floor"]["label_only_gap"]["auc"]
        _plot_roc(d / name, outputs[o]["title"], c, aucs)
        files["roc_by_output"][o] = name
    files["html"] = "index.html"
    files["json"] = "audit.json"
    doc["files"] = files
    env = jinja2.Environment(loader=jinja2.PackageLoader("siguard.privacy", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    html = env.get_template("audit.html.j2").render(doc=doc, kinds=OUTPUT_KINDS, files=files)
    (d / "index.html").write_text(html)
    return d / "index.html"


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per attack (AUC, advantage in brackets) and per output set a column;
    then label accuracy, L1 distortion, time and traffic."""
    outs = doc["outputs"]
    width = max([22, *(len(outs[o]["title"]) + 2 for o in OUTPUT_KINDS)])
    attacks = outs["plaintext"]["attacks"]
    labels = {key: "AUC (adv) " + row["name"] + (" *" if row["label_aware"] else "") for key, row in attacks.items()}
    lw = max([26, *(len(t) + 1 for t in labels.values())])  # every row label whole, every column aligned
    head = f"{'':{lw}s}" + "".join(f"{outs[o]['title']:>{width}s}" for o in OUTPUT_KINDS)
    lines = [head, "-" * len(head)]
    for key in attacks:
        cells = "".join(f"{outs[o]['attacks'][key]['auc']:>{width - 8}.3f} ({outs[o]['attacks'][key]['advantage']:.3f})"
                        for o in OUTPUT_KINDS)
        lines.append(f"{labels[key]:{lw}s}{cells}")
    lines.append(f"{'best attack AUC (adv)':{lw}s}" + "".join(
        f"{outs[o]['best_attack']['auc']:>{width - 8}.3f} ({outs[o]['best_attack']['advantage']:.3f})"
        for o in OUTPUT_KINDS))
    lines.append(f"{'label accuracy':{lw}s}" + "".join(f"{outs[o]['label_accuracy']:>{width}.3f}"
                                                        for o in OUTPUT_KINDS))
    lines.append(f"{'labels = plaintext':{lw}s}" + "".join(f"{outs[o]['top1_agreement']:>{width}.3f}"
                                                            for o in OUTPUT_KINDS))
    lines.append(f"{'mean L1 distortion':{lw}s}" + "".join(f"{outs[o]['mean_l1']:>{width}.4f}" for o in OUTPUT_KINDS))
    lines.append(f"{'time (s)':{lw}s}" + "".join(f"{outs[o]['seconds']:>{width}.2f}" for o in OUTPUT_KINDS))
    lines.append(f"{'MB sent per party (max)':{lw}s}" + "".join(
        f"{max(outs[o]['mb_per_party']):>{width}.2f}" if outs[o]["mb_per_party"] else f"{'-':>{width}s}"
        for o in OUTPUT_KINDS))
    gap = doc["floor"]["label_only_gap"]
    lines.append("")
    lines.append(f"floor: label-only gap attack AUC {gap['auc']:.3f} (adv {gap['advantage']:.3f}) -- no "
                 "label-preserving guard can go below it.  * = label-aware attack (class-dependent thresholds "
                 "where marked in the README); adv = |AUC - 0.5|.")
    return "\n".join(lines)


def format_markdown(doc: dict[str, Any]) -> str:
    """The audit as a Markdown table (attacks' AUC / advantage per output set, then utility and cost), as the
    README quotes it."""
    outs = doc["outputs"]
    lines = ["| | " + " | ".join(outs[o]["title"] for o in OUTPUT_KINDS) + " |",
             "|---|" + "---|" * len(OUTPUT_KINDS)]
    for key, row in outs["plaintext"]["attacks"].items():
        cells = []
        for o in OUTPUT_KINDS:
            a = outs[o]["attacks"][key]
            cell = f"{a['auc']:.3f} / {a['advantage']:.3f}"
            cells.append(f"**{cell}**" if outs[o]["best_attack"]["id"] == key else cell)
        lines.append(f"| {row['name']}{' *' if row['label_aware'] else ''} AUC / adv | " + " | ".join(cells) + " |")
    gap = doc["floor"]["label_only_gap"]
    lines.append(f"| label-only gap (floor) AUC / adv | {gap['auc']:.3f} / {gap['advantage']:.3f} | | | |")
    lines.append("| label accuracy | " + " | ".join(f"{outs[o]['label_accuracy']:.3f}" for o in OUTPUT_KINDS) + " |")
    lines.append("| labels equal to plaintext | " + " | ".join(f"{outs[o]['top1_agreement']:.3f}" for o in OUTPUT_KINDS)
                 + " |")
    lines.append("| mean L1 distortion | " + " | ".join(f"{outs[o]['mean_l1']:.4f}" for o in OUTPUT_KINDS) + " |")
    lines.append("| time (s) | " + " | ".join(f"{outs[o]['seconds']:.2f}" for o in OUTPUT_KINDS) + " |")
    lines.append("| MB sent per party (max) | " + " | ".join(
        f"{max(outs[o]['mb_per_party']):.1f}" if outs[o]["mb_per_party"] else "–" for o in OUTPUT_KINDS) + " |")
    return "\n".join(lines)
