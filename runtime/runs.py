"""A run's inputs, checked against the plan before anything is shared, and its result."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.core.errors import InputError
from siguard.core.fixedpoint import MAX_ABS_REAL

__all__ = ["RunResult", "check_inputs"]


def _check_domain(name: str, a: np.ndarray, domain: Any, frac_bits: int) -> None:
    """Refuse an input outside the plan's input domain (passes/bounds.py: the range on which no
    intermediate can overflow), naming the first offending value and the bound. A plan without a
    domain (compiled before it was recorded) gets the old limit: a product of two inputs must stay
    below 2^62 ring units at scale 2f."""
    if not a.size:
        return
    if domain is None:
        lim = MAX_ABS_REAL(frac_bits) / 2**frac_bits
        lo, hi = -lim, lim
    else:
        lo, hi = float(domain[0]), float(domain[1])
    bad = (a < lo) | (a > hi)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        v = float(a[idx])
        raise InputError(f"input {name!r} holds {v:.6g} at index {list(idx)}, outside the plan's input domain "
                         f"[{lo:g}, {hi:g}] (beyond it an intermediate could overflow; recompile with --input-range "
                         "or rescale the input)")


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
    """Validate user inputs against the plan: names, shapes, float dtype, finiteness, range.

    Float arrays of any width are accepted (float16/32/64): encoding rounds each value to the
    fixed-point grid (2^-frac_bits), which is exact for float64 too. Integer and boolean arrays are
    refused, as onnxruntime refuses them for a float input (raw integer pixels fed to a model that
    expects scaled floats would be a silent wrong answer).

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
        if a.dtype.kind != "f":  # floats of any width: encoding rounds them to the 2^-f grid either way
            raise InputError(f"input {name!r} has dtype {a.dtype}; the plan expects {spec.get('dtype', 'float32')} "
                             f"(any float dtype is accepted; convert other arrays explicitly, e.g. .astype('float32'))")
        if a.shape != shape:
            hint = " (recompile with --batch N to change the batch size)" if a.shape[1:] == shape[1:] else ""
            raise InputError(f"input {name!r} has shape {a.shape}; the plan expects {shape}{hint}")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InputError(f"input {name!r} contains NaN or infinite values")
        _check_domain(name, a, spec.get("domain"), plan.frac_bits)
        if spec.get("domain_source") == "unproven":
            logging.getLogger("siguard.runtime").warning(
                "input %r: this plan's fixed-point headroom is not proven (the compiler found no safe input domain); "
                "an intermediate may overflow", name)
        out[name] = a
    return out
