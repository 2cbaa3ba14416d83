"""Running a plan locally: the fixed-point reference, and the three parties as threads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compiler.errors import InputError
from compiler.plan import Plan

from .executor import Executor
from .plain import PlainEngine
from .ring import MAX_ABS_REAL, decode, encode

__all__ = ["RunResult", "check_inputs", "run_reference", "run_threads"]


@dataclass
class RunResult:
    """Decoded outputs (float64 arrays by output name) and, for secure runs, statistics."""

    outputs: dict[str, np.ndarray]
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        return next(iter(self.outputs.values()))


def check_inputs(plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Validate user inputs against the plan: names, shapes, numeric dtype, finiteness, range.

    A single array is accepted for a single-input plan. Returns float64 arrays by input name."""
    specs = plan.inputs
    if not isinstance(inputs, dict):
        if len(specs) != 1:
            raise InputError(f"the plan has {len(specs)} inputs; pass a dict of name -> array")
        inputs = {specs[0]["name"]: inputs}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, shape = spec["name"], tuple(spec["shape"])
        if name not in inputs:
            raise InputError(f"missing input {name!r} (plan inputs: {', '.join(s['name'] for s in specs)})")
        a = np.asarray(inputs[name])
        if a.dtype.kind not in "fiu":
            raise InputError(f"input {name!r} has dtype {a.dtype}; expected a real numeric array (float32)")
        if a.shape != shape:
            hint = " (recompile with --batch N to change the batch size)" if a.shape[1:] == shape[1:] else ""
            raise InputError(f"input {name!r} has shape {a.shape}; the plan expects {shape}{hint}")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InputError(f"input {name!r} contains NaN or infinite values")
        limit = MAX_ABS_REAL(plan.frac_bits) / 2**plan.frac_bits
        if a.size and np.abs(a).max() >= limit:
            raise InputError(f"input {name!r} has magnitude {np.abs(a).max():.3g}, beyond the fixed-point limit {limit:.3g}")
        out[name] = a
    return out


def run_reference(plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray,
                  weights: dict[str, np.ndarray] | None = None) -> RunResult:
    """Execute the plan on cleartext ring values with the secure runtime's arithmetic."""
    xs = check_inputs(plan, inputs)
    w = plan.load_weights() if weights is None else weights
    t0 = time.perf_counter()
    ex = Executor(plan, PlainEngine(plan.frac_bits))
    ex.share_weights(w)
    ring_inputs = {k: encode(v, plan.frac_bits) for k, v in xs.items()}
    revealed = ex.run(ring_inputs)
    outs = {k: decode(v, plan.frac_bits) for k, v in revealed.items()}
    return RunResult(outs, time.perf_counter() - t0)


def run_threads(plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray,
                weights: dict[str, np.ndarray] | None = None, *, timeout: float = 60.0) -> RunResult:
    """Execute the plan between three in-process parties (threads) and an in-process client."""
    raise NotImplementedError  # filled in when the secure engine lands


def _ring(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
