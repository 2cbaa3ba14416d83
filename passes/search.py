"""Measuring candidates: the fixed-point reference executor on calibration inputs, checkpointed per node.

:class:`PlanEvaluator` runs the evaluation plan through :class:`siguard.runtime.executor.Executor` (its
``run`` resumes from a checkpoint of live values, so each candidate re-runs only the rest of the network);
:class:`GuardEvaluator` runs the guard alone against its float oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from siguard.compiler.backend import build_plan
from siguard.compiler.ir import Graph, Node
from siguard.privacy.defender import DefenderWeights
from siguard.privacy.memguard import guard_reference, softmax
from siguard.runtime.executor import Executor
from siguard.runtime.kernels.guard import secure_guard
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.ring import decode, encode

from .candidates import Candidate

__all__ = ["measure", "PlanEvaluator", "Decision", "GuardEvaluator", "GUARD_CAL_QUERIES", "GUARD_L1_GROWTH"]


# ---- measuring candidates on the fixed-point reference executor ---------------------------------------
def measure(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max absolute difference) of outputs (N, k) against the reference."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    if got.ndim >= 2:
        g2, w2 = got.reshape(len(got), -1), want.reshape(len(want), -1)
        top1 = float((g2.argmax(1) == w2.argmax(1)).mean())
    else:
        top1 = 1.0
    return top1, diff


class PlanEvaluator:
    """Runs the evaluation graph (fixed point, scales assigned) on the calibration inputs with the
    fixed-point reference engine, keeping a checkpoint of every chunk's live values before the
    node being decided so each candidate only re-runs the rest of the network.

    The steps run through :meth:`Executor.run` (``env``/``start``/``stop`` resume from the checkpoint);
    a candidate is put in place by changing the plan step it runs (:meth:`set_impl`)."""

    def __init__(self, graph: Graph, x: np.ndarray, reference: np.ndarray, frac_bits: int):
        self.f = frac_bits
        plan, weights = build_plan(graph, frac_bits=frac_bits, model_info={"name": graph.name,
                                   "output": graph.outputs[0]})
        self.plan = plan
        self.engine = PlainEngine(frac_bits)
        self.ex = Executor(plan, self.engine)
        self.ex.share_weights(weights)
        self.steps = plan.steps
        self.index = {s.name: i for i, s in enumerate(self.steps)}
        self.output = graph.outputs[0]
        self.reveal_at = next(i for i, s in enumerate(self.steps) if s.op == "reveal")
        batch = int(graph.values[graph.inputs[0]].shape[0])
        self.input_name = graph.inputs[0]
        self.chunks: list[tuple[dict[str, torch.Tensor], int]] = []
        for a in range(0, len(x), batch):
            part = x[a : a + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - n, axis=0)], axis=0)
            shaped = part.reshape(graph.values[self.input_name].shape).astype(np.float64)
            self.chunks.append(({self.input_name: encode(shaped, self.f)}, n))
        self.reference = reference
        self.envs: list[dict[str, Any]] = [{} for _ in self.chunks]
        self.pos = 0

    def set_impl(self, name: str, cand: Candidate) -> None:
        self.steps[self.index[name]].set_impl(cand.impl, cand.param_dict)

    def advance(self, name: str) -> None:
        """Move the checkpoint to just before step ``name`` (with the implementations set so far)."""
        stop = self.index[name]
        for env, (inputs, _) in zip(self.envs, self.chunks, strict=True):
            self.ex.run(inputs, env=env, start=self.pos, stop=stop)
        self.pos = stop

    def node_input(self, name: str) -> np.ndarray:
        """The float value of step ``name``'s first input at the checkpoint (all calibration inputs)."""
        value = self.steps[self.index[name]].inputs[0]
        parts = [decode(_ring(env[value]), self.f)[:n] for env, (_, n) in zip(self.envs, self.chunks, strict=True)]
        return np.concatenate(parts, axis=0)

    def evaluate(self) -> tuple[float, float, np.ndarray]:
        """(top-1, max |change|, output) of the rest of the network from the checkpoint."""
        outs = []
        for env, (inputs, n) in zip(self.envs, self.chunks, strict=True):
            revealed = self.ex.run(inputs, env=dict(env), start=self.pos, stop=self.reveal_at + 1)
            outs.append(decode(_ring(revealed[self.output]), self.f)[:n])
        y = np.concatenate(outs, axis=0)
        top1, diff = measure(y, self.reference.reshape(y.shape))
        return top1, diff, y


def _ring(v: Any) -> torch.Tensor:
    """The ring tensor of a reference-engine value (a cleartext box or a bare tensor)."""
    return v.v if isinstance(v, Clear) else v


@dataclass
class Decision:
    node: Node
    cands: list[Candidate]
    chosen: Candidate
    accurate: Candidate
    how: str
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    tried: int = 0


#: Calibration queries the guard's candidates are run on (its 6 x 49 steps make each run costly).
GUARD_CAL_QUERIES = 64


#: A lowered guard setting may move the released vector at most this factor further (mean L1) from
#: the float oracle's than the configured setting does.
GUARD_L1_GROWTH = 1.5


class GuardEvaluator:
    """Runs the guard alone (fixed-point reference engine) on calibration logits and compares its accept
    decisions with the float oracle :func:`siguard.privacy.memguard.guard_reference` of the same configuration."""

    def __init__(self, graph: Graph, node: Node, logits: np.ndarray, config: Any, frac_bits: int):
        self.f = frac_bits
        self.config = config
        self.z = np.asarray(logits, dtype=np.float64)
        w = [np.asarray(graph.values[n].data, dtype=np.float64) for n in node.inputs[1:]]
        self.weights = w  # W1^T, b1, W2^T, b2, w3^T, b3 as the guard node takes them
        d = DefenderWeights(w[0].T, w[1], w[2].T, w[3], w[4].T, w[5])
        c = config
        oracle = guard_reference(self.z, d, **c.oracle_options())
        self.plain = softmax(self.z)
        self.oracle_guarded = np.asarray(oracle.guarded, dtype=np.float64)
        # the same test on both sides: the released vector moved from softmax(z) (oracle: accepted noise
        # so small that it does not move the vector counts as not accepted, as in the audit)
        self.oracle_accepted = np.abs(np.asarray(oracle.guarded) - self.plain).sum(1) > 2e-3

    def __call__(self, knobs: dict[str, int]) -> dict[str, float]:
        e = PlainEngine(self.f)
        args = [Clear(encode(a, self.f)) for a in (self.z, *self.weights)]
        q = decode(secure_guard(e, *args, config=replace(self.config, **knobs)).v, self.f)
        accepted = np.abs(q - self.plain).sum(1) > 2e-3  # the audit's "noised" test
        return {"accept_agreement": round(float((accepted == self.oracle_accepted).mean()), 6),
                "labels_kept": round(float((q.argmax(1) == self.z.argmax(1)).mean()), 6),
                "oracle_l1": float(f"{np.abs(q - self.oracle_guarded).sum(1).mean():.4g}")}
