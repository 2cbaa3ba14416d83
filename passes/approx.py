"""Approximation pass: per nonlinear node, the cheapest implementation within an accuracy budget."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from siguard.compiler.calibrate import DEFAULT_RANGE, Calibration
from siguard.compiler.interp import OP_HANDLERS
from siguard.compiler.ir import Graph, Node
from siguard.compiler.ops import NONLINEAR_OPS, default_impl
from siguard.core.config import MODES, OBJECTIVES, AccuracyBudget, GuardConfig
from siguard.core.errors import InputError
from siguard.runtime.kernels.handlers import handler_for
from siguard.runtime.kernels.nonlinear import get_implementation
from siguard.runtime.kernels.plain import Clear
from siguard.runtime.ring import decode, encode

from .base import Pass, PassContext
from .candidates import GUARD_KNOBS, Candidate, candidate, candidates_for, guard_label, parse_guard_label
from .cost import node_cost
from .search import GUARD_CAL_QUERIES, GUARD_L1_GROWTH, Decision, GuardEvaluator, PlanEvaluator

__all__ = ["Approximate"]

log = logging.getLogger("siguard.passes")


class Approximate(Pass):
    """Chooses each nonlinear node's implementation (``node.impl`` plus plan ``impl_params``).

    Rules:

    1. Candidates per op (:func:`candidates_for`): the runtime's fixed implementations, iteration
       counts and range-fitted polynomials ("fit<d>": Chebyshev on the calibrated input range
       widened by 25 %, inputs outside clipped to it). Softmax: max-subtract + exp (limit<n>, fit<d>
       on [-spread, 0], exp2 thresholds) + Newton reciprocal (1..5 iterations, linear guess on the
       calibrated range of the sum); Piranha's and SecureML's forms only by override.
    2. Cost of a candidate = its protocol's rounds and bytes on the cost engine (as the cost pass).
       Candidates not strictly cheaper than the most accurate one (by the objective, then the other
       measure) are dropped: the exact ReLU is never replaced (its polynomial needs a clip, which
       costs a comparison).
    3. ``auto`` with calibration data: nodes in plan order; a node's remaining candidates are tried
       cheapest first on the fixed-point reference executor over the calibration inputs, with the
       nodes decided so far at their choice and later ones at their most accurate; the first whose
       end-to-end output keeps the budget against onnxruntime (top-1 agreement, max absolute
       change) is kept, else the most accurate. If even the all-most-accurate configuration misses
       the budget, every node gets its most accurate implementation and a warning says so.
    4. ``auto`` without calibration data keeps every op's default implementation (a warning says
       so); ``exact`` takes the most accurate, ``crypten`` CrypTen's defaults, ``default`` the ops'
       defaults. ``NODE=IMPL`` overrides win over any mode; an unknown node or implementation is an
       input error naming it.
    5. Every nonlinear node gets a record in ``graph.meta["approx"]`` (chosen implementation, degree
       or iterations, fitted range, measured error, its cost and the most accurate one's cost) that
       the plan stores per step and ``inspect`` shows. With calibration data the chosen configuration
       is run once more: each node's local error (against its float op at its fixed-point input) and
       the plan's end-to-end top-1 / max change (``graph.meta["approx_measured"]``).
    6. A guard node's internal approximations (GuardConfig ``exp_degree``, ``recip_degree``,
       ``norm_iterations``; label ``exp4,recip4,norm2``) are chosen by :meth:`_choose_guard` in
       ``auto`` mode with calibration data, against the float oracle ``siguard.privacy.memguard``; the
       configured values are its most accurate setting and are kept in ``exact`` and ``default``
       mode. ``crypten`` mode runs the same guard with CrypTen's default approximations inside
       (``GuardConfig.internals = "crypten"``), the baseline the pass is measured against.
    """

    name = "approximate"

    def __init__(self, calibration: Calibration | None = None, x: np.ndarray | None = None, mode: str = "auto",
                 overrides: dict[str, str] | None = None, budget: AccuracyBudget | None = None,
                 objective: str = "rounds", eval_graph: Callable[[], Graph] | None = None):
        if mode not in MODES:
            raise InputError(f"--approx: unknown mode {mode!r} (choose {', '.join(MODES)})")
        if objective not in OBJECTIVES:
            raise InputError(f"--objective: unknown objective {objective!r} (choose {', '.join(OBJECTIVES)})")
        self.calibration = calibration
        self.x = x
        self.mode = mode
        self.overrides = dict(overrides or {})
        self.budget = budget or AccuracyBudget()
        self.objective = objective
        self.eval_graph = eval_graph

    def _key(self, cost: dict[str, Any]) -> tuple[int, int]:
        other = "bytes" if self.objective == "rounds" else "rounds"
        return int(cost[self.objective]), int(cost[other])

    def _cost(self, graph: Graph, node: Node, cand: Candidate, f: int) -> dict[str, Any]:
        saved = node.impl, node.attrs.get("_impl_params")
        try:
            node.impl = cand.impl
            node.attrs["_impl_params"] = cand.param_dict or None
            return node_cost(graph, node, f)
        finally:
            node.impl = saved[0]
            if saved[1] is None:
                node.attrs.pop("_impl_params", None)
            else:
                node.attrs["_impl_params"] = saved[1]

    @staticmethod
    def _lookup(node: Node, cands: list[Candidate], impl: str) -> Candidate:
        for c in cands:
            if c.label == impl:
                return c

        try:
            get_implementation(node.op, impl)
        except KeyError:
            labels = ", ".join(c.label for c in cands[:24]) + (" ..." if len(cands) > 24 else "")
            raise InputError(f"--approx: node {node.name!r} ({node.op}) has no implementation {impl!r} "
                             f"(candidates: {labels})") from None
        return candidate(impl, impl)

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        f = ctx.frac_bits
        cal = self.calibration
        nodes = [n for n in graph.nodes if n.op in NONLINEAR_OPS]
        guards = [n for n in graph.nodes if n.op == "guard"]
        names = {n.name for n in nodes + guards}
        for name in self.overrides:
            if name not in names:
                listed = ", ".join(sorted(names)) or "none"
                raise InputError(f"--approx: no nonlinear node named {name!r} (nonlinear nodes: {listed})")
        if cal is None and self.mode == "auto":
            ctx.warn("no calibration data: approximations keep their default implementations and default ranges "
                     f"{DEFAULT_RANGE} (use --calibration X.npy to choose them per node)")
        decisions: list[Decision] = []
        for node in nodes:
            rng = cal.ranges.get(node.inputs[0]) if cal is not None else None
            sample = cal.samples.get(node.inputs[0]) if cal is not None else None
            cands, acc_label, crypten_label = candidates_for(node, graph, rng, sample, f)
            by_label = {c.label: c for c in cands}
            accurate = by_label[acc_label]
            if node.name in self.overrides:
                chosen, how = self._lookup(node, cands, self.overrides[node.name]), "override"
            elif self.mode == "exact":
                chosen, how = accurate, "exact"
            elif self.mode == "crypten":
                chosen, how = by_label[crypten_label], "crypten"
            elif self.mode == "default" or cal is None:
                default = node.impl or default_impl(node.op)
                chosen, how = by_label.get(default) or candidate(default, default), "default"
            else:
                chosen, how = accurate, "search"
            d = Decision(node, cands, chosen, accurate, how)
            d.costs[accurate.label] = self._cost(graph, node, accurate, f)
            d.costs[chosen.label] = self._cost(graph, node, chosen, f)
            if how == "search":
                best = self._key(d.costs[accurate.label])
                keep = []
                for c in cands:
                    if not c.search or c.label == accurate.label:
                        continue
                    cost = d.costs.get(c.label) or self._cost(graph, node, c, f)
                    d.costs[c.label] = cost
                    if self._key(cost) < best:
                        keep.append(c)
                d.cands = sorted(keep, key=lambda c: self._key(d.costs[c.label])) + [accurate]
            decisions.append(d)
        searching = [d for d in decisions if d.how == "search" and len(d.cands) > 1]
        if searching:
            self._search(decisions, searching, ctx)
        measured = self._measure_plan(decisions, ctx) if cal is not None and decisions else None
        graph.meta["approx_measured"] = measured
        changes = []
        records = graph.meta.setdefault("approx", {})
        for node in guards:
            records[node.name], line = self._choose_guard(graph, node, ctx)
            changes.append(line)
        for d in decisions:
            node, c = d.node, d.chosen
            node.impl = c.impl
            if c.params:
                node.attrs["_impl_params"] = c.param_dict
            else:
                node.attrs.pop("_impl_params", None)
            cost = d.costs[c.label]
            records[node.name] = {
                "op": node.op,
                "impl": c.label,
                "how": d.how,
                "degree": c.degree,
                "iterations": c.iterations,
                "range": list(c.fit_range) if c.fit_range else (list(cal.ranges[node.inputs[0]])
                                                                if cal is not None and node.inputs[0] in cal.ranges
                                                                else None),
                "error": d.error,
                "candidates": d.tried,
                "cost": {"rounds": int(cost["rounds"]), "bytes": int(cost["bytes"])},
                "most_accurate": {"impl": d.accurate.label, "rounds": int(d.costs[d.accurate.label]["rounds"]),
                                  "bytes": int(d.costs[d.accurate.label]["bytes"])},
            }
            changes.append(f"{node.name} ({node.op}): {c.label} [{d.how}] {cost['rounds']} rounds "
                           f"(most accurate {d.accurate.label}: {d.costs[d.accurate.label]['rounds']})")
        return changes

    def _search(self, decisions: list[Decision], searching: list[Decision], ctx: PassContext) -> None:
        assert self.eval_graph is not None and self.x is not None and self.calibration is not None
        graph = self.eval_graph()
        ev = PlanEvaluator(graph, self.x, self.calibration.output, ctx.frac_bits)
        present = [d for d in decisions if d.node.name in ev.index]
        for d in present:
            ev.set_impl(d.node.name, d.chosen)  # search nodes start at their most accurate
        first = True
        for d in present:
            ev.advance(d.node.name)
            if d not in searching:
                continue
            if first:
                top1, diff, _ = ev.evaluate()
                first = False
                if not self.budget.holds(top1, diff):
                    ctx.warn(f"the most accurate implementations (with any overrides) already miss the accuracy budget "
                             f"{self.budget} on the calibration data (top-1 {top1:.4f}, max change {diff:.3g}): "
                             "keeping them")
                    for s in searching:
                        s.error = {"top1": top1, "max_abs": diff}
                    return
            for c in d.cands:
                ev.set_impl(d.node.name, c)
                d.tried += 1
                try:
                    top1, diff, _ = ev.evaluate()
                except Exception as exc:  # a candidate outside its domain: rejected, not fatal
                    log.debug("%s: candidate %s failed: %s", d.node.name, c.label, exc)
                    continue
                if self.budget.holds(top1, diff) or c is d.cands[-1]:
                    d.chosen = c
                    d.error = {"top1": round(top1, 6), "max_abs": float(f"{diff:.4g}")}
                    break
            ev.set_impl(d.node.name, d.chosen)

    def _measure_plan(self, decisions: list[Decision], ctx: PassContext) -> dict[str, float] | None:
        """Run the chosen configuration once on the calibration data: each node's local error (at
        its fixed-point input, against its float op) and the end-to-end top-1 / max change."""
        if self.eval_graph is None or self.x is None or self.calibration is None:
            return None
        ev = PlanEvaluator(self.eval_graph(), self.x, self.calibration.output, ctx.frac_bits)
        present = [d for d in decisions if d.node.name in ev.index]
        for d in present:
            ev.set_impl(d.node.name, d.chosen)
        for d in sorted(present, key=lambda d: ev.index[d.node.name]):
            ev.advance(d.node.name)
            d.error = dict(d.error or {"top1": None, "max_abs": None}, local_max_abs=self._local_error(ev, d))
        top1, diff, _ = ev.evaluate()
        if not self.budget.holds(top1, diff):
            ctx.warn(f"the chosen approximations give top-1 {top1:.4f} and max change {diff:.3g} on the calibration "
                     f"data, outside the accuracy budget {self.budget}")
        return {"top1": round(top1, 6), "max_abs": float(f"{diff:.4g}")}

    # ---- the guard's internal approximations ---------------------------------------------------------
    def _choose_guard(self, graph: Graph, node: Node, ctx: PassContext) -> tuple[dict[str, Any], str]:
        """Choose the guard's exp/reciprocal polynomial degrees and inverse-sqrt iterations
        (:data:`GUARD_KNOBS`): greedily, knob by knob, the lowest setting whose fixed-point guard, on
        the calibration logits, keeps (a) its accept decisions in agreement with the float oracle
        (siguard.privacy.memguard) within 1 - top1 of the configured setting's agreement, (b) labels as often
        and (c) its mean L1 distance to the oracle's released vector within :data:`GUARD_L1_GROWTH`
        times the configured setting's (a guard on (a) alone, estimated on a few dozen queries, is
        noisy: the freeze schedule is path dependent)."""

        base = GuardConfig.from_attrs(node.attrs)
        if base.schedule == "parallel":  # sign steps in ratio space: no per-step approximation to choose
            cost = node_cost(graph, node, ctx.frac_bits)
            rec = {"rounds": int(cost["rounds"]), "bytes": int(cost["bytes"])}
            record = {"op": "guard", "impl": "sign-steps", "how": "default", "degree": None, "iterations": None,
                      "range": None, "error": None, "candidates": 0, "cost": rec,
                      "most_accurate": {"impl": "sign-steps", **rec}}
            return record, f"{node.name} (guard): sign steps, no internal approximation [{cost['rounds']} rounds]"
        accurate = {k: getattr(base, k) for k in GUARD_KNOBS}
        chosen, how = dict(accurate), "default"
        if node.name in self.overrides:
            chosen, how = parse_guard_label(self.overrides[node.name], node.name), "override"
        elif self.mode == "exact":
            how = "exact"
        elif self.mode == "crypten":
            how = "crypten"  # CrypTen's defaults inside the same algorithm (GuardConfig.internals)
        cal = self.calibration
        logits = cal.samples.get(node.inputs[0]) if cal is not None else None
        costs: dict[tuple[int, ...], dict[str, Any]] = {}

        def cost_of(knobs: dict[str, int]) -> dict[str, Any]:
            key = tuple(knobs[k] for k in GUARD_KNOBS)
            if key not in costs:
                saved = {k: node.attrs.get(k) for k in GUARD_KNOBS}
                node.attrs.update(knobs)
                try:
                    costs[key] = node_cost(graph, node, ctx.frac_bits)
                finally:
                    node.attrs.update(saved)
            return costs[key]

        error = None
        tried = 0
        if how == "default" and self.mode == "auto" and logits is not None:
            how = "search"
            evaluate = GuardEvaluator(graph, node, logits[:GUARD_CAL_QUERIES], base, ctx.frac_bits)
            ref = evaluate(accurate)
            error = ref
            for knob in GUARD_KNOBS:
                for value in GUARD_KNOBS[knob]:
                    if value >= chosen[knob]:
                        continue
                    trial = {**chosen, knob: value}
                    if self._key(cost_of(trial)) >= self._key(cost_of(chosen)):
                        continue
                    tried += 1
                    got = evaluate(trial)
                    if (got["accept_agreement"] >= ref["accept_agreement"] - (1.0 - self.budget.top1)
                            and got["labels_kept"] >= ref["labels_kept"]
                            and got["oracle_l1"] <= GUARD_L1_GROWTH * ref["oracle_l1"] + 1e-4):
                        chosen, error = trial, got
        for k, v in chosen.items():
            node.attrs[k] = int(v)
        cost, best = cost_of(chosen), cost_of(accurate)
        if how == "crypten":
            node.attrs["internals"] = "crypten"
            cost = node_cost(graph, node, ctx.frac_bits)
        record = {
            "op": "guard",
            "impl": "crypten" if how == "crypten" else guard_label(chosen),
            "how": how,
            "degree": int(chosen["exp_degree"]),
            "iterations": int(chosen["norm_iterations"]),
            "range": None,
            "error": error,
            "candidates": tried,
            "cost": {"rounds": int(cost["rounds"]), "bytes": int(cost["bytes"])},
            "most_accurate": {"impl": guard_label(accurate), "rounds": int(best["rounds"]),
                              "bytes": int(best["bytes"])},
        }
        line = (f"{node.name} (guard): {guard_label(chosen)} [{how}] {cost['rounds']} rounds "
                f"(configured {guard_label(accurate)}: {best['rounds']})")
        return record, line

    @staticmethod
    def _local_error(ev: PlanEvaluator, d: Decision) -> float | None:
        """Max |chosen - float op| at the node's fixed-point input on the calibration data."""
        try:
            x = ev.node_input(d.node.name)
            step = ev.steps[ev.index[d.node.name]]
            if len(step.inputs) != 1:
                return None
            (y,) = handler_for(step.op)(ev.ex.ctx, step, [Clear(encode(x, ev.f))])
            want = OP_HANDLERS[d.node.op](d.node, torch.from_numpy(x)).numpy()
            return float(f"{np.abs(decode(y.v, ev.f) - want).max():.4g}")
        except Exception as exc:  # a diagnostic only
            log.debug("local error of %s: %s", d.node.name, exc)
            return None
