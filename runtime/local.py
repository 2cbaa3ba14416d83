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
        # a product of two such values must stay below 2^62 ring units at scale 2f
        limit = MAX_ABS_REAL(plan.frac_bits) / 2**plan.frac_bits
        if a.size and np.abs(a).max() >= limit:
            raise InputError(
                f"input {name!r} has magnitude {np.abs(a).max():.3g}, beyond the fixed-point limit {limit:.3g}"
            )
        out[name] = a
    return out


def run_reference(
    plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray, weights: dict[str, np.ndarray] | None = None
) -> RunResult:
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


def run_threads(
    plan: Plan,
    inputs: dict[str, np.ndarray] | np.ndarray,
    weights: dict[str, np.ndarray] | None = None,
    *,
    timeout: float = 60.0,
) -> RunResult:
    """Execute the plan between three in-process parties (threads) and an in-process client.

    P0 is the model owner's server: it alone reads the weights and secret-shares them. The client
    secret-shares the inputs and is the only one to receive the output. ``stats`` holds the
    rounds and bytes every party sent, per step (see :func:`runtime.stats.summarize`)."""
    from .rss import run_threads as run_parties
    from .stats import summarize

    xs = check_inputs(plan, inputs)
    w = plan.load_weights() if weights is None else weights
    f = plan.frac_bits
    ring_inputs = {k: encode(v, f) for k, v in xs.items()}

    def party(engine) -> None:
        ex = Executor(plan, engine)
        ex.share_weights(w if engine.party == 0 else None)
        ex.run(None)

    def client(c) -> dict[str, torch.Tensor]:
        for spec in plan.inputs:
            with c.transport.step(f"input:{spec['name']}"):
                c.share_input(ring_inputs[spec["name"]])
        out = {}
        for spec in plan.outputs:
            with c.transport.step(f"reveal:{spec['name']}"):
                out[spec["name"]] = c.receive_output(spec["shape"])
        return out

    t0 = time.perf_counter()
    _, revealed, per_party = run_parties(party, client, frac_bits=f, timeout=timeout)
    seconds = time.perf_counter() - t0
    stats = summarize(per_party, [s["name"] for s in plan.steps])
    outs = {k: decode(v, f) for k, v in revealed.items()}
    return RunResult(outs, seconds, stats)
