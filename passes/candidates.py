"""Candidate implementations of a nonlinear node, and the labels of the guard's internal approximations.

A candidate is a runtime implementation with its tuning: a fixed implementation, an iteration count, or a
polynomial fitted on the calibrated input range. :func:`candidates_for` lists a node's candidates; the
approximation pass (:mod:`siguard.passes.approx`) costs and measures them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siguard.compiler.calibrate import DEFAULT_RANGE
from siguard.compiler.impl import split_numbered
from siguard.compiler.ir import Graph, Node
from siguard.compiler.ops import default_impl
from siguard.core.errors import InputError

__all__ = ["Candidate", "candidate", "candidates_for", "GUARD_KNOBS", "guard_label", "parse_guard_label"]


#: Calibrated ranges are widened by this factor (about their midpoint) before fitting, so held-out
#: inputs slightly beyond the calibration data still fall inside the fitted range.
RANGE_MARGIN = 1.25


LN2 = math.log(2.0)


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


def candidate(label: str, impl: str, params: dict[str, Any] | None = None, *, search: bool = True,
              degree: int | None = None, iterations: int | None = None,
              fit_range: tuple[float, float] | None = None) -> Candidate:
    """A :class:`Candidate` with ``params`` as sorted (name, value) pairs (None values dropped)."""
    items = tuple(sorted((k, v) for k, v in (params or {}).items() if v is not None))
    return Candidate(label, impl, items, degree, iterations, fit_range, search)


def _pow2_toward(v: float, up: bool) -> float:
    """The nearest signed power of two beyond v in the direction ``up`` (toward +inf) or down; 0 stays 0."""
    if v == 0:
        return 0.0
    k = math.log2(abs(v))
    k = math.ceil(k) if (v > 0) == up else math.floor(k)
    return math.copysign(2.0**k, v)


def coarsen_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened outward to signed powers of two (or 0): fitted ranges go into the public plan's
    ``impl_params``, and this way they reveal only the binary order of magnitude of the owner's
    calibrated range, not its values (README, *Threat model*)."""
    return _pow2_toward(lo, up=False), _pow2_toward(hi, up=True)


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
    spread_m = coarsen_range(0.0, spread * RANGE_MARGIN + 1.0)[1]  # public via exp_lo and saturate
    # the sum of e^(z - max) lies in [1, K] whatever the data: the Newton guess is fitted on that
    # guaranteed range (a guess fitted on the calibrated sums diverges on a held-out sum beyond them)
    s_hi = float(k)
    exp_lo = -round(min(spread_m, f * LN2), 4)
    out = [
        candidate("exp2", "exp2"),
        candidate("crypten", "crypten", iterations=10),
        candidate("max_exp_recip", "max_exp_recip"),
        candidate("piranha", "piranha", search=False),
        candidate("secureml", "secureml", search=False),
    ]
    exps: list[tuple[str, dict[str, Any], int | None]] = []
    for n in range(4, 11):
        exps.append((f"limit{n}", {"exp_impl": f"limit{n}", "saturate": True if 2.0**n < spread_m else None}, n))
    for d in (4, 6, 8, 12):
        exps.append((f"fit{d}", {"exp_impl": f"fit{d}", "exp_lo": exp_lo}, d))
    exps.append(("exp2", {"exp_impl": "exp2"}, None))
    for name, params, deg in exps:
        for it in range(1, 6):
            fit = (exp_lo, 0.0) if split_numbered(name, ("fit",))[1] is not None else None
            out.append(candidate(f"{name}+newton{it}", "max_exp_recip",
                             {**params, "iterations": it, "recip_lo": 1.0, "recip_hi": s_hi},
                             degree=deg, iterations=it, fit_range=fit))
    return out


def _fit_candidates(op: str, rng: tuple[float, float] | None, degrees: Sequence[int],
                    bounds: tuple[float, float] | None = None) -> list[Candidate]:
    """Range-fitted Chebyshev candidates (runtime "fit<d>") on the widened calibrated range."""
    if rng is None:
        return []
    lo, hi = coarsen_range(*_widen(*rng))
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if not hi > lo:
        return []
    return [candidate(f"fit{d}", f"fit{d}", {"lo": lo, "hi": hi}, degree=d, fit_range=(lo, hi)) for d in degrees]


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
        return [candidate("exact", "exact"), *_fit_candidates("relu", rng, (2, 4))], "exact", "exact"
    if op == "exp":
        cands = [candidate(f"limit{n}", f"limit{n}", iterations=n) for n in range(4, 11)]
        cands += [candidate("exp2", "exp2"), *_fit_candidates("exp", rng, (4, 6, 8, 12), (-f * LN2, 19.0))]
        return cands, "exp2", "limit8"
    if op == "reciprocal":
        cands = [candidate("newton10", "newton10", iterations=10)]
        if rng is not None and rng[0] > 0:
            lo, hi = coarsen_range(rng[0] / RANGE_MARGIN, rng[1] * RANGE_MARGIN)
            cands += [candidate(f"newton{k}@range", f"newton{k}", {"lo": lo, "hi": hi}, iterations=k,
                                fit_range=(lo, hi)) for k in range(1, 7)]
        return cands, "newton10", "newton10"
    if op in ("sigmoid", "tanh"):
        base = "exp_recip" if op == "sigmoid" else "sigmoid"
        cands = [candidate(base, base), candidate(f"{base}+exp2", base, {"exp_impl": "exp2"})]
        cands += [candidate(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (16, 24, 32)]
        cands += _fit_candidates(op, rng, (4, 6, 8, 12, 16))
        return cands, f"{base}+exp2", base
    if op == "erf":
        cands = [candidate(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (16, 24, 32)]
        cands += _fit_candidates("erf", rng, (4, 6, 8, 12, 16))
        return cands, "chebyshev32", "chebyshev24"
    if op == "gelu":
        cands = [candidate("erf", "erf"), candidate("tanh", "tanh")]
        cands += [candidate(f"chebyshev{d}", f"chebyshev{d}", degree=d) for d in (8, 12, 16, 20, 24)]
        return cands, "chebyshev24", "erf"
    if op == "sqrt":
        cands = [candidate("newton_rsqrt", "newton_rsqrt")]
        if rng is not None and rng[1] > 0:
            lo, hi = coarsen_range(max(rng[0] / RANGE_MARGIN, 2.0**-12), rng[1] * RANGE_MARGIN)
            cands += [candidate(f"newton_rsqrt{k}@range", "newton_rsqrt", {"lo": lo, "hi": hi, "iterations": k},
                            iterations=k, fit_range=(lo, hi)) for k in range(0, 5)]
        return cands, "newton_rsqrt", "newton_rsqrt"
    default = node.impl or default_impl(op)
    return [candidate(default, default)], default, default


#: The guard's internal approximation knobs (siguard.core.config.GuardConfig) and the settings the pass may
#: lower them to: the degree of the e^delta and 1/d polynomials of its softmax update, and the Newton
#: iterations of the inverse square root that normalises its gradient.
GUARD_KNOBS: dict[str, tuple[int, ...]] = {
    "norm_iterations": (0, 1),
    "exp_degree": (2, 3),
    "recip_degree": (2, 3),
}


_GUARD_ABBREV = {"exp_degree": "exp", "recip_degree": "recip", "norm_iterations": "norm"}


def guard_label(knobs: dict[str, int]) -> str:
    """``exp4,recip4,norm2``: the guard's knob settings as ``--approx guard=...`` takes them."""
    return ",".join(f"{_GUARD_ABBREV[k]}{int(knobs[k])}" for k in ("exp_degree", "recip_degree", "norm_iterations"))


def parse_guard_label(text: str, node: str = "guard") -> dict[str, int]:
    """The inverse of :func:`guard_label`; every knob must be given. Bad text -> InputError."""
    out: dict[str, int] = {}
    names = {v: k for k, v in _GUARD_ABBREV.items()}
    for part in text.split(","):
        knob, number = split_numbered(part.strip(), names)
        if number is None:
            raise InputError(f"--approx: {node}={text!r}: expected expD,recipD,normN (e.g. exp4,recip4,norm2)")
        out[names[knob]] = number
    if set(out) != set(_GUARD_ABBREV) or not (2 <= out["exp_degree"] <= 12 and 2 <= out["recip_degree"] <= 12
                                             and 0 <= out["norm_iterations"] <= 6):
        raise InputError(f"--approx: {node}={text!r}: give exp (2..12), recip (2..12) and norm (0..6)")
    return out
