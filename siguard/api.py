"""SIGuard's public Python API: compile a model, load a plan, inspect it, run it.

    >>> import siguard
    >>> plan = siguard.compile("model.onnx", "out/plan", batch=1)
    >>> result = siguard.run(plan, x, mode="threads")
    >>> result.output, result.stats["totals"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.compiler.report import render
from siguard.pipeline import CompileOptions, compile_model, write_plan

__all__ = ["compile", "load_plan", "inspect", "run", "MODES"]

#: ``reference``: the fixed-point cleartext executor; ``threads``: the three parties and the client in this
#: process, a thread each; ``lockstep``: the same parties as greenlets in this thread, switched at every wait
#: (a round costs about half: round-bound plans such as a guarded plan at a small batch run about 1.6-2x
#: faster, while big convolutions of different parties no longer overlap on several cores)
MODES = ("reference", "threads", "lockstep")


def compile(model: Any, out_dir: str | Path | None = None, *, batch: int = 1, output: str | None = None,
            frac_bits: int = 16, guard: Any = None, guard_config: dict[str, Any] | None = None,
            calibration: Any = None, approx: str = "auto", overrides: dict[str, str] | None = None,
            accuracy_budget: Any = None, objective: str = "rounds", **extra: Any) -> Plan:
    """Compile an ONNX model (path or ``onnx.ModelProto``) into a plan; write it if ``out_dir``.

    ``guard``: the defender ONNX (``siguard guard train``) to insert the guard with, ``guard_config``
    its GuardConfig fields; ``calibration``: inputs (N, ...) or a .npy path; ``approx``: auto | exact |
    crypten | default; ``overrides``: node name -> implementation; ``accuracy_budget``:
    "top1=0.995,prob=0.01"; ``objective``: rounds | bytes (see the README's Approximations section)."""
    opts = CompileOptions(batch=batch, output=output, frac_bits=frac_bits, guard=guard,
                          guard_config=dict(guard_config or {}), calibration=calibration, approx=approx,
                          overrides=dict(overrides or {}), accuracy_budget=accuracy_budget, objective=objective,
                          extra=extra)
    result = compile_model(model, opts)
    if out_dir is not None:
        write_plan(result, out_dir)
    else:
        result.plan.weights_in_memory = result.weights  # type: ignore[attr-defined]
    return result.plan


def load_plan(path: str | Path) -> Plan:
    """Load and validate a plan directory (or its plan.json)."""
    return Plan.load(path)


def inspect(plan: Plan | str | Path, fmt: str = "text") -> str:
    """Render a plan as text, json, html or dot."""
    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    return render(p, fmt)


def _weights(plan: Plan) -> dict[str, np.ndarray]:
    mem = getattr(plan, "weights_in_memory", None)
    return mem if mem is not None else plan.load_weights()


def run(plan: Plan | str | Path, inputs: Any, *, mode: str = "threads", **kw: Any):
    """Run a plan on ``inputs`` (an array, or a dict name -> array) in one of :data:`MODES`. Returns a RunResult;
    ``kw`` (``timeout``, ``queries``) go to :func:`siguard.runtime.local.run_threads` in the secure modes."""
    from siguard.runtime.local import run_reference, run_threads

    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    if mode == "reference":
        return run_reference(p, inputs, _weights(p))
    if mode in ("threads", "lockstep"):
        return run_threads(p, inputs, _weights(p), scheduler=mode, **kw)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
