"""The ``compile`` pipeline: ONNX -> IR -> passes -> plan directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .backend import build_plan
from .errors import InputError
from .plan import Plan

__all__ = ["CompileOptions", "CompileResult", "compile_model", "write_plan"]


@dataclass
class CompileOptions:
    """Options of ``siguard compile`` (see the README's CLI reference)."""

    batch: int = 1
    output: str | None = None
    frac_bits: int = 16
    guard: Any = None  # defender ONNX path (or privacy.defender.DefenderWeights); None = no guard
    guard_config: dict[str, Any] = field(default_factory=dict)  # runtime.guard.GuardConfig fields
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileResult:
    plan: Plan
    weights: dict[str, np.ndarray]
    graph: Any
    warnings: list[str]


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"siguard {version('siguard')}"
    except Exception:
        return "siguard (source tree)"


def compile_model(model: str | Path | onnx.ModelProto, options: CompileOptions | None = None) -> CompileResult:
    """Compile an ONNX model (path or ModelProto) into a plan (not yet written to disk)."""
    from compiler.frontend import load_model
    from passes.base import PassContext, PassManager
    from passes.canonicalize import Canonicalize
    from passes.cost import CostAnnotation
    from passes.fixedpoint import FixedPoint

    opts = options or CompileOptions()
    if opts.batch < 1:
        raise InputError(f"--batch must be >= 1 (got {opts.batch})")
    if not 8 <= opts.frac_bits <= 24:
        raise InputError(f"--frac-bits must be between 8 and 24 (got {opts.frac_bits})")
    graph = load_model(model, batch=opts.batch, output=opts.output)
    ctx = PassContext(frac_bits=opts.frac_bits, options=dict(opts.extra))
    passes = [Canonicalize()]
    if opts.guard is not None:
        from passes.guard import InsertGuard
        from runtime.guard import GuardConfig

        try:
            config = GuardConfig(**opts.guard_config)
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid guard option: {exc}") from None
        passes.append(InsertGuard(opts.guard, config))
    passes += [FixedPoint(), CostAnnotation()]
    pm = PassManager(passes)
    pm.run(graph, ctx)
    if isinstance(model, onnx.ModelProto):
        source, digest = graph.name, hashlib.sha256(model.SerializeToString()).hexdigest()
    else:
        source, digest = Path(model).name, hashlib.sha256(Path(model).read_bytes()).hexdigest()
    info = {"name": graph.name, "source": source, "source_sha256": digest, "output": graph.outputs[0],
            "batch": opts.batch, **graph.meta.get("plan_model_info", {})}
    plan, weights = build_plan(graph, frac_bits=opts.frac_bits, model_info=info,
                               passes=[r.to_json() for r in pm.records], warnings=ctx.warnings,
                               version_string=_version())
    return CompileResult(plan, weights, graph, ctx.warnings)


def write_plan(result: CompileResult, out_dir: str | Path) -> Path:
    """Write plan.json, weights.npz and the rendered reports into ``out_dir``."""
    from .report import render

    d = result.plan.save(out_dir, result.weights)
    (d / "report.txt").write_text(render(result.plan, "text"))
    (d / "report.html").write_text(render(result.plan, "html"))
    (d / "plan.dot").write_text(render(result.plan, "dot"))
    return d
