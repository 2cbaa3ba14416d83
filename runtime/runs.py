"""A run's inputs, checked against the plan before anything is shared, and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.core.errors import InputError

from .ring import MAX_ABS_REAL

__all__ = ["RunResult", "check_inputs"]


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
        # a product of two such values must stay below 2^62 ring units at scale 2f
        limit = MAX_ABS_REAL(plan.frac_bits) / 2**plan.frac_bits
        if a.size and np.abs(a).max() >= limit:
            raise InputError(
                f"input {name!r} has magnitude {np.abs(a).max():.3g}, beyond the fixed-point limit {limit:.3g}"
            )
        out[name] = a
    return out
