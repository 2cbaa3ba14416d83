"""Building blocks of the fixed-point approximations in :mod:`siguard.runtime.kernels.nonlinear`.

Everything here is written against :class:`siguard.runtime.kernels.engine.Engine` only, so it runs unchanged on the
plain, secure and cost-counting engines. Three kinds of helpers:

* **Batched primitives** (:func:`msb_many`, :func:`mul_many`, :func:`mul_bit_many`,
  :func:`trunc_many`): independent operations of one kind are flattened, concatenated and sent
  through ONE engine call, so they share its rounds, then split back with ``local``.
* **Polynomials** (:func:`fit_chebyshev`, :func:`eval_poly`): Chebyshev interpolation offline
  (numpy), evaluation on secrets with the basis T_1..T_d built by doubling -- ceil(log2 d)
  levels of one ``mul`` + one ``trunc`` each -- and one final truncation.
* **Step functions of threshold comparisons** (:func:`ge_bits`, :func:`step_function`):
  [x >= tau_j] for many public tau_j in one ``msb`` call, and any piecewise-constant function of
  them as a sum of ``mul_bit(public value, bit)`` (one ``mul_bit`` call, 2 rounds).

Scales: a secret "at scale s" holds round(v * 2^s). The engine does not track scales; every
function here says which scale it takes and returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache, reduce
from typing import NamedTuple

import numpy as np
import torch
from numpy.polynomial import Chebyshev, Polynomial

from siguard.runtime.ring import broadcast_shape, numel

from .engine import Bits, Engine, Secret, Value

__all__ = [
    "ring_int",
    "POLY_SCALE",
    "pack",
    "unpack",
    "msb_many",
    "msb_many_with",
    "mul_many",
    "mul_bit_many",
    "trunc_many",
    "ge_bits",
    "step_function",
    "fit_chebyshev",
    "eval_poly",
    "poly_rounds",
    "ring_const",
]

#: Scale of the basis T_j (or t^j) inside :func:`eval_poly`: |T_j| <= 1, so a product of two sits
#: at scale 60 and twice it stays below 2^62 (the truncation's headroom).
POLY_SCALE = 30


# ---- small utilities ------------------------------------------------------------------------------
def ring_const(value: float, scale: int) -> torch.Tensor:
    """round(value * 2^scale) as a 0-dim int64 tensor (exact for |value * 2^scale| < 2^53).

    Cached (building a tensor costs more than the arithmetic it feeds): the result is shared, so
    it must never be modified in place -- no engine modifies a public operand."""
    try:
        return _ring_const(value, scale)
    except TypeError:  # an unhashable value (a 0-dim array): not cached
        return torch.tensor(round(value * 2.0**scale), dtype=torch.int64)


@lru_cache(maxsize=4096)
def _ring_const(value: float, scale: int) -> torch.Tensor:
    return torch.tensor(round(value * 2.0**scale), dtype=torch.int64)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _cat_flat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def pack(e: Engine, xs: Sequence[Value]) -> tuple[Value, list[torch.Size]]:
    """Flatten and concatenate values (secret or public) into one 1-D value; returns it with the
    shapes that :func:`unpack` needs."""
    shapes = [torch.Size(e.shape(x)) for x in xs]
    if len(xs) == 1:
        return e.local(_flat, xs[0]), shapes
    if all(e.is_secret(x) for x in xs):  # flatten-and-concatenate is additive in each argument
        return e.local(_cat_flat, *xs), shapes
    return e.cat([e.local(_flat, x) for x in xs], 0), shapes


def _strides(shape: torch.Size) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(out))


def _slicer(start: int, n: int, shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
    strides = _strides(shape)

    def piece(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1 and t.is_contiguous() and t.numel() >= start + n:  # one view op, not slice + reshape
            return t.as_strided(shape, strides, t.storage_offset() + start)
        return t[start : start + n].reshape(shape)

    return piece


def unpack(e: Engine, y: Value, shapes: Sequence[torch.Size]) -> list[Value]:
    """Inverse of :func:`pack`."""
    out, start = [], 0
    for s in shapes:
        n = numel(s)
        out.append(e.local(_slicer(start, n, s), y))
        start += n
    return out


def _pack_bits(e: Engine, bs: Sequence[Bits]) -> Bits:
    flats = [e.bit_local(_flat, b) for b in bs]
    return flats[0] if len(flats) == 1 else e.bit_cat(flats, 0)


def _unpack_bits(e: Engine, b: Bits, shapes: Sequence[torch.Size]) -> list[Bits]:
    out, start = [], 0
    for s in shapes:
        n = numel(s)
        out.append(e.bit_local(_slicer(start, n, s), b))
        start += n
    return out


def _expand(e: Engine, x: Value, shape: torch.Size) -> Value:
    if torch.Size(e.shape(x)) == shape:
        return x
    return e.local(lambda t: t.expand(shape).contiguous(), x)


# ---- batched primitives ---------------------------------------------------------------------------
def msb_many(e: Engine, xs: Sequence[Secret], bounds: Sequence[tuple[int, int] | None] | None = None) -> list[Bits]:
    """msb of every secret in ``xs`` with ONE ``msb`` call (8 rounds).

    ``bounds``: per operand None or the public (bits, drop) of :meth:`Engine.msb` (|x| < 2^(bits-1),
    e.g. from :func:`~siguard.runtime.kernels.engine.sign_bound`). Operands with the same bound are packed
    into one call; the groups' calls run in :meth:`Engine.parallel` (rounds: the longest, 7 for a width
    <= 32)."""
    return msb_many_with(e, xs, bounds)[0]


def msb_many_with(e: Engine, xs: Sequence[Secret], bounds: Sequence[tuple[int, int] | None] | None = None,
                  calls: Sequence[tuple] = ()) -> tuple[list[Bits], list]:
    """:func:`msb_many`, with further :meth:`Engine.parallel` calls (e.g. ``(e.trunc, x, d)``) run in the same
    rounds; returns (the bits per operand, the calls' results)."""
    if bounds is None or len(set(bounds)) == 1:  # one group: one call
        b = () if bounds is None or bounds[0] is None else tuple(bounds[0])
        y, shapes = (xs[0], None) if len(xs) == 1 else pack(e, xs)
        if calls:
            bits, *rest = e.parallel((e.msb, y, *b), *calls)
        else:
            bits, rest = e.msb(y, *b), []
        return ([bits] if shapes is None else _unpack_bits(e, bits, shapes)), rest
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i, bound in enumerate(bounds):
        groups.setdefault(None if bound is None else tuple(bound), []).append(i)
    packed = [(xs[idx[0]], None) if len(idx) == 1 else pack(e, [xs[i] for i in idx]) for idx in groups.values()]
    msb_calls = [(e.msb, y, *(b or ())) for (y, _), b in zip(packed, groups, strict=True)]
    results = e.parallel(*msb_calls, *calls)
    out: list[Bits] = [None] * len(xs)
    for (_y, shapes), idx, bits in zip(packed, groups.values(), results, strict=False):
        pieces = [bits] if shapes is None else _unpack_bits(e, bits, shapes)
        for i, piece in zip(idx, pieces, strict=True):
            out[i] = piece
    return out, results[len(msb_calls):]


def mul_many(e: Engine, pairs: Sequence[tuple[Value, Value]]) -> list[Secret]:
    """Products a*b (broadcasting within each pair, no truncation) with ONE ``mul`` call (1 round).
    Pairs with a public operand are computed locally and do not join the call."""
    if len(pairs) == 1:  # nothing to batch: the engine broadcasts
        return [e.mul(*pairs[0])]
    out: list[Secret | None] = [None] * len(pairs)
    lefts, rights, where = [], [], []
    for i, (a, b) in enumerate(pairs):
        if not (e.is_secret(a) and e.is_secret(b)):
            out[i] = e.mul(a, b)
            continue
        shape = torch.Size(broadcast_shape(tuple(e.shape(a)), tuple(e.shape(b))))
        lefts.append(_expand(e, a, shape))
        rights.append(_expand(e, b, shape))
        where.append(i)
    if lefts:
        la, shapes = pack(e, lefts)
        ra, _ = pack(e, rights)
        for i, v in zip(where, unpack(e, e.mul(la, ra), shapes), strict=True):
            out[i] = v
    return out  # type: ignore[return-value]


def mul_bit_many(e: Engine, xs: Sequence[Value], bits: Sequence[Bits]) -> list[Secret]:
    """x_i * b_i for arithmetic x_i (secret or public, broadcast to b_i's shape) and Boolean b_i,
    with ONE ``mul_bit`` call (2 rounds). No truncation: the result keeps x_i's scale."""
    if len(xs) == 1:  # nothing to batch: mul_bit broadcasts x to b's shape
        return [e.mul_bit(xs[0], bits[0])]
    shapes = [torch.Size(b.shape) for b in bits]
    x, _ = pack(e, [_expand(e, x, s) for x, s in zip(xs, shapes, strict=True)])
    return unpack(e, e.mul_bit(x, _pack_bits(e, bits)), shapes)


def trunc_many(e: Engine, xs: Sequence[Secret], bits: int | Sequence[int]) -> list[Secret]:
    """Truncate every x_i by bits_i with ONE ``trunc`` call (2 rounds). Different shifts are
    equalised by first multiplying x_i by 2^(max - bits_i) locally: the caller keeps that product
    below 2^62."""
    shifts = [int(bits)] * len(xs) if isinstance(bits, int) else [int(b) for b in bits]
    top = max(shifts)
    scaled = [x if s == top else e.mul(x, ring_int(1 << (top - s))) for x, s in zip(xs, shifts, strict=True)]
    if len(scaled) == 1:
        return [e.trunc(scaled[0], top)]
    y, shapes = pack(e, scaled)
    return unpack(e, e.trunc(y, top), shapes)


# ---- threshold comparisons and step functions -----------------------------------------------------
def ge_bits(e: Engine, x: Secret, thresholds: torch.Tensor) -> Secret:
    """The differences x - tau_j, stacked on a new leading axis (shape (m, *x.shape)), for one
    ``msb`` call: [x >= tau_j] = NOT msb(x - tau_j). ``thresholds`` are ring values at x's scale.

    Returns the difference secret; pass it (with others) to :func:`msb_many`, then ``bit_not``."""
    m = int(thresholds.numel())
    shape = torch.Size(e.shape(x))
    stacked = e.local(lambda t: t.unsqueeze(0).expand((m, *shape)).contiguous(), x)
    return e.sub(stacked, thresholds.reshape((m,) + (1,) * len(shape)))


def step_function(
    e: Engine, bits: Bits, values: Sequence[torch.Tensor], extra: Sequence[tuple[Value, Bits]] = ()
) -> tuple[list[Secret], list[Secret]]:
    """Piecewise-constant public functions of thermometer bits b_j = [x >= tau_j] (tau increasing).

    Each ``values`` entry v (int64 ring values, shape (m + 1,)) defines v[0] below tau_1, v[j] on
    [tau_j, tau_{j+1}) and v[m] above tau_m, computed as v[0] + sum_j (v[j] - v[j-1]) * b_j. All of
    them and the ``extra`` (x, bit) products share ONE ``mul_bit`` call (2 rounds). ``bits`` has
    shape (m, *shape). Returns (one secret of ``shape`` per values entry, the extra products)."""
    m = int(bits.shape[0])
    tail = tuple(bits.shape[1:])
    xs: list[Value] = []
    for v in values:
        deltas = (v[1:] - v[:-1]).reshape((m,) + (1,) * len(tail))
        xs.append(deltas.expand((m, *tail)).contiguous())
    products = mul_bit_many(e, xs + [x for x, _ in extra], [bits] * len(values) + [b for _, b in extra])
    totals = [e.add(e.local(lambda t: t.sum(dim=0), p), v[0]) for p, v in zip(products, values, strict=False)]
    return totals, products[len(values) :]


# ---- polynomials ----------------------------------------------------------------------------------
def fit_chebyshev(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, degree: int) -> np.ndarray:
    """Chebyshev interpolation coefficients c_0..c_degree of ``fn`` on [lo, hi], in the variable
    t = (2x - lo - hi) / (hi - lo) in [-1, 1] (numpy ``Chebyshev.interpolate``). Coefficients below
    1e-13 of the largest are set to 0 (an odd function then has exactly zero even terms, which
    :func:`eval_poly` skips)."""
    if not hi > lo:
        raise ValueError(f"empty interval [{lo}, {hi}]")
    coef = Chebyshev.interpolate(fn, int(degree), domain=[lo, hi]).coef.astype(np.float64)
    coef[np.abs(coef) < 1e-13 * np.abs(coef).max()] = 0.0
    return coef


def poly_rounds(degree: int) -> int:
    """Rounds of :func:`eval_poly` for a polynomial of this degree: 3 per doubling level + 2."""
    return 3 * max(0, math.ceil(math.log2(degree))) + 2 if degree > 1 else 2


def _needed(nonzero: set[int], basis: str) -> set[int]:
    """Basis indices to compute: the nonzero terms and, recursively, what the doubling formulas
    T_{m+j} = 2 T_m T_j - T_{m-j} (or t^{m+j} = t^m t^j) need, m the largest power of two < index."""
    need: set[int] = set()
    stack = list(nonzero)
    while stack:
        k = stack.pop()
        if k in need:
            continue
        need.add(k)
        if k > 1:
            m = 1 << ((k - 1).bit_length() - 1)
            deps = (m, k - m, 2 * m - k) if basis == "chebyshev" else (m, k - m)
            stack.extend(d for d in deps if d >= 1)
    return need


def eval_poly(
    e: Engine,
    x: Secret,
    coeffs: Sequence[float] | np.ndarray,
    lo: float,
    hi: float,
    basis: str = "chebyshev",
    x_scale: int | None = None,
    out_scale: int | None = None,
) -> Secret:
    """p(t) = sum_j c_j B_j(t), t = (2x - lo - hi) / (hi - lo), B_j = T_j ("chebyshev") or t^j ("power").

    ``x`` (at ``x_scale``, default f) MUST lie in [lo, hi] (callers clip first): outside, the
    basis grows without bound and wraps. Returns p at ``out_scale`` (default f).

    Fixed point: t = x * A + B is formed exactly at scale :data:`POLY_SCALE` (30) by a local
    product with the integer A = floor(a * 2^(30 - x_scale)), a = 2 / (hi - lo); the series is
    re-expanded (numpy composition) for the encoded map, so the map itself adds no error. The basis
    is built by doubling: level L computes T_{m+1..2m} (m = 2^(L-1)) from T_1..T_m as
    2 T_m T_j - T_{m-j}, all products of the level in ONE ``mul``, ONE ``trunc`` by 30. Only basis
    terms that a nonzero coefficient needs are computed. Coefficients are public integers at a
    scale chosen to keep sum |c_j| * 2^(30 + scale) < 2^61; one final ``trunc``. Chebyshev
    coefficients stay O(1) (no monomial blow-up, which is why "chebyshev" is the default basis).

    Cost: ceil(log2 d) levels x (mul 1 + trunc 2) + final trunc 2 = :func:`poly_rounds` (d) rounds.

    Everything that depends only on public parameters (the re-expanded series, the integer
    coefficients, which basis terms each level builds) is computed once per (coefficients,
    interval, basis, scales) and cached (:func:`_poly_plan`).
    """
    f = e.frac_bits
    xs = f if x_scale is None else int(x_scale)
    os_ = f if out_scale is None else int(out_scale)
    coef = np.ascontiguousarray(coeffs, dtype=np.float64)
    plan = _poly_plan(coef.tobytes(), float(lo), float(hi), basis, xs, os_)
    if plan.constant is not None:  # a constant polynomial: public, but callers expect a secret of x's shape
        return e.add(e.mul(x, _ZERO), plan.constant)

    basis_vals: dict[int, Secret] = {1: e.add(e.mul(x, plan.a_int), plan.b_int)}
    for m, targets in plan.levels:
        prods = mul_many(e, [(basis_vals[m], basis_vals[k - m]) for k, _ in targets])
        pre = []
        for (_, low), p in zip(targets, prods, strict=True):
            if low is None:  # power basis
                pre.append(p)
            else:  # T_{m+j} = 2 T_m T_j - T_{m-j}
                low_term = plan.one_sq if low == 0 else e.mul(basis_vals[low], plan.one)
                pre.append(e.sub(e.mul(p, _TWO), low_term))
        for (k, _), v in zip(targets, trunc_many(e, pre, POLY_SCALE), strict=True):
            basis_vals[k] = v
    acc = reduce(e.add, [e.mul(basis_vals[j], c) for j, c in plan.terms])
    return e.trunc(e.add(acc, plan.const), plan.shift)


class _PolyPlan(NamedTuple):
    """Everything :func:`eval_poly` derives from public parameters alone (cached per parameters).

    ``constant``: the public result for a constant polynomial (else None); ``a_int``, ``b_int``:
    the encoded affine map to t; ``levels``: per doubling level m, the (target k, T_{m-j} index
    or None for the power basis) pairs; ``terms``: (j, integer coefficient) for the nonzero
    terms; ``const``: the constant term plus the rounding half, both at the final scale before
    the ``shift`` truncation. The tensors are shared: engines never modify public operands."""

    constant: torch.Tensor | None
    a_int: torch.Tensor | None
    b_int: torch.Tensor | None
    levels: tuple[tuple[int, tuple[tuple[int, int | None], ...]], ...]
    one: torch.Tensor
    one_sq: torch.Tensor
    terms: tuple[tuple[int, torch.Tensor], ...]
    const: torch.Tensor | None
    shift: int


_ZERO = torch.tensor(0, dtype=torch.int64)
_TWO = torch.tensor(2, dtype=torch.int64)


@lru_cache(maxsize=512)
def _poly_plan(coef_bytes: bytes, lo: float, hi: float, basis: str, xs: int, os_: int) -> _PolyPlan:
    big = POLY_SCALE
    if xs > big:
        raise ValueError(f"x_scale {xs} above the polynomial scale {big}")
    series_cls = {"chebyshev": Chebyshev, "power": Polynomial}[basis]
    coef = np.frombuffer(coef_bytes, dtype=np.float64)
    a = 2.0 / (hi - lo)
    mid = 0.5 * (lo + hi)
    a_int = math.floor(a * 2.0 ** (big - xs))
    if a_int < 1:
        raise ValueError(f"interval [{lo}, {hi}] too wide for x at scale {xs}")
    b_int = -round(a_int * mid * 2.0**xs)
    # The encoded map t' = (x_ring * A + B) / 2^30 = a' x + b'. The fitted variable is u = a (x - mid)
    # = alpha t' + beta: re-expand p(u) as a series in t' (exact polynomial identity).
    a_enc, b_enc = a_int / 2.0 ** (big - xs), b_int / 2.0**big
    alpha = a / a_enc
    beta = -a * (b_enc / a_enc + mid)
    coef = series_cls(coef)(series_cls([beta, alpha])).coef
    degree = len(coef) - 1
    while degree > 0 and coef[degree] == 0.0:
        degree -= 1
    scale_max = 1e-13 * np.abs(coef).max()
    nonzero = {j for j in range(1, degree + 1) if abs(coef[j]) > scale_max}
    total_abs = float(np.abs(coef).sum()) or 1.0
    c_scale = min(61 - big - math.ceil(math.log2(total_abs) + 1e-12) - 1, 40)
    shift = big + c_scale - os_
    if shift < 0:
        raise ValueError("output scale too large for the coefficient scale")
    one = 1 << big  # T_0 = t^0 = 1 at scale 30
    if not nonzero:
        return _PolyPlan(ring_int(round(float(coef[0]) * 2.0**os_)), None, None, (), ring_int(one),
                         ring_int(one << big), (), None, 0)
    need = _needed(nonzero, basis)
    levels = []
    m = 1
    while m < degree:
        cheb = basis == "chebyshev"
        targets = tuple((k, 2 * m - k if cheb else None) for k in range(m + 1, 2 * m + 1) if k in need)
        if targets:
            levels.append((m, targets))
        m *= 2
    c_ring = [round(float(c) * 2.0**c_scale) for c in coef]
    half = (1 << (shift - 1)) if shift else 0  # round to nearest instead of flooring
    return _PolyPlan(
        None, ring_int(a_int), ring_int(b_int), tuple(levels), ring_int(one), ring_int(one << big),
        tuple((j, ring_int(c_ring[j])) for j in sorted(nonzero)), ring_int((c_ring[0] << big) + half), shift,
    )


@lru_cache(maxsize=4096)
def ring_int(v: int) -> torch.Tensor:
    """The ring integer v as a shared 0-dim int64 tensor (cached: never modify it in place)."""
    return torch.tensor(int(v), dtype=torch.int64)
