"""The guard and the audit from Python (the CLI's ``guard train`` and ``audit``).

    >>> import siguard
    >>> report = siguard.train_defender("model.onnx", "members.npz", "reference.npz", "defender.onnx")
    >>> plan = siguard.compile("model.onnx", "plan-guarded", batch=64, guard="defender.onnx")
    >>> doc = siguard.audit("model.onnx", "plan", "plan-guarded", members="members.npz",
    ...                     nonmembers="nonmembers.npz", shadow="shadow.npz", report_dir="report")
    >>> print(siguard.format_audit(doc))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["train_defender", "audit", "format_audit"]


def _named_outputs(model: str | Path, x: Any, output: str, what: str, batch: int = 1024) -> Any:
    """The graph output ``output`` of ``model`` on ``x`` (onnxruntime), with one clear error for an unknown
    output name or a model that fails on ``x``."""
    import numpy as np
    import onnxruntime as ort

    from siguard.core.errors import InputError
    from siguard.privacy.targets import model_outputs

    model_outputs(model, x[:1], what)  # loads the model and checks x's per-sample shape, with its messages
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if output not in names:
        raise InputError(f"--output: {model} has no output {output!r} (outputs: {', '.join(names)})")
    name = sess.get_inputs()[0].name
    try:
        outs = [sess.run([output], {name: x[i : i + batch].astype(np.float32)})[0] for i in range(0, len(x), batch)]
    except Exception as exc:
        raise InputError(f"{what}: the model fails on 'x' ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return np.concatenate(outs)


def train_defender(model: str | Path, members: str | Path, nonmembers: str | Path, out: str | Path, *,
                   seed: int = 0, epochs: int = 300, output: str | None = None) -> Any:
    """Train the guard's defender on ``model``'s outputs (onnxruntime) for the records of the ``members`` .npz
    against the ``nonmembers`` .npz (the owner's reference set) and export it to ONNX at ``out``.
    ``output``: the graph output to train on (as ``siguard compile --output``; default: the model's
    default output). Returns the training report (``val_accuracy``, ``train_accuracy``, ``best_epoch`` …)."""
    from siguard.privacy.datasets import load_npz
    from siguard.privacy.defender import export_defender, to_probabilities
    from siguard.privacy.defender import train_defender as fit
    from siguard.privacy.targets import model_outputs

    x_in, _ = load_npz(members, "members", labels=False)
    x_out, _ = load_npz(nonmembers, "non-members", labels=False)
    if output is None:
        p_in = to_probabilities(model_outputs(model, x_in, str(members)))
        p_out = to_probabilities(model_outputs(model, x_out, str(nonmembers)))
    else:
        p_in = to_probabilities(_named_outputs(model, x_in, output, str(members)))
        p_out = to_probabilities(_named_outputs(model, x_out, output, str(nonmembers)))
    module, report = fit(p_in, p_out, seed=seed, epochs=epochs)
    export_defender(module, out)
    return report


def audit(model: str | Path, plan: str | Path, guarded_plan: str | Path, *, members: str | Path,
          nonmembers: str | Path, shadow: str | Path, report_dir: str | Path | None = None, mode: str = "threads",
          shadow_epochs: int = 150, seed: int = 0, progress: bool = False, **kw: Any) -> dict[str, Any]:
    """Run the membership-inference audit (``siguard audit``); returns the ``audit.json`` document.

    ``mode``: ``threads``, ``lockstep``, ``processes`` or ``reference`` (see
    :func:`siguard.privacy.audit.run_audit`)."""
    from siguard.privacy.audit import AuditData, run_audit

    data = AuditData.from_files(members, nonmembers, shadow)
    kw.setdefault("log", lambda _m: None)
    return run_audit(model, plan, guarded_plan, data, report_dir=report_dir, mode=mode, shadow_epochs=shadow_epochs,
                     seed=seed, progress=progress, **kw)


def format_audit(doc: dict[str, Any]) -> str:
    """The audit's terminal table."""
    from siguard.privacy.audit import format_table

    return format_table(doc)
