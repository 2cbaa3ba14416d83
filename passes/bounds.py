"""Bounds pass: sound bounds of every value from the input domain, and the domain the client enforces."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from siguard.compiler.impl import Impl
from siguard.compiler.interp import OP_HANDLERS
from siguard.compiler.ir import Graph, Node
from siguard.compiler.ops import default_impl
from siguard.core.errors import InputError, ModelError
from siguard.runtime.kernels.nonlinear import FIT_DEFAULT_RANGES, FIT_TARGETS, _clipped_fit

from .base import Pass, PassContext
from .cost import node_cost

__all__ = ["Bounds", "Fix", "Problem", "Propagation", "parse_input_range", "propagate", "HEADROOM_BITS",
           "FIT_TOLERANCE"]

log = logging.getLogger("siguard.passes")

#: Comparisons and the exact truncation need |x| < 2^62 ring units (runtime/mpc/rss.py, trunc and msb); one more
#: bit is kept for the fixed-point error (truncation ulps, approximation error) that the real-number
#: bounds below do not include.
HEADROOM_BITS = 61

#: Largest error an approximation may make on the domain because it clips its input to the range it
#: was fitted on (a saturating function clipped where it is flat is fine; exp clipped is not).
FIT_TOLERANCE = 2.0**-10

LN2 = math.log(2.0)

Interval = tuple[np.ndarray, np.ndarray]  # elementwise (lo, hi), float64, the value's shape


@dataclass(frozen=True)
class Problem:
    """A node that can go wrong for some input of the domain, and why (one line)."""

    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.message}"


@dataclass(frozen=True)
class Fix:
    """A change that makes a node's implementation valid on its bound at no loss of accuracy:
    ``params`` are merged into its ``impl_params`` (None deletes a key); a new ``impl`` replaces
    the implementation and its parameters."""

    why: str
    params: dict[str, Any] = field(default_factory=dict)
    impl: str | None = None

    def apply(self, node: Node) -> None:
        old = {} if self.impl is not None else dict(node.attrs.get("_impl_params") or {})
        new = {k: v for k, v in {**old, **self.params}.items() if v is not None}
        if self.impl is not None:
            node.impl = self.impl
        if new:
            node.attrs["_impl_params"] = new
        else:
            node.attrs.pop("_impl_params", None)


@dataclass
class Propagation:
    """Bounds of every value for one domain, the problems found, and the parameter changes
    (node -> impl_params update) that make an approximation cover its bound."""

    domain: dict[str, tuple[float, float]]
    bounds: dict[str, Interval] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    fixes: dict[str, Fix] = field(default_factory=dict)

    @property
    def safe(self) -> bool:
        return not self.problems


def parse_input_range(spec: Any, inputs: list[str]) -> dict[str, tuple[float, float]]:
    """``--input-range`` values -> {input name: (lo, hi)}.

    Accepts ``"LO,HI"`` (every input), ``"NAME=LO,HI"``, a list of those, a (lo, hi) pair or a dict
    name -> (lo, hi). Bad syntax, an unknown name or lo >= hi -> InputError (one line)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
        items = [("*", spec)]
    else:
        texts = [spec] if isinstance(spec, str) else list(spec)
        items = []
        for text in texts:
            name, _, rng = str(text).rpartition("=")
            items.append((name.strip() or "*", rng))
    out: dict[str, tuple[float, float]] = {}
    for name, rng in items:
        try:
            lo, hi = (float(v) for v in (rng.split(",") if isinstance(rng, str) else rng))
        except (TypeError, ValueError):
            raise InputError(f"--input-range: {rng!r} must read LO,HI (or NAME=LO,HI)") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"--input-range: need finite LO < HI (got {lo:g},{hi:g})")
        names = inputs if name == "*" else [name]
        for n in names:
            if n not in inputs:
                raise InputError(f"--input-range: the model has no input {n!r} (inputs: {', '.join(inputs)})")
            out[n] = (lo, hi)
    return out


# ---- interval arithmetic --------------------------------------------------------------------------
def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _apply(node: Node, *args: np.ndarray) -> np.ndarray:
    """The op's float semantics (siguard.compiler.interp) on arrays; matmul and mul in numpy (small float64
    matmuls are slower through torch's thread pool)."""
    if node.op == "matmul":
        out = np.matmul(args[0], args[1])
        return out + args[2] if len(args) > 2 else out
    if node.op == "mul":
        return args[0] * args[1]
    return _np(OP_HANDLERS[node.op](node, *[_t(a) for a in args]))


def _is_point(iv: Interval) -> bool:
    return iv[0] is iv[1] or bool(np.array_equal(iv[0], iv[1]))


def _bilinear(node: Node, a: Interval, b: Interval, rest: list[Interval]) -> Interval:
    """op(a, b) (+ bias) for an op linear in each argument (mul, matmul, conv), in centre-radius
    form: c = op(ac, bc) + bias, r = op(|ac|, br) + op(ar, |bc|) + op(ar, br) (each term only
    when its radius is non-zero)."""
    ac, ar = (a[0] + a[1]) / 2, (a[1] - a[0]) / 2
    bc, br = (b[0] + b[1]) / 2, (b[1] - b[0]) / 2
    bias = [r[0] for r in rest]  # a bias is a constant
    c = _apply(node, ac, bc, *bias)
    r = np.zeros_like(c)
    if not _is_point(b):
        r = r + _apply(node, np.abs(ac), br)
    if not _is_point(a):
        r = r + _apply(node, ar, np.abs(bc))
        if not _is_point(b):
            r = r + _apply(node, ar, br)
    return c - r, c + r


def _monotone(fn: Callable[[np.ndarray], np.ndarray], x: Interval) -> Interval:
    a, b = fn(x[0]), fn(x[1])
    return np.minimum(a, b), np.maximum(a, b)


def _with_kink(node: Node, x: Interval, *rest: np.ndarray) -> Interval:
    """Piecewise-linear ops with one kink at 0 (leaky ReLU, PReLU): extremes at the ends or at 0."""
    a, b = _apply(node, x[0], *rest), _apply(node, x[1], *rest)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    spans = (x[0] < 0) & (x[1] > 0)
    return np.where(spans, np.minimum(lo, 0.0), lo), np.where(spans, np.maximum(hi, 0.0), hi)


_ORDER_PRESERVING = frozenset({"reshape", "transpose", "concat", "pad", "slice", "gather", "identity", "truncate",
                               "relu", "clip", "maxpool", "avgpool", "reduce_sum", "reduce_mean", "reduce_max"})
_MONOTONE_UNARY = frozenset({"sigmoid", "tanh", "exp", "erf", "softplus", "hard_sigmoid"})


def _transfer(graph: Graph, node: Node, ins: list[Interval], stochastic: bool = False) -> Interval:
    """The output interval of ``node`` from its inputs' intervals (sound for real arithmetic).
    ``stochastic``: the node is a matmul whose left operand is a softmax along its last axis."""
    op = node.op
    shape = tuple(graph.values[node.outputs[0]].shape)
    if stochastic and len(ins) == 2:  # rows of P are >= 0 and sum to 1: P @ V is a convex combination of V's rows
        lo = np.min(ins[1][0], axis=-2, keepdims=True)
        hi = np.max(ins[1][1], axis=-2, keepdims=True)
        return np.broadcast_to(lo, shape).copy(), np.broadcast_to(hi, shape).copy()
    if op in _ORDER_PRESERVING:  # non-decreasing in every argument
        return _apply(node, *[i[0] for i in ins]), _apply(node, *[i[1] for i in ins])
    if op in _MONOTONE_UNARY:
        return _monotone(lambda v: _apply(node, v), ins[0])
    if op == "add":
        return ins[0][0] + ins[1][0], ins[0][1] + ins[1][1]
    if op == "sub":
        return ins[0][0] - ins[1][1], ins[0][1] - ins[1][0]
    if op == "neg":
        return -ins[0][1], -ins[0][0]
    if op == "mul" and node.inputs[0] == node.inputs[1]:  # a square is never negative
        lo, hi = ins[0]
        sq = np.maximum(lo * lo, hi * hi)
        return np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(lo * lo, hi * hi)), sq
    if op in ("mul", "matmul", "conv"):
        return _bilinear(node, ins[0], ins[1], ins[2:])
    if op == "div" and _is_point(ins[1]):
        inv = 1.0 / ins[1][0]
        return _monotone(lambda v: v * inv, ins[0]) if np.all(inv >= 0) else _bilinear(
            Node(node.name, "mul", node.inputs, node.outputs), ins[0], (inv, inv), [])
    if op in ("leaky_relu", "prelu"):
        return _with_kink(node, ins[0], *[i[0] for i in ins[1:]])
    if op == "sqrt":
        return _monotone(lambda v: np.sqrt(np.maximum(v, 0.0)), ins[0])
    if op == "reciprocal":
        lo, hi = ins[0]
        if np.all(lo > 0):
            return 1.0 / hi, 1.0 / lo
        return np.full(shape, -np.inf), np.full(shape, np.inf)
    if op in ("softmax", "guard"):  # probabilities (the guard's insides are its own business)
        return np.zeros(shape), np.ones(shape)
    if op == "log_softmax":
        ax = int(node.attrs.get("axis", -1))
        k = ins[0][0].shape[ax]
        top = np.max(ins[0][1], axis=ax, keepdims=True)
        return np.minimum(ins[0][0] - top - math.log(k), 0.0), np.zeros(shape)
    if op == "gelu":  # gelu is increasing above its minimum -0.16997 (at x = -0.7518) and below x+
        lo_x, hi_x = ins[0]
        g_lo, g_hi = _apply(node, lo_x), _apply(node, hi_x)
        return np.where(lo_x >= -0.7518, g_lo, -0.17), np.maximum(np.maximum(g_hi, g_lo), 0.0)
    if op == "hard_swish":  # x relu6(x + 3) / 6: its minimum -0.375 at x = -1.5, increasing above it
        lo_x, hi_x = ins[0]
        g_lo, g_hi = _apply(node, lo_x), _apply(node, hi_x)
        spans = (lo_x <= -1.5) & (hi_x >= -1.5)
        return np.where(spans, -0.375, np.minimum(g_lo, g_hi)), np.maximum(g_lo, g_hi)
    if op == "layer_norm":  # |x_i - mean| <= sqrt(N - 1) * std: the output is bias +- |scale| sqrt(N)
        ax = int(node.attrs.get("axis", -1)) % len(shape)
        n = int(np.prod(shape[ax:]))
        half = np.abs(ins[1][0]) * math.sqrt(n) if len(ins) > 1 else np.full(shape, math.sqrt(n))
        mid = ins[2][0] if len(ins) > 2 else 0.0
        return np.broadcast_to(mid - half, shape).copy(), np.broadcast_to(mid + half, shape).copy()
    if op == "lrn":  # the denominator is at least bias^beta
        m = np.maximum(np.abs(ins[0][0]), np.abs(ins[0][1])) * float(node.attrs["bias"]) ** -float(node.attrs["beta"])
        return -m, m
    if op == "batchnorm":
        a = node.attrs
        x, sc, bi, mu, var = ins
        k = sc[0] / np.sqrt(var[0] + float(a.get("epsilon", 1e-5)))
        shp = (1, -1) + (1,) * (len(shape) - 2)
        k, b = k.reshape(shp), (bi[0] - mu[0] * k.reshape(-1)).reshape(shp)
        c, r = (x[0] + x[1]) / 2 * k + b, (x[1] - x[0]) / 2 * np.abs(k)
        return c - r, c + r
    raise ModelError(f"{node.name} ({op}): the bounds pass has no rule for this op")


# ---- what each op needs of its bounds -------------------------------------------------------------
def _params(node: Node) -> dict[str, Any]:
    p = {k: v for k, v in node.attrs.items() if k != "_impl_params"}
    p.update(node.attrs.get("_impl_params") or {})
    return p


def _mag(iv: Interval) -> float:
    if iv[0].size == 0:
        return 0.0
    return float(max(np.max(np.abs(iv[0])), np.max(np.abs(iv[1]))))


def _spread(iv: Interval, axis: int) -> float:
    """Largest max - min along ``axis`` of a row (the logit spread a softmax sees)."""
    return float(np.max(np.max(iv[1], axis=axis) - np.min(iv[0], axis=axis)))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _fit_error(op: str, lo_x: float, hi_x: float, lo_f: float, hi_f: float) -> float:
    """Largest |fn(x) - fn(clip(x, lo_f, hi_f))| over [lo_x, hi_x] for a monotone fitted function."""

    target = FIT_TARGETS[op]

    def fn(v: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # e^x of a huge bound is inf: an infinite error, as it should be
            return target(v)

    err = 0.0
    if lo_x < lo_f:
        err = max(err, abs(float(fn(np.array([lo_x]))[0]) - float(fn(np.array([lo_f]))[0])))
    if hi_x > hi_f:
        err = max(err, abs(float(fn(np.array([hi_x]))[0]) - float(fn(np.array([hi_f]))[0])))
    return err


def _check_fit(node: Node, iv: Interval, p: dict[str, Any], problems: list[Problem],
               fix: Callable[[Fix], None] | None = None) -> None:

    if Impl.parse(node.impl or "local").family != "fit" or node.op not in FIT_DEFAULT_RANGES:
        return
    lo_f, hi_f = (float(p["lo"]), float(p["hi"])) if "lo" in p and "hi" in p else FIT_DEFAULT_RANGES[node.op]
    lo_x, hi_x = float(np.min(iv[0])), float(np.max(iv[1]))
    err = _fit_error(node.op, lo_x, hi_x, lo_f, hi_f)
    if err > FIT_TOLERANCE and fix is not None and node.op != "exp":  # the default saturates or is exact
        fix(Fix(f"{node.impl} fitted on [{_fmt(lo_f)}, {_fmt(hi_f)}] would err by {_fmt(err)} on its bound "
                f"[{_fmt(lo_x)}, {_fmt(hi_x)}]: {default_impl(node.op)} instead", impl=default_impl(node.op)))
    elif err > FIT_TOLERANCE:
        problems.append(Problem(node.name, node.op, (
            f"{node.impl} is fitted on [{_fmt(lo_f)}, {_fmt(hi_f)}] but its input can reach [{_fmt(lo_x)}, "
            f"{_fmt(hi_x)}] (clipping error up to {_fmt(err)}); use --approx {node.name}=<a default implementation> "
            "or a narrower --input-range")))


def _op_checks(node: Node, ins: list[Interval], f: int, fix: Callable[[Fix], None],
               problems: list[Problem], keep_impl: bool = False) -> None:
    """Rules 4-6 of :class:`Bounds`: what the node's implementation needs of its input bounds.
    ``keep_impl``: the implementation was overridden by the user; only safety settings may change."""
    op, impl, p = node.op, node.impl or "", _params(node)
    x = ins[0] if ins else None

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(Problem(node.name, op, message))

    limit = 2.0**HEADROOM_BITS
    if op in ("softmax", "log_softmax") and x is not None:
        ax = int(p.get("axis", -1)) % x[0].ndim
        spread = _spread(x, ax)
        if impl == "secureml":
            s_hi = float(p.get("hi") or 2.0**12)
            s_max = float(np.max(np.sum(np.maximum(x[1], 0.0), axis=ax)))
            need(s_max <= s_hi, f"the sum of relu(logits) can reach {_fmt(s_max)}, beyond the Newton range "
                                f"[2^-{f}, {_fmt(s_hi)}] of secureml's reciprocal")
            return
        if impl == "piranha":
            return
        exp_impl = p.get("exp_impl") or ("exp2" if impl == "exp2" else "limit8")
        exp_kind = Impl.parse(exp_impl, "exp")
        if exp_kind.family == "limit" and exp_kind.number is not None and not p.get("saturate"):
            n = exp_kind.number
            if spread > 2.0**n:  # the limit method's base goes negative below -2^n
                if impl == "crypten" or op == "log_softmax" or keep_impl:  # keep the structure: saturate
                    fix(Fix(f"logit spread can reach {_fmt(spread)} > 2^{n}: saturating exp (+10 rounds)",
                            {"saturate": True}))
                else:  # e^z by thresholds is exact to an ulp and saturates at 0, in fewer rounds than limit+clip
                    fix(Fix(f"logit spread can reach {_fmt(spread)} > 2^{n}: exp {exp_impl} -> exp2",
                            {"exp_impl": "exp2", "saturate": None}))
        elif exp_kind.family == "fit":
            exp_lo = float(p.get("exp_lo", -f * LN2))
            if spread > -exp_lo and math.exp(exp_lo) > FIT_TOLERANCE and keep_impl:
                need(False, f"exp {exp_impl} clips logits below {_fmt(exp_lo)} but the spread can reach "
                            f"{_fmt(spread)} (the --approx override is kept)")
            elif spread > -exp_lo and math.exp(exp_lo) > FIT_TOLERANCE:
                fix(Fix(f"exp {exp_impl} clips logits below {_fmt(exp_lo)} (error e^{_fmt(exp_lo)}) but the "
                        f"spread can reach {_fmt(spread)}: exp {exp_impl} -> exp2",
                        {"exp_impl": "exp2", "exp_lo": None}))
        if impl == "crypten":
            k = int(x[0].shape[ax])
            need(k <= 128, f"crypten's reciprocal guess needs at most 128 classes (has {k})")
    elif op == "exp" and x is not None:
        hi_x, lo_x = float(np.max(x[1])), float(np.min(x[0]))
        top = float(p.get("hi", max(0, 60 - 2 * f) * LN2))
        kind = Impl.parse(impl or "local", op)
        if kind.family == "fit":
            _check_fit(node, x, p, problems)
        else:
            need(hi_x <= top, f"e^x overflows (saturates at e^{_fmt(top)}) but x can reach {_fmt(hi_x)}")
            if kind.family == "limit" and kind.number is not None and p.get("saturate") is False:
                n = kind.number
                need(lo_x >= -(2.0**n), f"the limit method needs x >= -2^{n}; x can reach {_fmt(lo_x)}")
    elif op == "reciprocal" and x is not None:
        lo_x, hi_x = float(np.min(x[0])), float(np.max(x[1]))
        lo, hi = (float(p["lo"]), float(p["hi"])) if "lo" in p and "hi" in p else (2.0**-8, 100.0)
        need(lo <= lo_x and hi_x <= hi, f"Newton's reciprocal ({impl}) is valid on [{_fmt(lo)}, {_fmt(hi)}] but its "
                                        f"input can reach [{_fmt(lo_x)}, {_fmt(hi_x)}]")
    elif op == "sqrt" and x is not None:
        hi_x = float(np.max(x[1]))
        hi = float(p.get("hi") or 2.0**12)
        need(hi_x <= hi, f"the inverse-sqrt Newton guess covers x <= {_fmt(hi)} but x can reach {_fmt(hi_x)}")
    elif op == "layer_norm" and x is not None:
        shape = x[0].shape
        ax = int(p.get("axis", -1)) % len(shape)
        axes = tuple(range(ax, len(shape)))
        n = int(np.prod(shape[ax:]))
        b = _mag(x)
        need(b * 2.0 ** (f + 24) < limit, f"|x| can reach {_fmt(b)}; x - mean is formed at scale f + 24 and needs "
                                          f"|x| < {_fmt(limit / 2.0 ** (f + 24))}")
        width = np.max(x[1], axis=axes) - np.min(x[0], axis=axes)
        sq = np.sum(np.maximum(x[0] ** 2, x[1] ** 2), axis=axes)
        sumsq = float(np.max(np.minimum(sq, n * width**2 / 4.0)))  # sum (x - mean)^2 <= sum x^2, Popoviciu
        need(sumsq * 2.0 ** (2 * f) < limit,
             f"the sum of squared deviations can reach {_fmt(sumsq)} over {n} elements (variance up to "
             f"{_fmt(sumsq / n)}); it needs < {_fmt(limit / 2.0 ** (2 * f))} at scale 2f: lower --frac-bits, narrow "
             "--input-range, or rescale the input")
        if len(ins) > 1:
            g = _mag(ins[1])
            need(float(np.max(width)) * g * 2.0 ** (2 * f) < limit, "(x - mean) * scale overflows at scale 2f")
            total = f + 24 + max(0, min(16, 29 - f))
            need(g * math.sqrt(n) * 2.0**total < limit, f"its output scale * sqrt(N) = {_fmt(g * math.sqrt(n))} "
                                                        f"overflows the last product at scale {total}")
        var = sumsq / n
        hi = float(p.get("hi", 16384.0))
        if var > hi:
            fix(Fix(f"variance can reach {_fmt(var)} > {_fmt(hi)}: inverse-sqrt guess range widened",
                    {"hi": float(2.0 ** math.ceil(math.log2(var)))}))
    elif op == "lrn" and x is not None:
        b = _mag(x)
        need(b * b * 2.0 ** (2 * f) < limit, f"x^2 overflows at scale 2f (|x| up to {_fmt(b)})")
        bias = float(p.get("bias", 1.0))
        den = bias + float(p.get("alpha", 1e-4)) * b * b
        hi = float(p["hi"]) if p.get("hi") is not None else bias + 16.0
        need(den <= hi, f"the denominator can reach {_fmt(den)}, beyond its Newton range (up to {_fmt(hi)})")
    elif op == "gelu" and x is not None:
        b = _mag(x)
        if impl == "tanh":
            need(b**3 * 2.0 ** (2 * f) < limit, f"x^3 overflows at scale 2f (|x| up to {_fmt(b)})")
        elif impl == "erf":

            cb, _ = _clipped_fit("gelu_tanh_gate" if p.get("approximate") == "tanh" else "gelu_gate", 24)
            err = b * 0.5 * math.erfc(cb / math.sqrt(2.0)) if b > cb else 0.0
            need(err <= FIT_TOLERANCE, f"its gate is clipped at {_fmt(cb)}, an error of {_fmt(err)} at |x| = {_fmt(b)}")
    elif x is not None:
        _check_fit(node, x, p, problems, None if keep_impl else fix)


def propagate(graph: Graph, domain: dict[str, tuple[float, float]], frac_bits: int) -> Propagation:
    """Interval bounds of every value of ``graph`` for inputs in ``domain`` and the checks of
    :class:`Bounds` (rules 2-6). Stops at the first node with a problem."""
    res = Propagation(dict(domain))
    limit = 2.0**HEADROOM_BITS
    env = res.bounds
    simplex: set[str] = set()  # softmax outputs along their last axis
    overridden = {n for n, r in graph.meta.get("approx", {}).items() if r.get("how") == "override"}
    for name in graph.inputs:
        lo, hi = domain[name]
        shape = tuple(graph.values[name].shape)
        env[name] = (np.full(shape, float(lo)), np.full(shape, float(hi)))
        if max(abs(lo), abs(hi)) * 2.0**frac_bits >= limit:
            res.problems.append(Problem(name, "input", f"|x| up to {_fmt(max(abs(lo), abs(hi)))} does not fit at "
                                                       f"scale {frac_bits}"))
            return res

    def get(name: str) -> Interval:
        if name not in env:
            v = graph.values[name]
            data = np.asarray(v.data, dtype=np.float64)
            return data, data
        return env[name]

    for node in graph.nodes:
        ins = [get(i) for i in node.inputs]

        def fix(change: Fix, node: Node = node) -> None:
            res.fixes[node.name] = change

        if node.op != "guard":
            _op_checks(node, ins, frac_bits, fix, res.problems, keep_impl=node.name in overridden)
        if res.problems:
            return res
        stochastic = node.op == "matmul" and node.inputs[0] in simplex and len(ins[1][0].shape) >= 2
        out = _transfer(graph, node, ins, stochastic)
        name = node.outputs[0]
        if node.op == "softmax" and int(node.attrs.get("axis", -1)) % out[0].ndim == out[0].ndim - 1:
            simplex.add(name)
        env[name] = out
        v = graph.values[name]
        m = _mag(out)
        scale = frac_bits if v.scale is None else int(v.scale)
        if not np.isfinite(m) or m * 2.0**scale >= limit:
            where = f"2^{math.log2(m * 2.0**scale):.1f}" if np.isfinite(m) and m > 0 else "unbounded"
            res.problems.append(Problem(node.name, node.op, (
                f"its output can reach |x| = {_fmt(m)}, {where} ring units at scale {scale} "
                f"(limit 2^{HEADROOM_BITS})")))
            return res
    return res


class Bounds(Pass):
    """Derives sound bounds of every value from the input domain, checks every op against them,
    and records the input domain in the plan (``graph.meta["input_domain"]``).

    Rules:

    1. The domain of each input is ``--input-range`` (declared) when given. Otherwise it is
       derived: the largest symmetric [-2^k, 2^k] (k from -8 up to 62 - 2f, the old input limit)
       on which rules 2-6 hold -- the largest domain that is safe, rounded down to a power of two,
       so the public plan reveals no more about the owner's weights than that k.
    2. Bounds are interval arithmetic on real numbers, from the domain through every node (centre-
       radius form for mul/matmul/conv, so a weight's sign is used; exact rules for squares,
       softmax (in [0, 1]; softmax @ V is a convex combination of V's rows), LayerNorm (bias +-
       |scale| sqrt(N)), the guard (probabilities in [0, 1]: its insides are not analysed here)).
       Calibration ranges are never used as bounds: a maximum over samples is not a bound.
    3. Headroom: every computed value, in particular every product before its truncation, must
       stay below 2^61 ring units at its scale (comparisons and the exact truncation need 2^62;
       one bit is kept for fixed-point error).
    4. Approximations must be valid on their input's bound: exp below its overflow limit; Newton's
       reciprocal and inverse square root inside the range their guess covers; a polynomial fitted
       on a range ("fit<d>", softmax's fitted exp) only if clipping to that range errs by at most
       2^-10 on the bound; LayerNorm's x - mean, squared deviations and output products inside
       headroom; LRN's and GELU's internal products likewise.
    5. Where another setting makes an approximation valid on its bound at no loss of accuracy, it is
       taken and listed: softmax's limit-method or fitted exp becomes exp2 (thresholds, exact to an
       ulp, saturating at 0) when the logit spread can pass its range (CrypTen's softmax and
       log-softmax saturate their limit method instead); LayerNorm's inverse-sqrt guess range is
       widened to the variance bound; a fitted sigmoid, tanh, erf or ReLU whose clipping would err
       becomes the op's default implementation (saturating, or exact). The approximation pass
       chose on calibration data, where these settings agree. An ``--approx NODE=IMPL`` override
       keeps its implementation (a limit-method exp may get saturation); where it would need
       another, it limits the domain (rule 6) instead.
    6. Anything else that fails for a declared domain stops the compilation with one line naming
       the node, the op, the bound and the largest safe domain. A derived domain that does not
       cover the calibration inputs (or [-1, 1] without calibration) is reported once as too loose
       to be useful, with remedies. It never compiles a plan that can overflow inside a declared
       or derived domain.
    7. If not even [-2^-8, 2^-8] can be proven safe (deep networks: interval bounds grow by each
       layer's weight norm), the plan still compiles, with one warning, the old encoding limit
       2^(62 - 2f) as its domain and ``domain_source`` "unproven", which the client reports on
       every run. A declared ``--input-range`` turns this into the error of rule 6.
    """

    name = "bounds"

    def __init__(self, declared: dict[str, tuple[float, float]] | None = None, calibration: np.ndarray | None = None):
        self.declared = dict(declared or {})
        self.calibration = calibration
        self.result: Propagation | None = None

    def _domain(self, graph: Graph, k: int) -> dict[str, tuple[float, float]]:
        return {n: self.declared.get(n, (-(2.0**k), 2.0**k)) for n in graph.inputs}

    def _largest_safe(self, graph: Graph, f: int) -> tuple[int | None, Propagation, Propagation | None]:
        """(largest safe k or None, its propagation (or the failing one at the smallest k), the
        failing propagation just above it (None if k is the cap))."""
        k_lo, k_hi = -8, 62 - 2 * f
        top = propagate(graph, self._domain(graph, k_hi), f)
        if top.safe:
            return k_hi, top, None
        bottom = propagate(graph, self._domain(graph, k_lo), f)
        if not bottom.safe:
            return None, bottom, None
        fail = top
        while k_hi - k_lo > 1:  # bounds grow with the domain (interval arithmetic is inclusion-monotone)
            mid = (k_lo + k_hi) // 2
            r = propagate(graph, self._domain(graph, mid), f)
            if r.safe:
                k_lo, bottom = mid, r
            else:
                k_hi, fail = mid, r
        return k_lo, bottom, fail

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        f = ctx.frac_bits
        changes: list[str] = []
        derived = [n for n in graph.inputs if n not in self.declared]
        source = "derived" if derived else "declared"
        if not derived:
            res = propagate(graph, self._domain(graph, 0), f)
            if not res.safe:
                k, _, _ = Bounds()._largest_safe(graph, f)
                hint = "" if k is None else f"; inputs within [-2^{k}, 2^{k}] ({2.0**k:g}) are safe"
                raise ModelError(f"cannot compile safely for --input-range "
                                 f"{', '.join(f'{n}=[{lo:g}, {hi:g}]' for n, (lo, hi) in res.domain.items())}: "
                                 f"{res.problems[0]}{hint}")
        else:
            k, res, above = self._largest_safe(graph, f)
            if k is None:  # rule 7: too deep for interval bounds; said once, and the plan says so too
                source = "unproven"
                ctx.warn(f"no input domain can be proven safe (even |x| <= 2^-8 gives {res.problems[0]}): interval "
                         "bounds are too loose for this network, so its fixed-point headroom is NOT guaranteed. "
                         "Remedies: fewer --frac-bits, rescaling ops (normalisation) between layers, or "
                         "--input-range to make this an error")
                cap = 2.0 ** (62 - 2 * f)
                res = Propagation({n: self.declared.get(n, (-cap, cap)) for n in graph.inputs})
            else:
                self._judge(graph, ctx, k, above, derived)
        for node in graph.nodes:
            if node.name in res.fixes:
                change = res.fixes[node.name]
                old_exp = (node.attrs.get("_impl_params") or {}).get("exp_impl")
                change.apply(node)
                changes.append(f"{node.name} ({node.op}): {change.why}")
                self._update_record(graph, node, change, old_exp, f)
        self.result = res
        graph.meta["input_domain"] = {n: [float(lo), float(hi)] for n, (lo, hi) in res.domain.items()}
        graph.meta["input_domain_source"] = source
        for n, (lo, hi) in res.domain.items():
            how = "declared" if n in self.declared else {"derived": "largest safe power of two",
                                                         "unproven": "encoding limit, NOT proven safe"}[source]
            changes.append(f"input {n}: domain [{lo:g}, {hi:g}] ({how})")
        return changes

    @staticmethod
    def _update_record(graph: Graph, node: Node, change: Fix, old_exp: str | None, f: int) -> None:
        """Keep the approximation pass's record (plan ``steps[].approx``) true after a fix: the
        implementation label, the cost, and why it changed."""

        rec = graph.meta.get("approx", {}).get(node.name)
        if rec is None:
            return
        new_exp = change.params.get("exp_impl")
        if change.impl is not None:
            rec["impl"] = change.impl
        elif new_exp and old_exp and old_exp in rec["impl"]:
            rec["impl"] = rec["impl"].replace(old_exp, new_exp)
        cost = node_cost(graph, node, f)
        rec["cost"] = {"rounds": int(cost["rounds"]), "bytes": int(cost["bytes"])}
        rec["bounds"] = change.why

    def _judge(self, graph: Graph, ctx: PassContext, k: int, above: Propagation | None, derived: list[str]) -> None:
        """Rule 6's usefulness test of a derived domain: one warning with the limiting node and remedies."""
        if above is None:
            return
        want, what = 1.0, "[-1, 1]"
        x = self.calibration
        if x is not None and len(graph.inputs) == 1 and np.size(x):
            want, what = float(np.max(np.abs(x))), "the calibration inputs"
        if 2.0**k >= want:
            return
        ctx.warn(f"the input domain proven safe, [-2^{k}, 2^{k}], does not cover {what} (|x| up to {want:.3g}); the "
                 f"bound is limited by {above.problems[0]}. Remedies: fewer --frac-bits, a narrower --input-range, or "
                 "a rescaling op (normalise the input) before that node")
