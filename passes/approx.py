"""Approximation pass: per nonlinear node, the cheapest implementation within an accuracy budget."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siguard.compiler.backend import build_plan
from siguard.compiler.calibrate import DEFAULT_RANGE, Calibration, calibrate, check_calibration_data
from siguard.compiler.interp import _Interpreter
from siguard.compiler.ir import Graph, Node
from siguard.compiler.ops import NONLINEAR_OPS, default_impl
from siguard.core.config import MODES, OBJECTIVES, AccuracyBudget, GuardConfig
from siguard.core.errors import InputError
from siguard.privacy.defender import DefenderWeights
from siguard.privacy.memguard import guard_reference, softmax
from siguard.runtime.executor import Executor
from siguard.runtime.kernels.guard import secure_guard
from siguard.runtime.kernels.handlers import handler_for
from siguard.runtime.kernels.nonlinear import get_implementation
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.ring import decode, encode

from .base import Pass, PassContext
from .cost import node_cost

__all__ = [
    "Candidate",
    "Approximate",
    "Calibrate",
    "candidates_for",
    "measure",
    "guard_label",
    "parse_guard_label",
    "GUARD_KNOBS",
]

log = logging.getLogger("siguard.passes")

LN2 = math.log(2.0)

#: Calibrated ranges are widened by this factor (about their midpoint) before fitting, so held-out
#: inputs slightly beyond the calibration data still fall inside the fitted range.
RANGE_MARGIN = 1.25


@dataclass(frozen=True)
class Candidate:
    """One implementation of a node: the runtime ``impl`` with tuning ``params`` (plan
    ``impl_params``). ``label`` is what ``--approx NODE=LABEL`` accepts and ``inspect`` shows."""

    label: str
    impl: str
    params: tuple[tuple[str, Any], ...] = ()
    degree: int | None = None
    iterations: int | None = None
    fit_range: tuple[float, float] | None = None
    search: bool = True  # False: only by override (a different function, e.g. Piranha's softmax)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


def _cand(label: str, impl: str, params: dict[str, Any] | None = None, *, search: bool = True,
          degree: int | None = None, iterations: int | None = None,
          fit_range: tuple[float, float] | None = None) -> Candidate:
    items = tuple(sorted((k, v) for k, v in (params or {}).items() if v is not None))
    return Candidate(label, impl, items, degree, iterations, fit_range, search)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0 * RANGE_MARGIN
    half = max(half, 0.5)
    return round(mid - half, 4), round(mid + half, 4)


def _softmax_stats(sample: np.ndarray | None, axis: int, k: int) -> tuple[float, float]:
    """(spread, sum): the largest max - min of a row and the largest sum of e^(z - max)."""
    if sample is None or sample.size == 0:
        return float(DEFAULT_RANGE[1] - DEFAULT_RANGE[0]), float(k)
    z = np.asarray(sample, dtype=np.float64)
    mx = z.max(axis=axis, keepdims=True)
    spread = float((mx - z.min(axis=axis, keepdims=True)).max())
    total = float(np.exp(z - mx).sum(axis=axis).max())
    return spread, total


def _softmax_candidates(node: Node, graph: Graph, sample: np.ndarray | None, f: int) -> list[Candidate]:
    shape = graph.values[node.inputs[0]].shape
    axis = int(node.attrs.get("axis", -1)) % len(shape)
    k = int(shape[axis])
    spread, _ = _softmax_stats(sample, axis, k)
    spread_m = spread * RANGE_MARGIN + 1.0
    # the sum of e^(z - max) lies in [1, K] whatever the data: the Newton guess is fitted on that
    # guaranteed range (a guess fitted on the calibrated sums diverges on a held-out sum beyond them)
    s_hi = float(k)
    exp_lo = -round(min(spread_m, f * LN2), 4)
    out = [
        _cand("exp2", "exp2"),
        _cand("crypten", "crypten", iterations=10),
        _cand("max_exp_recip", "max_exp_recip"),
        _cand("piranha", "piranha", search=False),
        _cand("secureml", "secureml", search=False),
    ]
    exps: list[tuple[str, dict[str, Any], int | None]] = []
    for n in range(4, 11):
        exps.append((f"limit{n}", {"exp_impl": f"limit{n}", "saturate": True if 2.0**n < spread_m else None}, n))
    for d in (4, 6, 8, 12):
        exps.append((f"fit{d}", {"exp_impl": f"fit{d}", "exp_lo": exp_lo}, d))
    exps.append(("exp2", {"exp_impl": "exp2"}, None))
    for name, params, deg in exps:
        for it in range(1, 6):
            fit = (exp_lo, 0.0) if name.startswith("fit") else None
            out.append(_cand(f"{name}+newton{it}", "max_exp_recip",
                             {**params, "iterations": it, "recip_lo": 1.0, "recip_hi": s_hi},
                             degree=deg, iterations=it, fit_range=fit))
    return out


def _fit_candidates(op: str, rng: tuple[float, float] | None, degrees: Sequence[int],
                    bounds: tuple[float, float] | None = None) -> list[Candidate]:
    """Range-fitted Chebyshev candidates (runtime "fit<d>") on the widened calibrated range."""
    if rng is None:
        return []
    lo, hi = _widen(*rng)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if not hi > lo:
        return []
    return [_cand(f"fit{d}", f"fit{d}", {"lo": lo, "hi": hi}, degree=d, fit_range=(lo, hi)) for d in degrees]


def candidates_for(node: Node, graph: Graph, rng: tuple[float, float] | None, sample: np.ndarray | None,
                   f: int) -> tuple[list[Candidate], str, str]:
    """(candidates, label of the most accurate, label of CrypTen's default) for one nonlinear node.

    ``rng`` is the calibrated range of the node's first input (None without calibration),
    ``sample`` its float values on the calibration data (for softmax statistics)."""
    op = node.op
    if op == "softmax":
        return _softmax_candidates(node, graph, sample, f), "exp2", "crypten"
    if op == "relu":
        # a polynomial needs a clip (a comparison) to stay in its range, so it never beats the exact ReLU
        return [_cand("exact", "exact"), *_fit_candidates("relu", rng, (2, 4))], "exact", "exact"
    if op == "exp":
        cands = [_cand(f"limit{n}", f"limit{n}", iterations=n) for n in range(4, 11)]
        cands += [_cand("exp2", "exp2"), *_fit_candidates("exp", rng, (4, 6, 8, 12), (-f * LN2, 19.0))]
        return cands, "exp2", "limit8"
    if op == "reciprocal":
        cands = [_cand("newton10", "newton10", iterations=10)]
        if rng is not None and rng[0] > 0:
            lo, hi = round(rng[0] / RANGE_MARGIN, 6), round(rng[1] * RANGE_MARGIN, 6)
            cands += [_cand(f"newton{k}@range", f"newton{k}", {"lo": lo, "hi": hi}, iterations=k, fit_range=(lo, hi))
                      for k in range(1, 7)]
        return cands, "newton10", "newton10"
    if op in ("sigmoid", "tanh"):
        base = "exp_recip" if op == "sigmoid" else "sigmoid"
        cands = [_cand(base, base), _cand(f"{base}+exp2", base, {"exp_impl": "exp2"})]
        cands += [_cand(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (16, 24, 32)]
        cands += _fit_candidates(op, rng, (4, 6, 8, 12, 16))
        return cands, f"{base}+exp2", base
    if op == "erf":
        cands = [_cand(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (16, 24, 32)]
        cands += _fit_candidates("erf", rng, (4, 6, 8, 12, 16))
        return cands, "chebyshev32", "chebyshev24"
    if op == "gelu":
        cands = [_cand("erf", "erf"), _cand("tanh", "tanh")]
        cands += [_cand(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (8, 12, 16, 20, 24)]
        return cands, "chebyshev24", "erf"
    if op == "sqrt":
        cands = [_cand("newton_rsqrt", "newton_rsqrt")]
        if rng is not None and rng[1] > 0:
            lo, hi = round(max(rng[0] / RANGE_MARGIN, 2.0**-12), 6), round(rng[1] * RANGE_MARGIN, 6)
            cands += [_cand(f"newton_rsqrt{k}@range", "newton_rsqrt", {"lo": lo, "hi": hi, "iterations": k},
                            iterations=k, fit_range=(lo, hi)) for k in range(0, 5)]
        return cands, "newton_rsqrt", "newton_rsqrt"
    default = node.impl or _default_impl(op)
    return [_cand(default, default)], default, default


def _default_impl(op: str) -> str:

    return default_impl(op)


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


class _Evaluator:
    """Runs the evaluation graph (fixed point, scales assigned) on the calibration inputs with the
    fixed-point reference engine, keeping a checkpoint of every chunk's live values before the
    node being decided so each candidate only re-runs the rest of the network."""

    def __init__(self, graph: Graph, x: np.ndarray, reference: np.ndarray, frac_bits: int):

        self.f = frac_bits
        plan, weights = build_plan(graph, frac_bits=frac_bits, model_info={"name": graph.name,
                                   "output": graph.outputs[0]})
        self.plan = plan
        self.engine = PlainEngine(frac_bits)
        self.ex = Executor(plan, self.engine)
        self.ex.share_weights(weights)
        self.steps = plan.steps
        self.index = {s["name"]: i for i, s in enumerate(self.steps)}
        self.last_use: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for n in s["inputs"]:
                self.last_use[n] = i
        self.output = self.steps[-1]["inputs"][0]
        batch = int(graph.values[graph.inputs[0]].shape[0])
        self.input_name = graph.inputs[0]
        self.chunks: list[tuple[np.ndarray, int]] = []
        for a in range(0, len(x), batch):
            part = x[a : a + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - n, axis=0)], axis=0)
            self.chunks.append((part.reshape(graph.values[self.input_name].shape), n))
        self.reference = reference
        self.envs: list[dict[str, Any]] = [{} for _ in self.chunks]
        self.pos = 0

    def set_impl(self, name: str, cand: Candidate) -> None:
        step = self.steps[self.index[name]]
        step["impl"] = cand.impl
        if cand.params:
            step["impl_params"] = cand.param_dict
        else:
            step.pop("impl_params", None)

    def _run(self, env: dict[str, Any], start: int, stop: int, chunk: np.ndarray) -> None:

        for i in range(start, stop):
            step = self.steps[i]
            if step["op"] == "input":
                name = step["outputs"][0]
                env[name] = self.engine.input("client", encode(chunk.astype(np.float64), self.f),
                                              tuple(self.plan.values[name]["shape"]))
            elif step["op"] == "reveal":
                continue
            else:
                self.ex.run_step(step, env)
            for n in step["inputs"]:
                if self.last_use.get(n) == i and n != self.output:
                    env.pop(n, None)

    def advance(self, name: str) -> None:
        """Move the checkpoint to just before step ``name`` (with the implementations set so far)."""
        stop = self.index[name]
        for env, (chunk, _) in zip(self.envs, self.chunks, strict=True):
            self._run(env, self.pos, stop, chunk)
        self.pos = stop

    def node_input(self, name: str) -> np.ndarray:

        step = self.steps[self.index[name]]
        parts = []
        for env, (_, n) in zip(self.envs, self.chunks, strict=True):
            v = self.ex._get(env, step["inputs"][0])
            parts.append(decode(v.v if hasattr(v, "v") else v, self.f)[:n])
        return np.concatenate(parts, axis=0)

    def evaluate(self) -> tuple[float, float, np.ndarray]:
        """(top-1, max |change|, output) of the rest of the network from the checkpoint."""

        outs = []
        for env, (chunk, n) in zip(self.envs, self.chunks, strict=True):
            local = dict(env)
            self._run(local, self.pos, len(self.steps), chunk)
            v = local[self.output]
            outs.append(decode(v.v if hasattr(v, "v") else v, self.f)[:n])
        y = np.concatenate(outs, axis=0)
        top1, diff = measure(y, self.reference.reshape(y.shape))
        return top1, diff, y


@dataclass
class _Decision:
    node: Node
    cands: list[Candidate]
    chosen: Candidate
    accurate: Candidate
    how: str
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    tried: int = 0


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
        return _cand(impl, impl)

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
        decisions: list[_Decision] = []
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
                default = node.impl or _default_impl(node.op)
                chosen, how = by_label.get(default) or _cand(default, default), "default"
            else:
                chosen, how = accurate, "search"
            d = _Decision(node, cands, chosen, accurate, how)
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

    def _search(self, decisions: list[_Decision], searching: list[_Decision], ctx: PassContext) -> None:
        assert self.eval_graph is not None and self.x is not None and self.calibration is not None
        graph = self.eval_graph()
        ev = _Evaluator(graph, self.x, self.calibration.output, ctx.frac_bits)
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

    def _measure_plan(self, decisions: list[_Decision], ctx: PassContext) -> dict[str, float] | None:
        """Run the chosen configuration once on the calibration data: each node's local error (at
        its fixed-point input, against its float op) and the end-to-end top-1 / max change."""
        if self.eval_graph is None or self.x is None or self.calibration is None:
            return None
        ev = _Evaluator(self.eval_graph(), self.x, self.calibration.output, ctx.frac_bits)
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

        fields = GuardConfig.__dataclass_fields__
        base = GuardConfig(**{k: v for k, v in node.attrs.items() if k in fields})
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
            evaluate = _GuardEvaluator(graph, node, logits[:GUARD_CAL_QUERIES], base, ctx.frac_bits)
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
    def _local_error(ev: _Evaluator, d: _Decision) -> float | None:
        """Max |chosen - float op| at the node's fixed-point input on the calibration data."""
        import torch


        try:
            x = ev.node_input(d.node.name)
            step = ev.steps[ev.index[d.node.name]]
            if len(step["inputs"]) != 1:
                return None

            class _Ctx:
                e = ev.engine
                frac_bits = ev.f

            (y,) = handler_for(step["op"])(_Ctx, step, [Clear(encode(x, ev.f))])
            want = _Interpreter(Graph()).run_node(d.node, [torch.from_numpy(x)]).numpy()
            return float(f"{np.abs(decode(y.v, ev.f) - want).max():.4g}")
        except Exception as exc:  # a diagnostic only
            log.debug("local error of %s: %s", d.node.name, exc)
            return None


#: The guard's internal approximation knobs (siguard.core.config.GuardConfig) and the settings the pass may
#: lower them to: the degree of the e^delta and 1/d polynomials of its softmax update, and the Newton
#: iterations of the inverse square root that normalises its gradient.
GUARD_KNOBS: dict[str, tuple[int, ...]] = {
    "norm_iterations": (0, 1),
    "exp_degree": (2, 3),
    "recip_degree": (2, 3),
}
_GUARD_ABBREV = {"exp_degree": "exp", "recip_degree": "recip", "norm_iterations": "norm"}

#: Calibration queries the guard's candidates are run on (its 6 x 49 steps make each run costly).
GUARD_CAL_QUERIES = 64

#: A lowered guard setting may move the released vector at most this factor further (mean L1) from
#: the float oracle's than the configured setting does.
GUARD_L1_GROWTH = 1.5


def guard_label(knobs: dict[str, int]) -> str:
    """``exp4,recip4,norm2``: the guard's knob settings as ``--approx guard=...`` takes them."""
    return ",".join(f"{_GUARD_ABBREV[k]}{int(knobs[k])}" for k in ("exp_degree", "recip_degree", "norm_iterations"))


def parse_guard_label(text: str, node: str = "guard") -> dict[str, int]:
    """The inverse of :func:`guard_label`; every knob must be given. Bad text -> InputError."""
    import re

    out: dict[str, int] = {}
    names = {v: k for k, v in _GUARD_ABBREV.items()}
    for part in text.split(","):
        m = re.fullmatch(r"(exp|recip|norm)(\d+)", part.strip())
        if not m:
            raise InputError(f"--approx: {node}={text!r}: expected expD,recipD,normN (e.g. exp4,recip4,norm2)")
        out[names[m.group(1)]] = int(m.group(2))
    if set(out) != set(_GUARD_ABBREV) or not (2 <= out["exp_degree"] <= 12 and 2 <= out["recip_degree"] <= 12
                                             and 0 <= out["norm_iterations"] <= 6):
        raise InputError(f"--approx: {node}={text!r}: give exp (2..12), recip (2..12) and norm (0..6)")
    return out


class _GuardEvaluator:
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
        oracle = guard_reference(self.z, d, rounds=c.rounds, steps=c.steps, c1=c.c1, c2=c.c2, c3=c.c3, lr=c.lr,
                                 schedule=c.schedule, validator=c.validator, margin=c.margin, c3_max=c.c3_max)
        self.plain = softmax(self.z)
        self.oracle_guarded = np.asarray(oracle.guarded, dtype=np.float64)
        # the same test on both sides: the released vector moved from softmax(z) (oracle: accepted noise
        # so small that it does not move the vector counts as not accepted, as in the audit)
        self.oracle_accepted = np.abs(np.asarray(oracle.guarded) - self.plain).sum(1) > 2e-3

    def __call__(self, knobs: dict[str, int]) -> dict[str, float]:
        from dataclasses import replace


        e = PlainEngine(self.f)
        args = [Clear(encode(a, self.f)) for a in (self.z, *self.weights)]
        q = decode(secure_guard(e, *args, config=replace(self.config, **knobs)).v, self.f)
        accepted = np.abs(q - self.plain).sum(1) > 2e-3  # the audit's "noised" test
        return {"accept_agreement": round(float((accepted == self.oracle_accepted).mean()), 6),
                "labels_kept": round(float((q.argmax(1) == self.z.argmax(1)).mean()), 6),
                "oracle_l1": float(f"{np.abs(q - self.oracle_guarded).sum(1).mean():.4g}")}


class Calibrate(Pass):
    """Records every value's range on calibration inputs (see :mod:`siguard.compiler.calibrate`).

    Rules:

    1. onnxruntime runs the ONNX model on the calibration inputs with every float intermediate
       exposed as an output; IR values it cannot see come from the float interpreter.
    2. Each computed value's ``range`` becomes its (min, max) over all inputs; the fixed-point
       pass checks headroom against it.
    3. The inputs of nonlinear nodes keep their float samples for the approximation pass, and the
       compiled output's onnxruntime values become the reference of the accuracy budget.
    """

    name = "calibrate"

    def __init__(self, model: Any, x: np.ndarray):
        self.model = model
        self.x = x
        self.result: Calibration | None = None

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:

        if len(graph.inputs) == 1:
            self.x = check_calibration_data(self.x, graph.values[graph.inputs[0]].shape)
        keep = {n.inputs[0] for n in graph.nodes if n.op in NONLINEAR_OPS} | set(graph.outputs)
        cal = calibrate(self.model, graph, self.x, keep)
        for name, rng in cal.ranges.items():
            graph.values[name].range = rng
        self.result = cal
        n_ort = sum(1 for s in cal.sources.values() if s == "onnxruntime")
        n_interp = sum(1 for s in cal.sources.values() if s == "interpreter")
        return [f"{len(cal.ranges)} values calibrated on {cal.n} inputs ({n_ort} by onnxruntime, "
                f"{n_interp} by the float interpreter)"]
