"""The plan executor: one object per party walks the plan's steps over an Engine.

Call tree (override points)::

    Executor.run(inputs[, env, start, stop])
      ├─ input step                client input -> checked, clamped shares  (op "input")
      ├─ run_step(step, env)       one plan step (the per-step hook)
      │    └─ handlers.HANDLERS[op](ctx, step, args)   (runtime/kernels/handlers.py)
      │       (on the scale-checking reference, its arguments' and results' scales are checked)
      └─ engine.reveal(...)        open the output to the client only      (op "reveal")

Values are freed after their last use, so memory stays flat on deep networks. Every error is
re-raised as :class:`siguard.core.errors.RuntimeFault` naming the step, the op and the party.
The same executor runs the fixed-point reference (``PlainEngine``), each secure party
(``RSSEngine``) and the cost model (``CostEngine``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from siguard.compiler.plan import Plan, PlanStep
from siguard.core.errors import RuntimeFault, SiguardError
from siguard.runtime.kernels.engine import Engine
from siguard.runtime.kernels.handlers import handler_for
from siguard.runtime.kernels.inputs import client_bounds, client_input

from .ring import encode

__all__ = ["Executor", "StepContext", "encode_public_constants"]


class StepContext:
    """What a handler may use besides its arguments: the engine, the fractional bits and each value's
    fixed-point scale (None = the default ``frac_bits``). Built from a plan (:meth:`for_plan`) by the
    executor, and from an IR graph by the cost pass."""

    def __init__(self, engine: Engine, frac_bits: int, scales: Mapping[str, int | None]):
        self.e = engine
        self.frac_bits = int(frac_bits)
        self._scales = scales

    @classmethod
    def for_plan(cls, engine: Engine, plan: Plan) -> StepContext:
        return cls(engine, plan.frac_bits, {name: v["scale"] for name, v in plan.values.items()})

    def scale_of(self, name: str) -> int:
        s = self._scales[name]
        return self.frac_bits if s is None else int(s)


def encode_public_constants(plan: Plan) -> dict[str, torch.Tensor]:
    """Public constants of the plan as ring tensors at their declared scales."""
    out = {}
    for name, c in plan.doc["constants"].items():
        data = np.asarray(c["data"], dtype=np.float64).reshape(c["shape"])
        out[name] = encode(data, int(c["scale"]))
    return out


class Executor:
    """Runs ``plan`` for one party on ``engine`` (see the module docstring).

    ``progress`` (optional) is called as ``progress(i, n, step)`` before each step.
    """

    def __init__(self, plan: Plan, engine: Engine, progress: Callable[[int, int, PlanStep], None] | None = None):
        self.plan = plan
        self.engine = engine
        self.ctx = StepContext.for_plan(engine, plan)
        self.progress = progress
        self.constants = encode_public_constants(plan)
        self.weights: dict[str, Any] = {}
        #: wall seconds this party spent in each step of the last :meth:`run` (communication included)
        self.step_seconds: dict[str, float] = {}
        self._last_use = self._compute_last_use()
        self._bounds = {spec["name"]: client_bounds(spec, plan.frac_bits) for spec in plan.inputs}
        #: the scale-checking reference engine's check of every step's fixed-point scales, else None
        #: (runtime/kernels/scales.py); its ``unchecked`` lists the outputs whose scale a kernel lost
        check = getattr(engine, "scale_check", None)
        self.scale_check = check(plan) if check is not None else None

    # ---- set-up -------------------------------------------------------------------------------
    def _compute_last_use(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, step in enumerate(self.plan.steps):
            for name in step.inputs:
                last[name] = i
        return last

    def _step_scope(self, name: str):
        transport = getattr(self.engine, "transport", None)
        if transport is not None and hasattr(transport, "step"):
            return transport.step(name)
        step = getattr(self.engine, "step", None)
        return step(name) if callable(step) else contextlib.nullcontext()

    def share_weights(self, weights: dict[str, np.ndarray] | None) -> None:
        """Secret-share the model owner's weights (given only where the owner runs, else None).

        Run once per party before queries; the shares persist across queries."""
        with self._step_scope("setup:weights"):
            for w in self.plan.doc["weights"]:
                name, shape, scale = w["name"], tuple(w["shape"]), int(w["scale"])
                value = None if weights is None else encode(np.asarray(weights[name], dtype=np.float64), scale)
                try:
                    self.weights[name] = self.engine.input("model", value, shape)
                except SiguardError:
                    raise
                except Exception as exc:
                    raise RuntimeFault(f"sharing weight {name!r} failed on {self._who()}: {exc}") from exc

    def use_weights(self, shared: dict[str, Any], *, release: bool = False) -> None:
        """Start a session with the weights shared at set-up (:meth:`share_weights`), re-randomised
        by :meth:`siguard.runtime.kernels.engine.Engine.rerandomise`: no two sessions (and no two queries of one
        session) compute on the same share components. 0 rounds, 0 bytes.

        ``release``: the last session of these shares (a one-shot run): ``shared`` is emptied as it goes,
        each set-up share dropped once its fresh one is made, so the two sets never coexist (a fresh
        process then touches one weight set's memory, not two: ResNet-34, 0.7 GB fewer fresh pages)."""
        forget = getattr(self.engine, "forget_prepared", None)
        if forget is not None:  # matrices prepared from the previous components would keep them alive
            forget()
        if not release:
            self.weights = {name: self.engine.rerandomise(w) for name, w in shared.items()}
            return
        fresh: dict[str, Any] = {}
        self.weights = fresh  # (may have been ``shared`` itself, right after share_weights)
        for name in list(shared):
            fresh[name] = self.engine.rerandomise(shared.pop(name))

    def _who(self) -> str:
        p = self.engine.party
        return "the reference executor" if p is None else f"party P{p}"

    # ---- running ------------------------------------------------------------------------------
    def run(self, inputs: dict[str, torch.Tensor] | None = None, *, env: dict[str, Any] | None = None,
            start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor | None]:
        """Execute the steps. ``inputs`` maps input names to ring tensors where the client's
        data is available to this engine (the plain engine), else None. Returns the revealed
        outputs (ring tensors at the receiver, None elsewhere).

        ``env``, ``start``, ``stop``: run only steps ``start`` to ``stop - 1`` on the live values in
        ``env`` (updated in place: a checkpoint that a later call resumes from). The approximation
        search measures each candidate this way, re-running only the steps after the node it decides."""
        if self.plan.doc["weights"] and not self.weights:
            raise RuntimeFault(f"{self._who()}: weights were not shared before running")
        env = {} if env is None else env
        outputs: dict[str, torch.Tensor | None] = {}
        steps = self.plan.steps
        stop = len(steps) if stop is None else stop
        timings = self.step_seconds = {}
        clock = time.perf_counter
        for i in range(start, stop):
            step = steps[i]
            if self.progress is not None:
                self.progress(i, len(steps), step)
            t0 = clock()
            with self._step_scope(step.name):
                try:
                    if step.op == "input":
                        name = step.outputs[0]
                        value = None if inputs is None else inputs[name]
                        shape = tuple(self.plan.values[name]["shape"])
                        owner = step.attrs.get("owner", "client")
                        if owner == "client":  # checked for consistency and clamped: runtime/kernels/inputs.py
                            env[name] = client_input(self.engine, value, shape, self._bounds[name])
                        else:
                            env[name] = self.engine.input(owner, value, shape)
                    elif step.op == "reveal":
                        name = step.inputs[0]
                        outputs[name] = self.engine.reveal(self._get(env, name), step.attrs.get("to", "client"))
                    else:
                        self.run_step(step, env)
                except SiguardError as exc:
                    if isinstance(exc, RuntimeFault):
                        raise
                    raise RuntimeFault(self._where(i, step) + f": {exc}") from exc
                except Exception as exc:
                    raise RuntimeFault(self._where(i, step) + f": {type(exc).__name__}: {exc}") from exc
            self._free(env, i, step)
            timings[step.name] = clock() - t0
        return outputs

    def run_step(self, step: PlanStep, env: dict[str, Any]) -> None:
        """Execute one plan step: gather arguments, dispatch to the op's handler, store outputs."""
        args = [self._get(env, n) for n in step.inputs]
        if self.scale_check is not None:
            self.scale_check.arguments(step, args)
        results = handler_for(step.op)(self.ctx, step, args)
        if self.scale_check is not None:
            self.scale_check.results(step, results)
        for name, value in zip(step.outputs, results, strict=True):
            env[name] = value

    def _get(self, env: dict[str, Any], name: str):
        if name in env:
            return env[name]
        if name in self.weights:
            return self.weights[name]
        if name in self.constants:
            return self.constants[name]
        raise KeyError(f"value {name!r} is not available (freed or never produced)")

    def _free(self, env: dict[str, Any], i: int, step: PlanStep) -> None:
        for name in step.inputs:
            if self._last_use.get(name) == i:
                env.pop(name, None)

    def _where(self, i: int, step: PlanStep) -> str:
        return f"step {i} '{step.name}' (op {step.op}, impl {step.impl}) failed on {self._who()}"
