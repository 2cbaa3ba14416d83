"""The ``compile`` pipeline: ONNX -> IR -> passes -> plan directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from siguard.compiler.arrays import load_npy
from siguard.compiler.backend import build_plan
from siguard.compiler.frontend import load_model
from siguard.compiler.plan import Plan
from siguard.compiler.report import render
from siguard.core.config import GuardConfig, parse_budget
from siguard.core.errors import InputError, SiguardError
from siguard.passes.approx import Approximate
from siguard.passes.base import PassContext, PassManager
from siguard.passes.bounds import Bounds, parse_input_range
from siguard.passes.calibrate import Calibrate
from siguard.passes.canonicalize import Canonicalize
from siguard.passes.cost import CostAnnotation
from siguard.passes.fixedpoint import FixedPoint
from siguard.passes.fuse import FuseTruncation
from siguard.passes.guard import InsertGuard

__all__ = ["CompileOptions", "CompileResult", "compile_model", "write_plan", "load_npy"]


#: the guard's fixed-point scales (ratios at 2f + 8 bits, the tie at 2^-14) need at least this many fractional bits:
#: below it a shift goes negative (f <= 10), and at 11 the reference released the oracle's vector on only 97.6 % of
#: 500 Fashion-MNIST queries (99.4 % at 12, 100 % at 16)
GUARD_MIN_FRAC_BITS = 12


@dataclass
class CompileOptions:
    """Options of ``siguard compile`` (see the README's CLI reference)."""

    batch: int = 1
    output: str | None = None
    inputs: tuple[str, ...] = ()  # graph inputs kept as inputs though an initializer gives a default (IR 3)
    frac_bits: int = 16
    guard: Any = None  # defender ONNX path (or siguard.privacy.defender.DefenderWeights); None = no guard
    guard_config: dict[str, Any] = field(default_factory=dict)  # siguard.core.config.GuardConfig fields
    calibration: Any = None  # calibration inputs: an array (N, ...) or a .npy path; None = default ranges
    approx: str = "auto"  # auto | exact | crypten | default (see siguard.passes.approx.Approximate)
    overrides: dict[str, str] = field(default_factory=dict)  # node name -> implementation (--approx NODE=IMPL)
    accuracy_budget: Any = None  # "top1=0.995,prob=0.01" or siguard.core.config.AccuracyBudget; None = default
    objective: str = "rounds"  # rounds | bytes
    input_range: Any = None  # "LO,HI", ["NAME=LO,HI", ...] or {name: (lo, hi)}; None = derived (siguard.passes.bounds)
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


def _calibration_array(data: Any) -> np.ndarray | None:
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_npy(data, "calibration")
    return np.asarray(data)


def _onnx_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model))
    except Exception as exc:
        raise InputError(f"{model}: cannot read the ONNX model for calibration ({exc})") from None


def _evaluation_graph(model: Any, opts: CompileOptions, n: int, ranges: dict[str, tuple[float, float]]):
    """The model at a batch of up to 256 calibration inputs (or the plan's batch if its batch axis is
    fixed), canonicalized and in fixed point: what the approximation pass runs candidates on."""

    try:
        g = load_model(model, batch=min(n, 256), output=opts.output, inputs=opts.inputs)
    except SiguardError:  # a fixed batch axis
        g = load_model(model, batch=opts.batch, output=opts.output, inputs=opts.inputs)
    PassManager([Canonicalize()]).run(g, PassContext(frac_bits=opts.frac_bits))
    for name, rng in ranges.items():
        if name in g.values:
            g.values[name].range = rng
    PassManager([FixedPoint()]).run(g, PassContext(frac_bits=opts.frac_bits))
    return g


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def compile_model(model: str | Path | onnx.ModelProto, options: CompileOptions | None = None) -> CompileResult:
    """Compile an ONNX model (path or ModelProto) into a plan (not yet written to disk)."""

    opts = options or CompileOptions()
    if opts.batch < 1:
        raise InputError(f"--batch must be >= 1 (got {opts.batch})")
    if not 8 <= opts.frac_bits <= 24:
        raise InputError(f"--frac-bits must be between 8 and 24 (got {opts.frac_bits})")
    budget = opts.accuracy_budget if not isinstance(opts.accuracy_budget, (str, type(None))) else \
        parse_budget(opts.accuracy_budget)
    graph = load_model(model, batch=opts.batch, output=opts.output, inputs=opts.inputs)
    ctx = PassContext(frac_bits=opts.frac_bits, options=dict(opts.extra))
    ctx.warnings.extend(graph.meta.get("warnings", []))  # the frontend's (e.g. the ZipMap output choice)
    passes = [Canonicalize()]
    x_cal = _calibration_array(opts.calibration)
    calibrate = None
    if x_cal is not None:
        calibrate = Calibrate(_onnx_model(model), x_cal)
        passes.append(calibrate)
    if opts.guard is not None:

        try:
            config = GuardConfig.for_schedule(**opts.guard_config)
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid guard option: {exc}") from None
        if opts.frac_bits < GUARD_MIN_FRAC_BITS:
            raise InputError(f"the guard needs --frac-bits {GUARD_MIN_FRAC_BITS} or more (got {opts.frac_bits}): its "
                             "ratio and tie scales are sized for it")
        if config.release_bits >= opts.frac_bits:  # the grid 2^-B must be a whole number of ulps above 1
            raise InputError(f"--guard-release-bits {config.release_bits} needs --frac-bits above it "
                             f"(got {opts.frac_bits})")
        passes.append(InsertGuard(opts.guard, config))
    approximate = Approximate(None, None, opts.approx, opts.overrides, budget, opts.objective)
    # the bounds pass checks the final implementations (after fusion) and may widen their ranges,
    # which the cost pass then counts
    declared = parse_input_range(opts.input_range if opts.input_range is not None else opts.extra.get("input_range"),
                                 list(graph.inputs))
    bounds = Bounds(declared, x_cal)
    passes += [FixedPoint(), approximate, FuseTruncation(), bounds, CostAnnotation()]
    pm = PassManager(passes)
    for p in passes:  # the approximation pass needs what calibration measured
        if p is approximate and calibrate is not None and calibrate.result is not None:
            cal = calibrate.result
            approximate.calibration, approximate.x = cal, calibrate.x
            approximate.eval_graph = lambda c=cal: _evaluation_graph(model, opts, c.n, c.ranges)
        pm.records.append(p(graph, ctx))
    if isinstance(model, onnx.ModelProto):
        source, digest = graph.name, hashlib.sha256(model.SerializeToString()).hexdigest()
    else:
        source, digest = Path(model).name, hashlib.sha256(Path(model).read_bytes()).hexdigest()
    info = {"name": graph.name, "source": source, "source_sha256": digest, "output": graph.outputs[0],
            "batch": opts.batch, **graph.meta.get("plan_model_info", {})}
    plan, weights = build_plan(graph, frac_bits=opts.frac_bits, model_info=info,
                               passes=[r.to_json() for r in pm.records], warnings=ctx.warnings,
                               version_string=_version())
    domain = graph.meta.get("input_domain", {})
    for spec in plan.doc["inputs"]:  # public: the client refuses inputs outside it (siguard.runtime.runs.check_inputs)
        if spec["name"] in domain:
            spec["domain"] = domain[spec["name"]]
            spec["domain_source"] = graph.meta["input_domain_source"]
    records = graph.meta.get("approx", {})
    for step in plan.steps:
        if step.name in records:
            step.approx = _json_safe(records[step.name])
    plan.doc["approximation"] = {
        "mode": opts.approx,
        "objective": opts.objective,
        "budget": {"top1": budget.top1, "prob": budget.prob},
        "calibration_inputs": 0 if calibrate is None or calibrate.result is None else calibrate.result.n,
        "overrides": dict(opts.overrides),
        "measured": _json_safe(graph.meta.get("approx_measured")),
    }
    return CompileResult(plan, weights, graph, ctx.warnings)


def write_plan(result: CompileResult, out_dir: str | Path) -> Path:
    """Write plan.json, weights.npz and the rendered reports into ``out_dir``."""

    d = result.plan.save(out_dir, result.weights)
    (d / "report.txt").write_text(render(result.plan, "text"))
    (d / "report.html").write_text(render(result.plan, "html"))
    (d / "plan.dot").write_text(render(result.plan, "dot"))
    return d
