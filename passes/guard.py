"""Guard pass: insert the SIGuard noise node after the model's logits."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from siguard.compiler.ir import Graph, Node, Value
from siguard.core.config import GuardConfig
from siguard.core.errors import InputError, ModelError
from siguard.privacy.defender import DefenderWeights

from .base import Pass, PassContext

__all__ = ["InsertGuard", "GUARD_OUTPUT", "gradient_bound_bits", "activation_bound_bits", "guard_bounds"]

GUARD_OUTPUT = "guarded_probs"


class InsertGuard(Pass):
    """Inserts the guard node so that the plan reveals only guarded probabilities.

    Rules:

    1. The logits are the compiled output's value, unless that output is produced by a Softmax
       over the last axis: then the Softmax's input is the logits and the Softmax is removed
       (the guard computes the softmax itself, inside MPC).
    2. The logits must be a (batch, k) matrix whose k equals the defender's input width; any
       other shape is refused with a message.
    3. The defender's weights (W1, b1, W2, b2, w3, b3 of the k -> H1 -> H2 -> 1 MLP) become the
       model owner's secret weights ``guard.*``; the guard's counts and constants are public
       attributes (part of the plan, so timing reveals nothing).
    4. The plan's only output becomes ``guarded_probs`` (batch, k); the raw output is no longer
       revealed. Without a defender the pass is not run and the plan reveals the model's output.
    5. ``grad_bound_bits`` becomes the smallest b with c1 |grad h| + c3 < 2^b for every input, from the
       defender's weights: |dh/dx_i| <= sum_a |W1_ai| sum_b |W2_ba| |w3_b| (all ReLU masks open). Only
       this power of two is public; the parallel schedule's sign test takes its headroom from it.
    6. ``h1_bound_bits``, ``h2_bound_bits``, ``score_bound_bits`` become powers of two bounding the defender's
       two hidden pre-activations and its score over every probability vector (:func:`activation_bound_bits`):
       the parallel schedule's sign tests of them run on 32 bits (7 rounds instead of 8).
    7. The parallel schedule keeps the sum of the ratios, D < D_max = 1.02 k e^(2 lr_max), at scale 56 in a
       ring of 64 bits, and truncates it: D_max must stay below :data:`RATIO_SUM_LIMIT` (64). A configuration
       beyond it (about 26 classes at the default learning rates) is refused here, naming the limit, rather
       than compiled into a plan whose guard would overflow silently.
    """

    name = "guard"

    def __init__(self, defender: str | Path | Any, config: GuardConfig | None = None):
        self.defender = defender
        self.config = config or GuardConfig()

    def _weights(self):
        if isinstance(self.defender, DefenderWeights):
            return self.defender
        path = Path(self.defender)
        if not path.exists():
            raise InputError(f"defender file {path} does not exist")
        return DefenderWeights.from_onnx(path)

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        d = self._weights()
        out = graph.outputs[0]
        producer = graph.producer(out)
        changes = []
        logits = out
        if producer is not None and producer.op == "softmax":
            rank = len(graph.values[producer.inputs[0]].shape)
            if int(producer.attrs.get("axis", -1)) in (-1, rank - 1):
                logits = producer.inputs[0]
                graph.nodes.remove(producer)
                changes.append(f"removed final softmax {producer.name}: the guard takes its input {logits!r}")
        shape = graph.values[logits].shape
        k = d.W1.shape[1]
        if len(shape) != 2 or shape[1] != k:
            raise ModelError(
                f"the guard needs (batch, {k}) logits to match the defender's input width; output {logits!r} "
                f"has shape {list(shape)}"
            )
        check_ratio_headroom(self.config, k)
        names = []
        for name, arr in (("W1", d.W1.T), ("b1", d.b1), ("W2", d.W2.T), ("b2", d.b2), ("w3", d.w3.T), ("b3", d.b3)):
            v = graph.add_value(Value(f"guard.{name}", tuple(arr.shape), owner="model",
                                      data=np.ascontiguousarray(arr, dtype=np.float64)))
            names.append(v.name)
        graph.add_value(Value(GUARD_OUTPUT, tuple(shape)))
        self.config = replace(self.config, **guard_bounds(d, self.config))
        attrs = {k_: v for k_, v in asdict(self.config).items()}
        node = Node("guard", "guard", [logits, *names], [GUARD_OUTPUT], attrs,
                    impl=f"memguard-{self.config.schedule}", source="SIGuard guard")
        graph.add_node(node)
        graph.outputs = [GUARD_OUTPUT]
        graph.remove_unused()
        c = self.config
        changes.append(
            f"inserted guard after {logits!r}: defender {k}->{d.W1.shape[0]}->{d.W2.shape[0]}->1, "
            f"{c.rounds} rounds x {c.steps} steps, schedule {c.schedule}, validator {c.validator}"
            + (f", a sharpening round (lr {c.sharpen_lr:g})" if c.sharpen_lr else "")
            + (f", released in multiples of 2^-{c.release_bits}" if c.release_bits else "")
        )
        return changes


#: the parallel schedule's bound on the sum of the ratios (rule 7): D_max 2^56 must stay below trunc's 2^62
RATIO_SUM_LIMIT = 64.0


def check_ratio_headroom(config: GuardConfig, k: int) -> None:
    """Rule 7 of :class:`InsertGuard`: raise ModelError if the parallel schedule's ratio sum can leave its
    fixed-point headroom for k classes (D_max = 1.02 k e^(2 lr_max) >= :data:`RATIO_SUM_LIMIT`)."""
    if config.schedule != "parallel":
        return
    d_max = 1.02 * k * math.exp(2.0 * config.lr_max)
    if d_max >= RATIO_SUM_LIMIT:
        k_max = math.ceil(RATIO_SUM_LIMIT / (1.02 * math.exp(2.0 * config.lr_max))) - 1
        raise ModelError(
            f"the guard's parallel schedule supports at most {k_max} classes at its largest learning rate "
            f"{config.lr_max:.3g} (lr {config.lr:g} x growth {config.lr_growth:g}^{config.rounds - 1}); this model "
            f"has {k}: the sum of the ratios would overflow its fixed-point headroom. Use fewer --guard-rounds or "
            f"a smaller --guard-lr or --guard-lr-growth"
        )


def gradient_bound_bits(d: Any, c1: float, c3: float) -> int:
    """The smallest b >= 0 with c1 |grad h(x)| + c3 < 2^b for every x (rule 5 of :class:`InsertGuard`)."""
    path = np.abs(d.W1).T @ (np.abs(d.W2).T @ np.abs(d.w3[0]))  # (k,): every ReLU open
    bound = abs(c1) * float(path.max()) + abs(c3)
    return max(0, math.ceil(math.log2(bound * 1.001)))


def activation_bound_bits(d: Any) -> tuple[int, int, int]:
    """Smallest integers (b1, b2, b3) with |q W1 + b1| < 2^b1, |relu(q W1 + b1) W2 + b2| < 2^b2 and |h(q)| < 2^b3
    for every probability vector q (rule 6 of :class:`InsertGuard`), by interval arithmetic: q_j >= 0 with
    sum_j q_j = 1 puts unit a of q W1 + b1 in [min_j W1_aj + b1_a, max_j W1_aj + b1_a]; ReLU and the next
    layer's product propagate the interval (positive weights take the same end, negative ones the other).
    The bounds hold with 2 % and 2^-8 to spare, which covers the fixed-point rounding of the weights
    (2^-(f+1) each) and of the activations (a few ulps through a layer)."""
    def bits(v: np.ndarray) -> int:
        return math.ceil(math.log2(float(np.max(np.abs(v))) * 1.02 + 2.0**-8))

    lo1, hi1 = d.W1.min(axis=1) + d.b1, d.W1.max(axis=1) + d.b1
    h_lo, h_hi = np.maximum(lo1, 0.0), np.maximum(hi1, 0.0)
    pos, neg = np.maximum(d.W2, 0.0), np.minimum(d.W2, 0.0)
    lo2, hi2 = pos @ h_lo + neg @ h_hi + d.b2, pos @ h_hi + neg @ h_lo + d.b2
    g_lo, g_hi = np.maximum(lo2, 0.0), np.maximum(hi2, 0.0)
    pos3, neg3 = np.maximum(d.w3[0], 0.0), np.minimum(d.w3[0], 0.0)
    lo3, hi3 = pos3 @ g_lo + neg3 @ g_hi + d.b3[0], pos3 @ g_hi + neg3 @ g_lo + d.b3[0]
    return bits(np.concatenate([lo1, hi1])), bits(np.concatenate([lo2, hi2])), bits(np.array([lo3, hi3]))


def guard_bounds(d: Any, config: GuardConfig) -> dict[str, int]:
    """The public bounds the guard pass records from the defender's weights (rules 5 and 6 of
    :class:`InsertGuard`), as :class:`GuardConfig` fields: ``replace(config, **guard_bounds(d, config))``."""
    b1, b2, b3 = activation_bound_bits(d)
    return {"grad_bound_bits": gradient_bound_bits(d, config.c1, config.c3), "h1_bound_bits": b1,
            "h2_bound_bits": b2, "score_bound_bits": b3}
