"""Nonlinear functions on secrets, written once against :class:`siguard.runtime.kernels.engine.Engine`.

Every function takes and returns secrets at the engine's fixed-point scale f (``e.frac_bits``,
16 by default) unless it says otherwise, calls only the Engine interface (so the plain, secure and
cost engines run the same code) and batches independent work into one primitive call per round
(see :mod:`siguard.runtime.kernels.approx`). Round counts below are for the secure engine: mul 1, trunc 2, msb 8,
mul_bit 2, b2a 2; local operations are free. "ulp" = 2^-f. Truncations round to nearest (half
an ulp is added first, for free). Errors were measured with the plain engine at f = 16 against
float64 references evaluated at the encoded inputs; the secure engine's truncation may add 1 ulp
per truncation on top (tests/runtime/test_nonlinear.py checks both).

The registry :data:`IMPLEMENTATIONS` maps ``op -> impl name -> callable(e, *inputs, **attrs)``
(IR attribute names from :mod:`siguard.compiler.ops`; optional tuning keywords such as ``lo``/``hi``
ranges are accepted too); :data:`DESCRIPTIONS` has one line per implementation. Parameterised
families ("limit<n>", "newton<k>", "chebyshev<d>") are registered for common values and any other
value resolves through :func:`get_implementation`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from siguard.compiler.impl import Impl
from siguard.core.shapes import normalize_axis

from .approx import (
    eval_poly,
    fit_chebyshev,
    ge_bits,
    msb_many,
    mul_bit_many,
    mul_many,
    ring_const,
    ring_int,
    step_function,
    trunc_many,
)
from .cost import CostEngine, MetaShares
from .engine import Bits, Engine, Secret


# scipy.special, imported when a fit needs it (not by every run: scipy.special pulls in numpy.f2py and
# every text codec, a few tenths of a second of a one-shot `siguard run` that has no such op)
def _erf_np(a):
    from scipy.special import erf

    return erf(a)


def _expit_np(a):
    from scipy.special import expit

    return expit(a)


def _ndtr_np(a):
    from scipy.special import ndtr

    return ndtr(a)


__all__ = [
    "IMPLEMENTATIONS",
    "DESCRIPTIONS",
    "PAD_VALUE",
    "get_implementation",
    "describe",
    "relu",
    "leaky_relu",
    "prelu",
    "clip",
    "hard_sigmoid",
    "hard_swish",
    "reduce_max_axes",
    "maxpool2d",
    "reduce_max",
    "argmax_onehot",
    "max_and_argmax",
    "exp",
    "exp_limit",
    "exp_steps",
    "reciprocal",
    "rsqrt",
    "sqrt",
    "log",
    "softmax",
    "log_softmax",
    "sigmoid",
    "tanh",
    "erf",
    "gelu",
    "softplus",
    "layer_norm",
    "lrn",
    "fit_chebyshev",
    "eval_poly",
    "fitted",
    "fitted_coefficients",
    "fitted_reference",
    "FIT_TARGETS",
    "FIT_DEFAULT_RANGES",
]

LN2 = math.log(2.0)

#: Public padding value for max pooling and argmax trees (ring units): very negative, yet any
#: difference with a value |x| < 2^61 stays inside the signed range the comparison needs.
PAD_VALUE = -(2**61)


# ---- small helpers --------------------------------------------------------------------------------
_t = ring_int  # a public ring integer as a shared 0-dim tensor

def _rtrunc(e: Engine, x: Secret, bits: int) -> Secret:
    """trunc(x, bits) rounding to nearest (adds half an output ulp first; free)."""
    return e.trunc(e.add(x, _t(1 << (bits - 1))), bits) if bits > 0 else x


def _clip_ring(e: Engine, x: Secret, lo: int | None, hi: int | None) -> Secret:
    """min(max(x, lo), hi) for public ring bounds (either may be None): both comparisons in ONE
    msb call, both corrections in ONE mul_bit call. 10 rounds. Exact."""
    diffs, terms = [], []
    if lo is not None:
        diffs.append(e.sub(x, _t(lo)))  # msb = [x < lo]
        terms.append(e.sub(_t(lo), x))
    if hi is not None:
        diffs.append(e.sub(_t(hi), x))  # msb = [x > hi]
        terms.append(e.sub(_t(hi), x))
    if not diffs:
        return x
    bits = msb_many(e, diffs)
    for p in mul_bit_many(e, terms, bits):
        x = e.add(x, p)
    return x


def _sign_split(
    e: Engine, x: Secret, bound: int | None, want_sign: bool = False
) -> tuple[Secret, Secret, Secret | None]:
    """(min(|x|, bound), relu(x), [x < 0] as arithmetic 0/1 if ``want_sign``) with ONE msb call on
    (x, bound - x, x + bound) and ONE mul_bit call. 10 rounds. Exact. ``bound`` is a ring value at
    x's scale (None: no clipping)."""
    diffs = [x]
    if bound is not None:
        diffs += [e.sub(_t(bound), x), e.add(x, _t(bound))]
    bits = msb_many(e, diffs)
    terms: list[Any] = [x]
    bs: list[Bits] = [bits[0]]
    if bound is not None:
        terms += [e.sub(_t(bound), x), e.add(x, _t(bound))]
        bs += [bits[1], bits[2]]
    if want_sign:
        terms.append(_t(1))
        bs.append(bits[0])
    prods = mul_bit_many(e, terms, bs)
    x_neg = prods[0]  # x * [x < 0]
    relu_x = e.sub(x, x_neg)
    a = e.sub(x, e.mul(x_neg, _t(2)))  # |x|
    if bound is not None:
        a = e.add(e.add(a, prods[1]), prods[2])
    return a, relu_x, (prods[-1] if want_sign else None)


# ---- ReLU family, clip ----------------------------------------------------------------------------
def relu(e: Engine, x: Secret, shift: int = 0) -> Secret:
    """max(x, 0) = x * NOT msb(x). Exact (DReLU(0) = 1). Any scale. Cost: msb 8 + mul_bit 2 = 10 rounds.

    ``shift`` d > 0: x is a product at scale f + d whose truncation was fused into the ReLU
    (:class:`siguard.passes.fuse.FuseTruncation`): the sign of x and trunc(x, d) are computed in the same
    rounds (:meth:`Engine.parallel`: msb 8 rounds || trunc 2 rounds), then the select. Cost 10
    rounds instead of trunc 2 + 10; bytes are those of the two (trunc 16/8/8 B + msb 64 B per
    element, mul_bit). The result is relu(trunc(x, d)) except that for 0 <= x < 2^d the secure
    truncation's -1 ulp is not clipped (|error| <= 1 ulp, like the truncation's own)."""
    if shift:
        sign, x = e.parallel((e.msb, x), (e.trunc, x, int(shift)))
        return e.mul_bit(x, e.bit_not(sign))
    return e.mul_bit(x, e.bit_not(e.msb(x)))


def leaky_relu(e: Engine, x: Secret, alpha: float = 0.01) -> Secret:
    """x if x >= 0 else alpha * x, as trunc(x * A + (x * (2^f - A)) * [x >= 0], f), A = enc(alpha).

    Exact for x >= 0; for x < 0 the result is alpha * x rounded to the nearest ulp after encoding
    alpha (|error| <= 0.5 ulp + |x| * 2^-(f+1)). Cost: msb 8 + mul_bit 2 + trunc 2 = 12 rounds."""
    f = e.frac_bits
    a_int = int(ring_const(alpha, f))
    pos = e.bit_not(e.msb(x))
    y = e.add(e.mul(x, _t(a_int)), e.mul_bit(e.mul(x, _t((1 << f) - a_int)), pos))
    return _rtrunc(e, y, f)


def prelu(e: Engine, x: Secret, slope: Any) -> Secret:
    """x if x >= 0 else slope * x, with a per-channel ``slope`` (secret at scale f, or a public
    ring tensor at scale f) broadcastable to x (ONNX PReLU).

    r = relu(x) exactly, then y = r + trunc(slope * (x - r)). Exact for x >= 0 (plain engine);
    |error| <= 0.5 ulp for x < 0. Cost: msb 8 + mul_bit 2 + mul 1 + trunc 2 = 13 rounds
    (11 with a public slope)."""
    r = relu(e, x)
    neg = e.sub(x, r)
    return e.add(r, _rtrunc(e, e.mul(neg, slope), e.frac_bits))


def clip(e: Engine, x: Secret, min: float | None = None, max: float | None = None) -> Secret:
    """min(max(x, min), max) for public real bounds (either may be None), encoded at scale f.

    Exact. Both comparisons share ONE msb call: 10 rounds (0 if both bounds are None)."""
    f = e.frac_bits
    lo = None if min is None else int(ring_const(min, f))
    hi = None if max is None else int(ring_const(max, f))
    return _clip_ring(e, x, lo, hi)


def hard_sigmoid(e: Engine, x: Secret, alpha: float = 0.2, beta: float = 0.5) -> Secret:
    """max(0, min(1, alpha * x + beta)): the public affine map (one rounding truncation), then an
    exact clip to [0, 1]. |error| <= 0.5 ulp + |x| * 2^-(f+1) (encoding of alpha); outputs are
    exactly 0 and 1 where saturated. Cost: trunc 2 + clip 10 = 12 rounds."""
    f = e.frac_bits
    y = e.add(e.mul(x, ring_const(alpha, f)), _t(int(ring_const(beta, f)) << f))
    return _clip_ring(e, _rtrunc(e, y, f), 0, 1 << f)


def hard_swish(e: Engine, x: Secret) -> Secret:
    """x * hard_sigmoid(x) with alpha = 1/6, beta = 1/2 (ONNX HardSwish): the hard sigmoid exactly
    as :func:`hard_sigmoid` (one rounding truncation, one clip = two comparisons in one msb), then
    one product and one rounding truncation. |error| <= |x| * (0.5 ulp + |x| * 2^-(f+1)) + 0.5 ulp
    (exact 0 for x <= -3, x up to the truncations' rounding for x >= 3).
    Cost: trunc 2 + clip 10 + mul 1 + trunc 2 = 15 rounds; 216 / 184 / 184 bytes per element
    (P0 / P1 / P2), as the cost model counts and ``tests/compiler/test_secure_wild_models.py`` checks."""
    h = hard_sigmoid(e, x, 1.0 / 6.0, 0.5)
    return _rtrunc(e, e.mul(x, h), e.frac_bits)


# ---- max, max pooling, argmax ---------------------------------------------------------------------
def _tree_max(e: Engine, v: Secret) -> Secret:
    """Maximum over axis 0 of ``v`` (shape (k, *rest)) by a tree: ceil(log2 k) levels, each ONE
    msb of (a - b) for all adjacent pairs and ONE mul_bit selecting a + (b - a) [a < b]. An odd
    element is carried to the next level. 10 rounds per level. Returns shape ``rest``."""
    k = int(v.shape[0])
    while k > 1:
        p = k // 2
        a = e.local(lambda t, p=p: t[0 : 2 * p : 2], v)
        b = e.local(lambda t, p=p: t[1 : 2 * p : 2], v)
        diff = e.sub(b, a)
        top = e.add(a, e.mul_bit(diff, e.msb(e.neg(diff))))
        v = e.cat([top, e.local(lambda t, p=p: t[2 * p :], v)], 0) if k % 2 else top
        k = p + k % 2
    return e.local(lambda t: t[0], v)


def _tree_argmax(e: Engine, v: Secret, scale: int) -> tuple[Secret, Secret]:
    """(max, one-hot) over axis 0 of ``v`` (shape (k, *rest)); the one-hot (shape (k, *rest)) has
    2^scale at the first maximal position and 0 elsewhere.

    k is padded to a power of two with :data:`PAD_VALUE` so every level pairs equal-length,
    contiguous groups (a before b); each group carries its one-hot of length L. Per level: ONE msb
    of a - b, ONE mul_bit selecting the value and both halves of the new one-hot
    [mask_a * (1 - c), mask_b * c] with c = [a < b] (ties keep a, i.e. the first index).
    10 rounds per level, ceil(log2 k) levels."""
    k = int(v.shape[0])
    rest = tuple(v.shape[1:])
    if k == 1:  # a secret one-hot all the same (0 * v + 2^scale)
        return e.local(lambda t: t[0], v), e.add(e.mul(v, _t(0)), _t(1 << scale))
    kp = 1 << (k - 1).bit_length()
    if kp > k:
        v = e.local(lambda t: torch.cat([t, torch.zeros((kp - k, *rest), dtype=t.dtype, device=t.device)], 0), v)
        pad = torch.zeros((kp, *rest), dtype=torch.int64)
        pad[k:] = PAD_VALUE
        v = e.add(v, pad)
    masks: Any = torch.full((kp, 1, *rest), 1 << scale, dtype=torch.int64)
    length = 1
    while kp > 1:
        h = kp // 2
        a = e.local(lambda t: t[0::2], v)
        b = e.local(lambda t: t[1::2], v)
        ma = e.local(lambda t: t[0::2], masks)
        mb = e.local(lambda t: t[1::2], masks)
        diff = e.sub(b, a)
        c = e.msb(e.neg(diff))  # [a < b]
        c_wide = e.bit_local(lambda t, h=h, n=length: t.unsqueeze(1).expand((h, n, *rest)).contiguous(), c)
        sel, pa, pb = mul_bit_many(e, [diff, ma, mb], [c, c_wide, c_wide])
        v = e.add(a, sel)
        masks = e.cat([e.sub(ma, pa), pb], 1)
        kp, length = h, 2 * length
    top = e.local(lambda t: t[0], v)
    onehot = e.local(lambda t: t[0, :k], masks)
    return top, onehot


def reduce_max_axes(e: Engine, x: Secret, axes: Sequence[int] = (-1,), keepdims: bool = True) -> Secret:
    """Maximum over several ``axes`` (ONNX ReduceMax): the axes are moved to the front and
    flattened, then one comparison tree over their k elements (ties are irrelevant: the value is
    returned). Exact. Cost: 10 * ceil(log2 k) rounds, k = the product of the reduced sizes; (k - 1)
    comparisons and selections per output element: (k - 1) * 88 / 80 / 80 bytes (P0 / P1 / P2)."""
    nd = len(x.shape)
    ax = sorted({normalize_axis(int(a), nd) for a in axes})
    rest = [d for i, d in enumerate(x.shape) if i not in ax]
    k = int(np.prod([x.shape[a] for a in ax], dtype=np.int64))
    flat = e.local(lambda t: t.permute(*ax, *[i for i in range(nd) if i not in ax]).reshape(k, *rest).contiguous(), x)
    m = _tree_max(e, flat)
    if not keepdims:
        return m
    kept = [1 if i in ax else int(d) for i, d in enumerate(x.shape)]
    return e.local(lambda t: t.reshape(kept), m)


def reduce_max(e: Engine, x: Secret, axis: int = -1, keepdims: bool = False) -> Secret:
    """Maximum along ``axis``, exact, by a comparison tree. Values must satisfy |x| < 2^62 ring
    units (differences must not wrap). Cost: 10 * ceil(log2 k) rounds for k = x.shape[axis]."""
    ax = normalize_axis(axis, len(x.shape))
    m = _tree_max(e, e.local(lambda t: t.movedim(ax, 0).contiguous(), x))
    return e.local(lambda t: t.unsqueeze(ax), m) if keepdims else m


def max_and_argmax(e: Engine, x: Secret, axis: int = -1, scale: int | None = None) -> tuple[Secret, Secret]:
    """(max along ``axis`` with keepdims, one-hot of the first argmax with x's shape at ``scale``
    (default f; 0 gives integers 0/1)). Exact; ties go to the first index. Values must satisfy
    |x| < 2^61 ring units. Cost: 10 * ceil(log2 k) rounds."""
    ax = normalize_axis(axis, len(x.shape))
    sc = e.frac_bits if scale is None else int(scale)
    top, onehot = _tree_argmax(e, e.local(lambda t: t.movedim(ax, 0).contiguous(), x), sc)
    return e.local(lambda t: t.unsqueeze(ax), top), e.local(lambda t: t.movedim(0, ax).contiguous(), onehot)


def argmax_onehot(e: Engine, x: Secret, axis: int = -1, scale: int | None = None) -> Secret:
    """One-hot (arithmetic, value 2^scale, default scale f) of the first maximum along ``axis``;
    see :func:`max_and_argmax`. Cost: 10 * ceil(log2 k) rounds."""
    return max_and_argmax(e, x, axis, scale)[1]


def maxpool2d(
    e: Engine,
    x: Secret,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> Secret:
    """2-D max pooling of x (N, C, H, W); pads = (top, left, bottom, right) filled with the public
    :data:`PAD_VALUE`; output (N, C, OH, OW) with OH = (H + top + bottom - dh (kh - 1) - 1) // sh + 1.

    The k = kh * kw window elements are gathered share-wise by strided slices (one ``local``), then
    reduced by :func:`_tree_max`. Exact (|x| < 2^61 ring units). Cost: 10 * ceil(log2 k) rounds
    (2x2: 20, 3x3: 40)."""
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in (strides if strides is not None else (1, 1)))
    dh, dw = (int(d) for d in dilations)
    top, left, bottom, right = (int(p) for p in pads)
    n, c, h, w = (int(s) for s in x.shape)
    hp, wp = h + top + bottom, w + left + right
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"maxpool window {kernel} does not fit the padded input {hp}x{wp}")
    if top or left or bottom or right:
        x = e.local(lambda t: F.pad(t, (left, right, top, bottom)), x)
        fill = torch.full((hp, wp), PAD_VALUE, dtype=torch.int64)
        fill[top : top + h, left : left + w] = 0
        x = e.add(x, fill)

    def windows(t: torch.Tensor) -> torch.Tensor:
        parts = [
            t[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        return torch.stack(parts, 0)

    return _tree_max(e, e.local(windows, x))


# ---- exp ------------------------------------------------------------------------------------------
def _exp_hi_default(f: int) -> float:
    """Largest x whose e^x at scale 2f (the last squaring's product) stays below 2^60."""
    return max(0, 60 - 2 * f) * LN2


def exp_limit(e: Engine, x: Secret, iterations: int = 8, saturate: bool = True, hi: float | None = None) -> Secret:
    """e^x by the limit method (1 + x / 2^n)^(2^n), n = ``iterations``.

    The 1/2^n is free: x at scale f *is* x / 2^n at scale f + n, so the base is x + 2^(f+n).
    Domain: -2^n <= x <= hi (hi default (60 - 2f) ln 2 = 19.4 at f = 16, the overflow limit;
    below -2^n the base is negative and the power is garbage). With ``saturate`` (default) the
    base is first clipped to [0, 1 + hi / 2^n] (one msb for both bounds): x < -2^n gives exactly
    0, x > hi gives e^hi. Without it the caller guarantees the domain (softmax: x = logit - max
    in [-2^n, 0], hi = 0).

    Fixed point: the i-th square y_i = e^(x / 2^(n-i)) is kept at the largest scale (<= 30) its
    bound e^(hi / 2^(n-i)) allows, so for hi <= 0 the squarings are essentially exact and only
    the method's own error remains: about e^x x^2 / 2^(n+1) (e^x underestimated).
    Measured max |error| (f = 16) on [-16, 0]: n = 4: 1.7e-2, n = 6: 4.3e-3, n = 8: 1.1e-3,
    n = 10: 2.7e-4; relative 3.1e-2 on [0, 4] for n = 8 with the default hi.
    Cost: n x (mul 1 + trunc 2) = 3n rounds (+10 with ``saturate``). n = 8: 24 (34)."""
    f = e.frac_bits
    n = int(iterations)
    top = _exp_hi_default(f) if hi is None else float(hi)
    base = e.add(x, _t(1 << (f + n)))  # 1 + x / 2^n at scale f + n
    if saturate:
        base = _clip_ring(e, base, 0, int(ring_const(1.0 + top / 2**n, f + n)))
    # scale of y_i: y_{i+1} = y_i^2 <= e^(top / 2^(n-i-1)) must fit at twice that scale
    log_bound = [max(0.0, top / 2 ** (n - i) / LN2) for i in range(n + 1)]
    scales = [f + n] + [max(f, min(30, math.floor((60 - log_bound[i + 1]) / 2))) for i in range(1, n)] + [f]
    y = base
    for i in range(n):
        y = _rtrunc(e, e.mul(y, y), 2 * scales[i] - scales[i + 1])
    return y


@functools.lru_cache(maxsize=64)
def _exp_poly(width: float, degree: int) -> np.ndarray:
    return fit_chebyshev(np.exp, 0.0, width, degree)


def exp_steps(e: Engine, x: Secret, lo: float | None = None, hi: float | None = None, degree: int = 4,
              out_scale: int | None = None) -> Secret:
    """e^x by range reduction with threshold comparisons (the Aly-Smart 2^x idea without A2B).

    Grid tau_k = enc(k ln 2) for k = K_lo..K_hi (K_lo = ceil(lo / ln 2), K_hi = floor(hi / ln 2);
    defaults lo = -f ln 2, where e^x falls below one ulp, and hi = (60 - 2f) ln 2). ONE msb call
    gives all b_k = [x >= tau_k] (the integer part as a thermometer code); ONE mul_bit call gives
    the step values S = e^(tau_k) (exactly the encoded grid point, so no ln 2 rounding error), the
    grid point tau_k itself and the clip corrections; r = x_c - tau_k in [0, ln 2] exactly;
    e^r by a degree-``degree`` Chebyshev polynomial; e^x = S * e^r.

    Saturation: x < tau_{K_lo} gives exactly 0 (S = 0), x > tau_{K_hi} gives e^(tau_{K_hi}).
    The result is at ``out_scale`` (default f); a larger one keeps tiny values (x down to
    -out_scale ln 2) with relative precision.
    Measured at f = 16, degree 4: max |error| 1.5e-5 (one ulp) on [-12, 0], relative 1.1e-5 on
    [0, 19]. Bytes grow with the number of grid points (K_hi - K_lo + 1; 45 by default).
    Cost: msb 8 + mul_bit 2 + polynomial (3 ceil(log2 d) + 2) + mul 1 + trunc 2 = 21 rounds (d = 4)."""
    f = e.frac_bits
    lo = -f * LN2 if lo is None else float(lo)
    hi = _exp_hi_default(f) if hi is None else float(hi)
    k_lo, k_hi = math.ceil(lo / LN2 - 1e-9), math.floor(hi / LN2 + 1e-9)
    if k_hi < k_lo:
        raise ValueError(f"exp range [{lo}, {hi}] holds no multiple of ln 2")
    ks = torch.arange(k_lo, k_hi + 1, dtype=torch.float64)
    tau = torch.round(ks * LN2 * 2.0**f).to(torch.int64)
    tau_real = tau.to(torch.float64) / 2.0**f
    s_scale = max(f, min(40, 59 - f - max(0, math.ceil(float(tau_real[-1]) / LN2))))
    s_vals = torch.cat(
        [torch.zeros(1, dtype=torch.int64), torch.round(torch.exp(tau_real) * 2.0**s_scale).to(torch.int64)]
    )
    t_vals = torch.cat([tau[:1], tau])
    (neg,) = msb_many(e, [ge_bits(e, x, tau)])
    ge = e.bit_not(neg)
    below = e.bit_local(lambda t: t[0], neg)  # [x < tau_lo]
    above = e.bit_local(lambda t: t[-1], ge)  # [x >= tau_hi]
    (s, grid), (p_lo, p_hi) = step_function(
        e, ge, [s_vals, t_vals], [(e.sub(tau[0], x), below), (e.sub(tau[-1], x), above)]
    )
    r = e.sub(e.add(e.add(x, p_lo), p_hi), grid)
    width = float((tau[1:] - tau[:-1]).max()) / 2.0**f if len(tau) > 1 else LN2
    poly = eval_poly(e, r, _exp_poly(width, int(degree)), 0.0, width)
    # ``out_scale`` > f keeps small results with relative precision (the guard's probabilities)
    out = f if out_scale is None else int(out_scale)
    if not f <= out < s_scale + f:
        raise ValueError(f"out_scale {out} outside [{f}, {s_scale + f})")
    return _rtrunc(e, e.mul(s, poly), s_scale + f - out)


def exp(e: Engine, x: Secret, impl: str | Impl = "limit8", **params: Any) -> Secret:
    """e^x. ``impl``: "limit<n>" (:func:`exp_limit`, saturating, 3n + 10 rounds) or "exp2"
    (:func:`exp_steps`, 21 rounds, about 1 ulp)."""
    impl = _impl(impl, "exp")
    if impl.name == "exp2":
        return exp_steps(e, x, **params)
    return exp_limit(e, x, iterations=_impl_number(impl, "limit", "exp"), **params)


# ---- reciprocal, inverse square root, sqrt, log ---------------------------------------------------
def _impl(impl: str | Impl, op: str) -> Impl:
    """``impl`` as an :class:`Impl` (kernels take a name or an Impl); KeyError for text that is not a name."""
    try:
        return Impl.parse(impl, op)
    except ValueError:
        raise KeyError(f"unknown {op} implementation {impl!r}") from None


def _impl_number(impl: str | Impl, family: str, op: str) -> int:
    """The number of ``impl`` (a name such as "limit8", or its :class:`Impl`), which must be ``family``'s."""
    return _impl(impl, op).numbered(family, f"{op} implementation")


def _iterations_for(eps: float, target: float, step: Callable[[float], float], cap: int = 20) -> int:
    k = 0
    while eps > target and k < cap:
        eps = step(eps)
        k += 1
    return k


@functools.lru_cache(maxsize=256)
def _recip_linear(lo: float, hi: float) -> tuple[float, float, float]:
    """(alpha, beta, eps) of the minimax-relative linear guess y0 = alpha - beta x for 1/x on
    [lo, hi]: x y0 ranges over [1 - eps, 1 + eps]."""
    beta = 8.0 / ((lo + hi) ** 2 + 4.0 * lo * hi)
    return beta * (lo + hi), beta, 1.0 - beta * lo * hi


@functools.lru_cache(maxsize=256)
def _rsqrt_linear(lo: float, hi: float) -> tuple[float, float, float]:
    """(alpha, beta, eps) of a linear guess for x^-1/2 on [lo, hi]: the chord through the end
    points scaled so that x y0^2 spans [1 - eps, 1 + eps]."""
    if hi <= lo:
        return 1.0 / math.sqrt(lo), 0.0, 0.0
    slope = (hi**-0.5 - lo**-0.5) / (hi - lo)
    grid = np.linspace(lo, hi, 4097)
    chord = lo**-0.5 + slope * (grid - lo)
    top = float((grid * chord**2).max())
    c = math.sqrt(2.0 / (1.0 + top))
    return c * (lo**-0.5 - slope * lo), -c * slope, (top - 1.0) / (top + 1.0)


def _power_grid(lo: float, hi: float, f: int) -> tuple[int, int]:
    """Exponents (j_lo, j_hi) of power-of-two intervals [2^j, 2^(j+1)) covering [lo, hi]."""
    j_lo = max(-f, math.floor(math.log2(lo))) if lo > 0 else -f
    j_hi = max(j_lo, math.ceil(math.log2(hi)) - 1) if hi > 0 else j_lo
    return j_lo, j_hi


def _steps_guess(e: Engine, x: Secret, lo: float, hi: float, power: float, scale: int) -> Secret:
    """Guess c 2^(-power j) for x in [2^j, 2^(j+1)) covering [lo, hi] (c = (2/3)^power: x^power y0
    lies in [2/3, 4/3)), at ``scale``: one msb + one mul_bit = 10 rounds (none for one interval)."""
    values, tau = _steps_tables(e.frac_bits, lo, hi, power, scale)
    if tau is None:
        return e.add(e.mul(x, _t(0)), values[0])
    (neg,) = msb_many(e, [ge_bits(e, x, tau)])
    (y,), _ = step_function(e, e.bit_not(neg), [values])
    return y


@functools.lru_cache(maxsize=256)
def _steps_tables(f: int, lo: float, hi: float, power: float, scale: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(guess values, thresholds or None for one interval) of :func:`_steps_guess` (shared tensors)."""
    j_lo, j_hi = _power_grid(lo, hi, f)
    c = (2.0 / 3.0) ** power
    values = torch.tensor([round(c * 2.0 ** (scale - power * j)) for j in range(j_lo, j_hi + 1)], dtype=torch.int64)
    if j_hi == j_lo:
        return values, None
    return values, torch.tensor([1 << (f + j) for j in range(j_lo + 1, j_hi + 1)], dtype=torch.int64)


def _pick_guess(guess: str, eps_lin: float, eps_steps: float, target: float, step: Callable[[float], float]) -> str:
    if guess != "auto":
        return guess
    lin = 2 + 6 * _iterations_for(eps_lin, target, step)
    stp = 10 + 6 * _iterations_for(eps_steps, target, step)
    return "linear" if lin <= stp else "steps"


def _recip_newton(
    e: Engine,
    x: Secret,
    lo: float | None,
    hi: float | None,
    guess: str = "auto",
    iterations: int | None = None,
    out_scale: int | None = None,
) -> tuple[Secret, int]:
    """1/x by Newton-Raphson y <- y (2 - x y), y kept at an internal scale fy <= 30 chosen from the
    range for headroom. Returns (y, its scale): ``out_scale`` if given (folded into the last
    truncation), else fy. Each iteration: mul 1 + trunc 2 + mul 1 + trunc 2 = 6 rounds."""
    f = e.frac_bits
    target = 2.0 ** (1 - f)  # two ulps of relative error
    square = lambda v: v * v  # noqa: E731 - the relative error squares each step
    if lo is not None:
        lo = max(float(lo), 2.0**-f)  # x > 0: nothing below one ulp
    if guess == "auto":
        if lo is None or hi is None:
            guess = "exp"
        else:
            guess = _pick_guess(guess, _recip_linear(lo, hi)[2], 1.0 / 3.0, target, square)
    if guess == "exp":
        lo_eff = 2.0**-8 if lo is None else lo
        eps0 = 1.0
    elif lo is None or hi is None:
        raise ValueError(f"guess {guess!r} needs a range (lo, hi)")
    else:
        lo_eff = lo
        eps0 = _recip_linear(lo, hi)[2] if guess == "linear" else 1.0 / 3.0
    k = _iterations_for(eps0, target, square) if iterations is None else int(iterations)
    y_max = 2.0 / lo_eff if guess != "exp" else max(8.2, 1.0 / lo_eff)
    fy = max(f, min(30, math.floor((60 - math.log2(2.0 * y_max)) / 2)))
    if guess == "linear":
        alpha, beta, _ = _recip_linear(float(lo), float(hi))  # type: ignore[arg-type]
        y2 = e.sub(_t(int(ring_const(alpha, fy)) << f), e.mul(x, ring_const(beta, fy)))
        y = _rtrunc(e, y2, f)
    elif guess == "steps":
        y = _steps_guess(e, x, float(lo), float(hi), 1.0, fy)  # type: ignore[arg-type]
    elif guess == "exp":  # CrypTen: 3 exp(1 - 2x) + 0.003 (exp by the limit method, 8 iterations)
        u = exp_limit(e, e.sub(_t(1 << f), e.mul(x, _t(2))), 8, saturate=False, hi=1.0)
        y = e.mul(e.add(e.mul(u, _t(3)), ring_const(0.003, f)), _t(1 << (fy - f)))
    else:
        raise ValueError(f"unknown reciprocal guess {guess!r}")
    out = fy if out_scale is None else int(out_scale)
    if k == 0:
        return (_rtrunc(e, y, fy - out) if fy > out else y), out
    for i in range(k):
        p = _rtrunc(e, e.mul(x, y), f)  # x y at scale fy
        d = e.sub(_t(2 << fy), p)
        y = _rtrunc(e, e.mul(y, d), fy + (fy - out if i == k - 1 else 0))
    return y, out


def reciprocal(
    e: Engine,
    x: Secret,
    impl: str | Impl = "newton10",
    lo: float | None = None,
    hi: float | None = None,
    guess: str = "auto",
) -> Secret:
    """1/x for x > 0 (x <= 0 is outside the domain: garbage), "newton<k>": k Newton-Raphson
    iterations y <- y (2 - x y).

    Initial guess (``guess``): "exp" = CrypTen's 3 exp(1 - 2x) + 0.003 (limit method, 8
    iterations; valid for x in about [2^-8, 100] -- the limit method breaks down for 1 - 2x <
    -256); "linear" = minimax-relative alpha - beta x on [lo, hi] (relative error
    eps = 1 - 8 lo hi / ((lo + hi)^2 + 4 lo hi); valid for x in (0, lo + hi)); "steps" = threshold
    comparisons against powers of two in [lo, hi] giving (2/3) 2^-j on [2^j, 2^(j+1)) (eps = 1/3;
    valid for x < 1.5 * 2^ceil(log2 hi)). "auto": "exp" without a range, otherwise the cheaper in
    rounds of linear/steps. The relative error after k steps is eps^(2^k).
    Measured (f = 16): "newton10" with the exp guess: max |error| 8.6e-6 on [0.01, 100] (relative
    7.4e-5 on [0.01, 10], i.e. the ulp of y); "newton4" with lo = 1, hi = 10: 2.0e-5.
    Cost: guess (exp 24, linear 2, steps 10) + 6 rounds per iteration; newton10 = 84 rounds."""
    k = _impl_number(impl, "newton", "reciprocal")
    return _recip_newton(e, x, lo, hi, guess, k, e.frac_bits)[0]


def _inv_sqrt(
    e: Engine,
    x: Secret,
    lo: float,
    hi: float,
    iterations: int | None = None,
    guess: str = "auto",
    out_scale: int | None = None,
) -> tuple[Secret, Secret, int]:
    """(x^-1/2, x^1/2, their scale) by Newton's iteration for x^-1/2 in its coupled (Goldschmidt)
    form: g = x y0 ~ sqrt(x), h = y0 / 2; each step r = 1/2 - g h, then g += g r and h += h r with
    both products in ONE mul and ONE trunc. Every intermediate is well scaled (g h ~ 1/2, r -> 0),
    unlike y^2 in y (3 - x y^2) / 2, which loses its bits at fixed point when x is large.
    e = 1 - x y^2 evolves as (3e^2 + e^3) / 4, as for Newton.

    g, h are kept at an internal scale fy <= 30 chosen for headroom (g <= 1.2 sqrt(hi), h <= y_max);
    the result is at ``out_scale`` (default fy), folded into the last truncation.
    Cost: guess (linear 2, steps 10) + mul 1 + trunc 2 + 6 rounds per iteration."""
    f = e.frac_bits
    lo = max(float(lo), 2.0**-f)  # x > 0: nothing below one ulp
    target = 2.0 ** (2 - f)  # on e = 1 - x y^2, i.e. two ulps of relative error in y
    step = lambda v: (3 * v * v + v**3) / 4  # noqa: E731
    g_name = _pick_guess(guess, _rsqrt_linear(lo, hi)[2], 1.0 / 3.0, target, step)
    eps0 = _rsqrt_linear(lo, hi)[2] if g_name == "linear" else 1.0 / 3.0
    k = _iterations_for(eps0, target, step) if iterations is None else int(iterations)
    y_max = 1.2 / math.sqrt(max(lo, 2.0**-f)) * 1.5**k  # x below lo: y grows by <= 1.5 per step
    need = max(1.2 * math.sqrt(hi), y_max, 1.0)
    fy = max(f, min(30, math.floor((60 - math.log2(need)) / 2)))
    if g_name == "linear":
        alpha, beta, _ = _rsqrt_linear(lo, hi)
        y0 = _rtrunc(e, e.sub(_t(int(ring_const(alpha, fy)) << f), e.mul(x, ring_const(beta, fy))), f)
    elif g_name == "steps":
        y0 = _steps_guess(e, x, lo, hi, 0.5, fy)
    else:
        raise ValueError(f"unknown rsqrt guess {g_name!r}")
    out = fy if out_scale is None else min(int(out_scale), fy)
    if k == 0:
        return _rtrunc(e, y0, fy - out), _rtrunc(e, e.mul(x, y0), f + fy - out), out
    g = _rtrunc(e, e.mul(x, y0), f)  # scale fy
    h = y0  # y0 / 2 at scale fy + 1
    half = _t(1 << (2 * fy))  # 1/2 at scale 2fy + 1
    for i in range(k):
        r = _rtrunc(e, e.sub(half, e.mul(g, h)), fy + 1)  # scale fy
        gr, hr = mul_many(e, [(g, r), (h, r)])
        shift = fy + (fy - out if i == k - 1 else 0)
        rnd = _t(1 << (shift - 1))
        g, h = trunc_many(
            e, [e.add(e.add(e.mul(g, _t(1 << fy)), gr), rnd), e.add(e.add(e.mul(h, _t(1 << fy)), hr), rnd)], shift
        )
    return h, g, out  # h at scale out + 1 is y = 2h at scale out


_RSQRT_RANGE = (2.0**-12, 2.0**12)


def rsqrt(
    e: Engine,
    x: Secret,
    lo: float | None = None,
    hi: float | None = None,
    iterations: int | None = None,
    guess: str = "auto",
) -> Secret:
    """x^-1/2 for x in [lo, hi] (default [2^-12, 2^12]), Newton iterations from a range-derived
    guess: "linear" (chord, good for narrow ranges) or "steps" (powers of two: relative error of
    x y0^2 is 1/3 whatever the range); "auto" picks the cheaper in rounds. Iterations (default):
    enough for 2^-f relative. Below lo the result is too small (y grows by 1.5 per step);
    x <= 0 is outside the domain.
    Computed with :func:`_inv_sqrt` (the coupled form of Newton's iteration).
    Measured (f = 16, default range, steps guess, 3 iterations): |error| <= 1 ulp + 1.7e-5 y
    (relative 2.0e-5 for x <= 1).
    Cost: guess (2 or 10) + 3 + 6 rounds per iteration; default range: 10 + 3 + 18 = 31 rounds."""
    lo_, hi_ = _RSQRT_RANGE[0] if lo is None else lo, _RSQRT_RANGE[1] if hi is None else hi
    return _inv_sqrt(e, x, lo_, hi_, iterations, guess, e.frac_bits)[0]


def sqrt(
    e: Engine,
    x: Secret,
    impl: str | Impl = "newton_rsqrt",
    lo: float | None = None,
    hi: float | None = None,
    iterations: int | None = None,
    guess: str = "auto",
) -> Secret:
    """sqrt(x) for x >= 0 ("newton_rsqrt": the g = x y ~ sqrt(x) half of :func:`_inv_sqrt`'s
    coupled Newton iteration, so no extra product; range as :func:`rsqrt`, default
    [2^-12, 2^12]). For 0 <= x < lo the result tends to 0 (|error| <= sqrt(lo)).
    Measured (f = 16, default range): max relative error 2.1e-5 for x >= 1, absolute 1.9e-5
    below 1. Cost: 31 rounds with the default range (as rsqrt)."""
    impl = _impl(impl, "sqrt")
    if impl.name != "newton_rsqrt":
        raise KeyError(f"unknown sqrt implementation {impl.name!r}")
    lo_, hi_ = _RSQRT_RANGE[0] if lo is None else lo, _RSQRT_RANGE[1] if hi is None else hi
    return _inv_sqrt(e, x, lo_, hi_, iterations, guess, e.frac_bits)[1]


@functools.lru_cache(maxsize=16)
def _log_poly(degree: int) -> np.ndarray:
    return fit_chebyshev(np.log, 1.0, 2.0, degree)


def log(e: Engine, x: Secret, lo: float = 1.0, hi: float = 2.0, degree: int = 8) -> Secret:
    """ln x for x in [lo, hi] (x > 0): x = 2^k m with m in [1, 2), ln x = k ln 2 + ln m.

    k comes from ONE msb call against the powers of two inside (lo, hi]; ONE mul_bit call gives
    both 2^-k (public values at scale 40) and k ln 2; m = x 2^-k by one mul + trunc (kept at scale
    24 for the polynomial); ln m by a degree-``degree`` Chebyshev polynomial on [1, 2].
    Outside [lo, hi] the polynomial extrapolates (inaccurate). Measured (f = 16, degree 8):
    max |error| 1.5e-5 on [1, 1000].
    Cost: msb 8 + mul_bit 2 + mul 1 + trunc 2 + polynomial 11 = 24 rounds (13 if [lo, hi] lies
    in one octave: no comparisons, a local product)."""
    f = e.frac_bits
    j_lo, j_hi = _power_grid(lo, hi, f)
    p_scale, m_scale = 40, 24
    if j_hi > p_scale:
        raise ValueError(f"log range up to {hi} exceeds 2^{p_scale}")
    ks = list(range(j_lo, j_hi + 1))
    p_vals = torch.tensor([1 << (p_scale - k) for k in ks], dtype=torch.int64)
    l_vals = torch.tensor([round(k * LN2 * 2.0**f) for k in ks], dtype=torch.int64)
    if len(ks) == 1:
        m = e.mul(x, p_vals[0])
        k_ln2: Any = l_vals[0]
    else:
        tau = torch.tensor([1 << (f + k) for k in ks[1:]], dtype=torch.int64)  # k >= -f
        (neg,) = msb_many(e, [ge_bits(e, x, tau)])
        (p, k_ln2), _ = step_function(e, e.bit_not(neg), [p_vals, l_vals])
        m = e.mul(x, p)
    m = _rtrunc(e, m, f + p_scale - m_scale)
    return e.add(eval_poly(e, m, _log_poly(int(degree)), 1.0, 2.0, x_scale=m_scale), k_ln2)


# ---- softmax family -------------------------------------------------------------------------------
def _exp_nonpositive(e: Engine, z: Secret, exp_impl: str | Impl, saturate: bool, lo: float | None = None) -> Secret:
    """e^z for z <= 0 (logits minus their max) with the named exp implementation: "limit<n>",
    "exp2", or "fit<d>" (z clipped below at ``lo``, default -f ln 2, then a degree-d Chebyshev
    interpolant of e^z on [lo, 0]; see :func:`fitted`)."""
    exp_impl = _impl(exp_impl, "exp")
    if exp_impl.name == "exp2":
        return exp_steps(e, z, hi=0.0)
    if exp_impl.family == "fit":
        lo_ = -e.frac_bits * LN2 if lo is None else float(lo)
        return fitted(e, z, "exp", lo_, 0.0, _impl_number(exp_impl, "fit", "exp"), clip_hi=False)
    n = _impl_number(exp_impl, "limit", "exp")
    return exp_limit(e, z, n, saturate=saturate, hi=0.0)


def softmax(
    e: Engine,
    x: Secret,
    axis: int = -1,
    impl: str | Impl = "max_exp_recip",
    exp_impl: str | Impl | None = None,
    saturate: bool = False,
    iterations: int | None = None,
    hi: float | None = None,
    exp_lo: float | None = None,
    recip_lo: float | None = None,
    recip_hi: float | None = None,
) -> Secret:
    """softmax along ``axis`` (K = x.shape[axis] classes). Implementations:

    * "max_exp_recip": z = x - max (exact tree), e^z by ``exp_impl`` (default "limit8"), s = sum
      in [1, K], 1/s by Newton from the linear guess on [1, K] (iterations for 2^-f relative:
      4 for K = 10), y = e^z / s. Domain: logit spread max - min <= 2^n (n = 8: 256) unless
      ``saturate`` (+10 rounds: entries below -2^n become 0). Measured max |error| (K = 10,
      logits in [-10, 10]): 3.0e-3 (the limit method's error; use "exp2" for 4e-5).
      Cost K = 10: 40 + 24 + 26 + 3 = 93 rounds.
    * "crypten": CrypTen's defaults: same structure, exp limit8, reciprocal with 10 Newton
      iterations from 3 exp(1 - 2s) + 0.003 (needs K <= 128). Measured 3.0e-3. Cost K = 10:
      40 + 24 + 84 + 3 = 151 rounds.
    * "exp2": e^z by :func:`exp_steps` on [-f ln 2, 0] (threshold comparisons + degree-4
      polynomial; entries below -f ln 2 are exactly 0), then as "max_exp_recip". Measured 4.0e-5.
      Cost K = 10: 40 + 21 + 26 + 3 = 90 rounds.
    * "piranha": Piranha's approximation: e^z replaced by the clipped linear (z + 2) / 2 for
      z > -2, 0.001 otherwise, then normalised (the /2 cancels in the ratio, so it is not
      computed). Faithful to that formula within 1.6e-5; it is a coarse approximation of
      softmax (max |error| vs true softmax 0.28). Cost K = 10: 40 + 10 + (2 + 6k) + 3 = 79 rounds.
    * "secureml": relu(x) / sum relu(x) (SecureML), not shift-invariant; if every entry is <= 0
      (sum = 0) the output is uniform 1/K. 1/s by Newton from the threshold guess on
      [2^-f, ``hi``] (default 2^12), whose lowest threshold (one ulp) doubles as the zero test.
      Faithful to the formula within 1e-5 (vs true softmax: 0.68, a different function).
      Cost: 10 + 10 + 24 + 3 = 47 rounds.

    Tuning keywords (set per node by the approximation pass from calibration data):
    ``exp_impl`` "limit<n>" | "exp2" | "fit<d>" (degree-d Chebyshev of e^z on [``exp_lo``, 0],
    z clipped below at ``exp_lo``; 10 + :func:`poly_rounds` (d) rounds), ``iterations`` of
    Newton, and [``recip_lo``, ``recip_hi``] (default [1, K]): the range of the sum of e^z that
    the linear Newton guess is fitted on ("max_exp_recip", "exp2"; valid for sums below
    recip_lo + recip_hi).

    Returns y at scale f with x's shape.
    """
    impl = _impl(impl, "softmax")
    f = e.frac_bits
    ax = normalize_axis(axis, len(x.shape))
    k_cls = int(x.shape[ax])
    total = lambda v: e.local(lambda t: t.sum(dim=ax, keepdim=True), v)  # noqa: E731

    if impl.name == "secureml":
        return _secureml(e, x, ax, float(2**12 if hi is None else hi), iterations)

    z = e.sub(x, reduce_max(e, x, ax, keepdims=True))
    if impl.name in ("max_exp_recip", "exp2"):
        ez = _exp_nonpositive(e, z, exp_impl or ("exp2" if impl.name == "exp2" else "limit8"), saturate, exp_lo)
        r_lo = 1.0 if recip_lo is None else float(recip_lo)
        r_hi = float(k_cls) if recip_hi is None else float(recip_hi)
        y, sy = _recip_newton(e, total(ez), r_lo, max(r_hi, r_lo), "linear", iterations)
    elif impl.name == "crypten":
        ez = _exp_nonpositive(e, z, exp_impl or "limit8", saturate, exp_lo)
        y, sy = _recip_newton(e, total(ez), None, None, "exp", 10 if iterations is None else iterations)
    elif impl.name == "piranha":
        # 2 e^z ~ (z + 2) if z + 2 > 0 else 0.002 (Piranha: (z + 2) / 2, floor 0.001)
        zp = e.add(z, _t(2 << f))
        floor_ = int(ring_const(0.002, f))
        pos = e.bit_not(e.msb(zp))
        ez = e.add(e.mul_bit(e.sub(zp, _t(floor_)), pos), _t(floor_))
        y, sy = _recip_newton(e, total(ez), 2.0, 2.0 * k_cls, "linear", iterations)
    else:
        raise KeyError(f"unknown softmax implementation {impl.name!r}")
    return _rtrunc(e, e.mul(ez, y), sy)


def _secureml(e: Engine, x: Secret, ax: int, s_hi: float, iterations: int | None) -> Secret:
    """relu(x) / sum relu(x) along ``ax``; where the sum is 0, 1/K (uniform).

    The sum s is compared in ONE msb call against one ulp (the zero test, z = [s < 1 ulp]) and the
    powers of two 2^(j+1) of [2^-f, s_hi]; ONE mul_bit call gives the Newton guess 1/s (z: 1) and
    z-corrections: s' = s + z, numerator r + z / K. Then Newton on s' and one mul + trunc."""
    f = e.frac_bits
    k_cls = int(x.shape[ax])
    r = relu(e, x)
    s = e.local(lambda t: t.sum(dim=ax, keepdim=True), r)
    j_lo, j_hi = _power_grid(2.0**-f, s_hi, f)
    fy = max(f, min(30, (58 - f) // 2))  # y <= 2^f (s = 1 ulp) and y (2 - s y) < 2^61 at scale 2 fy
    guesses = [1.0] + [(2.0 / 3.0) * 2.0**-j for j in range(j_lo, j_hi + 1)]
    values = torch.tensor([round(v * 2.0**fy) for v in guesses], dtype=torch.int64)
    tau = torch.tensor([1] + [1 << (f + j) for j in range(j_lo + 1, j_hi + 1)], dtype=torch.int64)
    (neg,) = msb_many(e, [ge_bits(e, s, tau)])
    ge = e.bit_not(neg)
    nonzero = e.bit_local(lambda t: t[0], ge)
    one, share = _t(1 << f), ring_const(1.0 / k_cls, f)
    (y,), (n1, nk) = step_function(e, ge, [values], [(one, nonzero), (share, nonzero)])
    s_fix = e.add(s, e.sub(one, n1))  # s + [s == 0]
    num = e.add(r, e.sub(share, nk))  # r + [s == 0] / K
    k = _iterations_for(1.0 / 3.0, 2.0 ** (1 - f), lambda v: v * v) if iterations is None else int(iterations)
    for _ in range(k):
        p = _rtrunc(e, e.mul(s_fix, y), f)
        y = _rtrunc(e, e.mul(y, e.sub(_t(2 << fy), p)), fy)
    return _rtrunc(e, e.mul(num, y), fy)


def log_softmax(
    e: Engine,
    x: Secret,
    axis: int = -1,
    impl: str | Impl = "max_exp_log",
    exp_impl: str | Impl = "limit8",
    saturate: bool = False,
    degree: int = 8,
) -> Secret:
    """log softmax along ``axis``: z - ln(sum e^z), z = x - max ("max_exp_log").

    e^z by ``exp_impl`` ("limit8" default, or "exp2"), the sum s lies in [1, K], ln s by
    :func:`log` on [1, K] (thresholds at powers of two + degree-8 polynomial). Domain as
    :func:`softmax`. Measured max |error| (K = 10, logits in [-10, 10]): limit8 3.9e-3, exp2 5.3e-5.
    Cost K = 10: 40 + 24 + 24 = 88 rounds (exp2: 85)."""
    impl = _impl(impl, "log_softmax")
    if impl.name != "max_exp_log":
        raise KeyError(f"unknown log_softmax implementation {impl.name!r}")
    ax = normalize_axis(axis, len(x.shape))
    k_cls = int(x.shape[ax])
    z = e.sub(x, reduce_max(e, x, ax, keepdims=True))
    s = e.local(lambda t: t.sum(dim=ax, keepdim=True), _exp_nonpositive(e, z, exp_impl, saturate))
    return e.sub(z, log(e, s, 1.0, float(max(k_cls, 2)), degree))


# ---- sigmoid, tanh, erf, gelu, softplus -----------------------------------------------------------
def _gelu_tanh_gate(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


#: Targets of the clipped Chebyshev fits: (function, symmetric range [-B, B] or half range [0, B],
#: limit at +infinity used for the saturation error).
_TARGETS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool, float]] = {
    "sigmoid": (_expit_np, True, 1.0),
    "tanh": (np.tanh, True, 1.0),
    "erf": (_erf_np, True, 1.0),
    "gelu_gate": (_ndtr_np, True, 1.0),  # Phi(x) = (1 + erf(x / sqrt 2)) / 2
    "gelu_tanh_gate": (_gelu_tanh_gate, True, 1.0),
    "gelu_rest": (lambda a: -a * _ndtr_np(-a), False, 0.0),  # gelu(x) - relu(x) at a = |x|
    "gelu_tanh_rest": (lambda a: -a * _gelu_tanh_gate(-a), False, 0.0),
    "softplus_rest": (lambda a: np.log1p(np.exp(-a)), False, 0.0),  # softplus(x) - relu(x)
}


@functools.lru_cache(maxsize=128)
def _clipped_fit(name: str, degree: int) -> tuple[float, np.ndarray]:
    """(B, coefficients): the clip bound B minimising max(fit error on the range, saturation error
    |fn(inf) - fn(B)|) over a grid of candidates, and the Chebyshev fit on [-B, B] or [0, B]."""
    fn, symmetric, limit = _TARGETS[name]
    best: tuple[float, float, np.ndarray] | None = None
    for b in np.arange(1.0, 16.01, 0.25):
        lo = -b if symmetric else 0.0
        coef = fit_chebyshev(fn, lo, b, degree)
        grid = np.linspace(lo, b, 4001)
        fit_err = float(np.abs(np.polynomial.chebyshev.chebval((2 * grid - lo - b) / (b - lo), coef) - fn(grid)).max())
        err = max(fit_err, abs(limit - float(fn(np.array([b]))[0])))
        if best is None or err < best[0]:
            best = (err, float(b), coef)
    assert best is not None
    return best[1], best[2]


def _chebyshev_clipped(e: Engine, x: Secret, name: str, degree: int) -> Secret:
    """fn(clip(x, -B, B)) by a Chebyshev polynomial (B from :func:`_clipped_fit`).
    Cost: clip 10 + polynomial."""
    f = e.frac_bits
    b, coef = _clipped_fit(name, degree)
    b_ring = int(ring_const(b, f))
    return eval_poly(e, _clip_ring(e, x, -b_ring, b_ring), coef, -b, b)


def _relu_plus_even(e: Engine, x: Secret, name: str, degree: int) -> Secret:
    """relu(x) + g(min(|x|, B)) with g a Chebyshev fit on [0, B] (g(B) ~ 0): the sign, |x| and
    the clip share ONE msb and ONE mul_bit call. Cost: 10 + polynomial rounds."""
    f = e.frac_bits
    b, coef = _clipped_fit(name, degree)
    a, relu_x, _ = _sign_split(e, x, int(ring_const(b, f)))
    return e.add(relu_x, eval_poly(e, a, coef, 0.0, b))


def _cheb_degree(impl: Impl, op: str, default: int) -> int:
    return default if impl.name == "chebyshev" else _impl_number(impl, "chebyshev", op)


def sigmoid(
    e: Engine, x: Secret, impl: str | Impl = "exp_recip", exp_impl: str | Impl = "limit8", iterations: int | None = None
) -> Secret:
    """1 / (1 + e^-x). Implementations:

    * "exp_recip" (CrypTen-style): a = min(|x|, 2^n) and the sign from ONE msb + ONE mul_bit;
      u = e^-a by ``exp_impl`` ("limit8" default, or "exp2"); r = 1 / (1 + u) with 1 + u in [1, 2]
      by Newton from the linear guess (2 iterations); sigma = r for x >= 0, 1 - r otherwise (one
      mul with the arithmetic sign bit). Measured max |error| (f = 16, x in [-300, 300]):
      limit8 8.7e-4, exp2 2.6e-5. Cost: 10 + 24 + 14 + 1 = 49 rounds (exp2: 46).
    * "chebyshev<d>": clip to [-B, B] (B chosen per degree to balance fit and saturation error)
      and a degree-d Chebyshev polynomial ("chebyshev" = 32). Measured: d = 16 (B = 7): 1.0e-3,
      d = 24 (B = 8.75): 2.0e-4, d = 32 (B = 10): 5.4e-5.
      Cost: 10 + 3 ceil(log2 d) + 2 rounds (d = 32: 27).
    """
    impl = _impl(impl, "sigmoid")
    exp_impl = _impl(exp_impl, "exp")
    f = e.frac_bits
    if impl.name != "exp_recip":
        return _chebyshev_clipped(e, x, "sigmoid", _cheb_degree(impl, "sigmoid", 32))
    bound = None if exp_impl.name == "exp2" else 1 << (f + _impl_number(exp_impl, "limit", "exp"))
    a, _, sign = _sign_split(e, x, bound, want_sign=True)
    u = _exp_nonpositive(e, e.neg(a), exp_impl, saturate=False)
    r, _ = _recip_newton(e, e.add(u, _t(1 << f)), 1.0, 2.0, "linear", iterations, f)
    return e.add(r, e.mul(sign, e.sub(_t(1 << f), e.mul(r, _t(2)))))


def tanh(e: Engine, x: Secret, impl: str | Impl = "sigmoid", **params: Any) -> Secret:
    """tanh x. "sigmoid": 2 sigma(2x) - 1 with :func:`sigmoid` "exp_recip" (params passed on);
    error twice sigmoid's (measured 1.7e-3 with limit8, 5.1e-5 with exp2); 49 rounds.
    "chebyshev<d>": clipped Chebyshev (measured d = 16 (B = 3.5): 2.1e-3, d = 32 (B = 5): 1.1e-4;
    27 rounds)."""
    impl = _impl(impl, "tanh")
    f = e.frac_bits
    if impl.name == "sigmoid":
        s = sigmoid(e, e.mul(x, _t(2)), "exp_recip", **params)
        return e.sub(e.mul(s, _t(2)), _t(1 << f))
    return _chebyshev_clipped(e, x, "tanh", _cheb_degree(impl, "tanh", 32))


def erf(e: Engine, x: Secret, impl: str | Impl = "chebyshev") -> Secret:
    """erf x by a Chebyshev polynomial of degree d ("chebyshev<d>", "chebyshev" = 24) on the clipped
    range [-B, B] (B chosen per degree; saturates to +-erf(B) ~ +-1 outside).
    Measured max |error| (f = 16): d = 16 (B = 2.75): 1.2e-4, d = 24 (B = 3.5): 9.2e-6,
    d = 32 (B = 4): 7.7e-6.
    Cost: clip 10 + 3 ceil(log2 d) + 2 = 27 rounds for d = 24 or 32."""
    impl = _impl(impl, "erf")
    return _chebyshev_clipped(e, x, "erf", _cheb_degree(impl, "erf", 24))


def gelu(e: Engine, x: Secret, approximate: str = "none", impl: str | Impl = "erf", **params: Any) -> Secret:
    """GELU x Phi(x) (``approximate`` = "none") or its tanh form 0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3))) ("tanh"); each implementation computes the form ``approximate`` asks for.

    * "erf": x * gate(clip(x)), the gate (Phi, or the tanh form's gate) by one clipped Chebyshev
      polynomial of degree 24 (Phi = (1 + erf(x / sqrt 2)) / 2: erf's fit with the 1/sqrt 2
      folded in), then one mul + trunc. Measured max |error| on [-8, 8]: 3.4e-5 (grows like
      |x| * gate error for large |x|). Cost: 10 + 17 + 3 = 30 rounds.
    * "tanh": the tanh form computed literally: u = sqrt(2/pi) (x + 0.044715 x^3) (x^2 and x^3:
      two mul+trunc levels), 0.5 (1 + tanh u) = sigma(2u) by :func:`sigmoid` "exp_recip"
      (``params`` passed on), times x. Measured (tanh-form target, limit8) 1.3e-3 on [-8, 8].
      Cost: 8 + 49 + 3 = 60 rounds.
    * "chebyshev<d>" (default d = 16): relu(x) + g(|x|) with g(a) = -a gate(-a) (smooth, even,
      -> 0), clipped at B: the sign, |x| and the clip share one msb + one mul_bit. Measured
      d = 12: 1.5e-5, d = 16: 7.7e-6 on [-8, 8] (relu beyond B). Cost: 10 + 14 = 24 rounds.
    """
    impl = _impl(impl, "gelu")
    f = e.frac_bits
    tanh_form = approximate == "tanh"
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate={approximate!r}")
    if impl.name == "erf":
        gate = _chebyshev_clipped(e, x, "gelu_tanh_gate" if tanh_form else "gelu_gate", 24)
        return _rtrunc(e, e.mul(x, gate), f)
    if impl.name == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = _rtrunc(e, e.mul(x, x), f)
        inner = _rtrunc(e, e.add(e.mul(x2, ring_const(0.044715 * c, f)), _t(int(ring_const(c, f)) << f)), f)
        u2 = e.mul(_rtrunc(e, e.mul(x, inner), f), _t(2))  # 2u
        return _rtrunc(e, e.mul(x, sigmoid(e, u2, "exp_recip", **params)), f)
    return _relu_plus_even(e, x, "gelu_tanh_rest" if tanh_form else "gelu_rest", _cheb_degree(impl, "gelu", 16))


def softplus(e: Engine, x: Secret, impl: str | Impl = "exp_log", exp_impl: str | Impl = "limit8") -> Secret:
    """log(1 + e^x) = relu(x) + log(1 + e^-|x|). The sign, |x| and its clip share one msb +
    one mul_bit (10 rounds); then:

    * "exp_log": u = e^-a by ``exp_impl`` (a = min(|x|, 2^n)), ln(1 + u) with 1 + u in [1, 2] by
      the degree-8 polynomial of :func:`log` (no comparisons). Measured max |error| on
      [-30, 30]: limit8 9.5e-4, exp2 1.5e-5. Cost: 10 + 24 + 13 = 47 rounds (exp2: 44).
    * "chebyshev<d>" (default 16): g(a) = log(1 + e^-a) by a Chebyshev polynomial on [0, B]
      (B chosen per degree: 14.75 for d = 16). Measured d = 12: 2.6e-5, d = 16: 9.2e-6.
      Cost: 10 + 14 = 24 rounds.
    """
    impl = _impl(impl, "softplus")
    exp_impl = _impl(exp_impl, "exp")
    f = e.frac_bits
    if impl.name != "exp_log":
        return _relu_plus_even(e, x, "softplus_rest", _cheb_degree(impl, "softplus", 16))
    bound = None if exp_impl.name == "exp2" else 1 << (f + _impl_number(exp_impl, "limit", "exp"))
    a, relu_x, _ = _sign_split(e, x, bound)
    u = _exp_nonpositive(e, e.neg(a), exp_impl, saturate=False)
    return e.add(relu_x, log(e, e.add(u, _t(1 << f)), 1.0, 2.0))


# ---- normalisation --------------------------------------------------------------------------------
def layer_norm(
    e: Engine,
    x: Secret,
    scale: Any = None,
    bias: Any = None,
    axis: int = -1,
    epsilon: float = 1e-5,
    impl: str | Impl = "newton_rsqrt",
    lo: float = 0.0,
    hi: float = 16384.0,
    iterations: int | None = None,
    guess: str = "auto",
) -> Secret:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the axes >= ``axis`` (N elements);
    ``scale``/``bias`` secret or public, at scale f, broadcastable. The variance must lie in
    [``lo``, ``hi``] (default [0, 2^14]).

    d = x - S/N with 1/N at scale 24 (one trunc); [d*d, d*scale] in one mul; W = sum d^2 + N eps and
    d*scale in one trunc; r = W^-1/2 by :func:`_inv_sqrt` (guess from W in [N (lo + eps),
    N (hi + eps)]); out = (d scale) r sqrt(N) (sqrt(N) folded into the last truncation) + bias.
    Requires |x| < 2^21 and |out| < 2^8 at f = 16 for headroom.
    Measured max |error| (f = 16, N = 64, x ~ N(0, 3.6^2), scale in [0.5, 1.5]): 4.5e-5. The mean
    is rounded to 0.5 ulp, so rows with a tiny standard deviation sigma see up to about
    0.75 ulp * |scale| / sigma more (5e-4 at sigma = 0.03).
    Cost: trunc 2 + mul 1 + trunc 2 + inverse sqrt (10 + 3 + 6k) + mul 1 + trunc 2:
    8 + 31 = 39 rounds with the default range (steps guess, k = 3)."""
    impl = _impl(impl, "layer_norm")
    if impl.name != "newton_rsqrt":
        raise KeyError(f"unknown layer_norm implementation {impl.name!r}")
    f = e.frac_bits
    nd = len(x.shape)
    ax = normalize_axis(axis, nd)
    dims = tuple(range(ax, nd))
    n = int(math.prod(int(s) for s in x.shape[ax:]))
    c = 24
    s = e.local(lambda t: t.sum(dim=dims, keepdim=True), x)
    d = _rtrunc(e, e.sub(e.mul(x, _t(1 << c)), e.mul(s, ring_const(1.0 / n, c))), c)
    if scale is None:
        (dd,) = mul_many(e, [(d, d)])
        dg2: Any = e.mul(d, _t(1 << f))
    else:
        dd, dg2 = mul_many(e, [(d, d), (d, scale)])
    w2 = e.add(e.local(lambda t: t.sum(dim=dims, keepdim=True), dd), ring_const(n * epsilon, 2 * f))
    w, dg = trunc_many(e, [e.add(w2, _t(1 << (f - 1))), e.add(dg2, _t(1 << (f - 1)))], f)
    r, _, sr = _inv_sqrt(e, w, n * (lo + epsilon), n * (hi + epsilon), iterations, guess, out_scale=24)
    c4 = max(0, min(16, 61 - f - sr - 8))
    out = _rtrunc(e, e.mul(e.mul(dg, r), ring_const(math.sqrt(n), c4)), sr + c4)
    return out if bias is None else e.add(out, bias)


_LRN_ROOTS = {0.25: (0, 1), 0.5: (1, 0), 0.75: (1, 1), 1.0: (2, 0)}


def lrn(
    e: Engine,
    x: Secret,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    bias: float = 1.0,
    impl: str | Impl = "newton",
    lo: float | None = None,
    hi: float | None = None,
) -> Secret:
    """ONNX LRN across channels of x (N, C, ...): x / (bias + alpha / size * sum of squares over
    the ``size`` channels around c) ^ beta. The denominator must lie in [lo, hi] (default
    [bias, bias + 16]).

    x^2 (mul + trunc), the channel window sum share-wise (zero pad + shifted slices), the
    denominator D with alpha / size at high precision (one trunc), then D^-beta:

    * "newton" for beta in {0.25, 0.5, 0.75, 1}: r = D^-1/2 by Newton (guess from [lo, hi]);
      beta = 0.75: [D r, x r] in one mul + trunc, q = rsqrt(D r) = D^-1/4, y = (x r) q; other
      betas alike (D^-1 = r r). Both inverse square roots use :func:`_inv_sqrt`, whose second
      output is D^1/2 for free. Measured max |error| (|x| <= 20, alpha = 1e-4, bias = 2,
      size 5): beta = 0.75: 7.7e-5, 0.5: 2.8e-5, 1: 4.1e-5, 0.25: 5.3e-5.
      Cost (beta = 0.75): x^2 3 + D 2 + inverse sqrt + 3 + inverse sqrt + 3: 39 rounds with
      [lo, hi] = [2, 3], 63 with the default range.
    * "chebyshev<d>": D^-beta by a Chebyshev polynomial on the clipped [lo, hi] (any beta), then
      one mul + trunc. Cost: 5 + 10 + 3 ceil(log2 d) + 2 + 3 rounds.
    """
    impl = _impl(impl, "lrn")
    f = e.frac_bits
    lo_ = float(bias) if lo is None else float(lo)
    hi_ = float(bias) + 16.0 if hi is None else float(hi)
    ch = int(x.shape[1])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = _rtrunc(e, e.mul(x, x), f)

    def window(t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(t.transpose(1, -1), (before, after)).transpose(1, -1)
        return sum(padded.narrow(1, k, ch) for k in range(size))  # type: ignore[return-value]

    ss = e.local(window, sq)
    c = max(f, min(40, 60 - f - math.ceil(math.log2(max(hi_, 2.0)))))
    den = _rtrunc(e, e.add(e.mul(ss, ring_const(alpha / size, c)), _t(int(ring_const(bias, f)) << c)), c)
    if impl.name != "newton":
        degree = _cheb_degree(impl, "lrn", 8)
        coef = fit_chebyshev(lambda v: v ** (-beta), lo_, hi_, degree)
        dc = _clip_ring(e, den, int(ring_const(lo_, f)), int(ring_const(hi_, f)))
        return _rtrunc(e, e.mul(x, eval_poly(e, dc, coef, lo_, hi_)), f)
    if float(beta) not in _LRN_ROOTS:
        raise NotImplementedError(f"lrn 'newton' supports beta in {sorted(_LRN_ROOTS)}; use 'chebyshev<d>'")
    halves, quarters = _LRN_ROOTS[float(beta)]
    r, root, sr = _inv_sqrt(e, den, lo_, hi_, out_scale=24)  # D^-1/2, D^1/2
    y: Secret = x
    if quarters:  # D^-1/4 = rsqrt(D^1/2); x D^-1/2 shares the truncation of D^1/2 to scale f
        if halves:
            y, root = trunc_many(e, [e.mul(x, r), root], [sr, sr - f])
            halves -= 1
        else:
            root = _rtrunc(e, root, sr - f)
        q, _, sq_ = _inv_sqrt(e, root, math.sqrt(lo_), math.sqrt(hi_), out_scale=24)
        y = _rtrunc(e, e.mul(y, q), sq_)
    for _ in range(halves):
        y = _rtrunc(e, e.mul(y, r), sr)
    return y


# ---- range-fitted polynomials (chosen per node by the approximation pass) --------------------------
def _relu_np(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


#: Functions a "fit<d>" implementation interpolates, by op.
FIT_TARGETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "sigmoid": _expit_np,
    "tanh": np.tanh,
    "erf": _erf_np,
    "relu": _relu_np,
}

#: The range [lo, hi] a "fit<d>" implementation is fitted on when the plan gives none (a plan
#: compiled without calibration data). Inputs outside are clipped to it.
FIT_DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "exp": (-16.0, 4.0),
    "sigmoid": (-8.0, 8.0),
    "tanh": (-4.0, 4.0),
    "erf": (-3.5, 3.5),
    "relu": (-8.0, 8.0),
}


@functools.lru_cache(maxsize=512)
def fitted_coefficients(op: str, lo: float, hi: float, degree: int) -> np.ndarray:
    """Chebyshev coefficients (variable t in [-1, 1] over [lo, hi]) of :data:`FIT_TARGETS` [op]."""
    return fit_chebyshev(FIT_TARGETS[op], float(lo), float(hi), int(degree))


def fitted_reference(op: str, x: np.ndarray, lo: float, hi: float, degree: int) -> np.ndarray:
    """What :func:`fitted` computes, in float64: the interpolant at clip(x, lo, hi)."""
    t = (2.0 * np.clip(x, lo, hi) - lo - hi) / (hi - lo)
    return np.polynomial.chebyshev.chebval(t, fitted_coefficients(op, lo, hi, degree))


def fitted(
    e: Engine,
    x: Secret,
    op: str,
    lo: float | None = None,
    hi: float | None = None,
    degree: int = 8,
    clip_lo: bool = True,
    clip_hi: bool = True,
) -> Secret:
    """fn(clip(x, lo, hi)) for fn = :data:`FIT_TARGETS` [op], by its degree-``degree`` Chebyshev
    interpolant on [lo, hi] (default :data:`FIT_DEFAULT_RANGES` [op]).

    Out-of-range inputs are clipped to the range first (both bounds in ONE msb call), so they get
    fn(lo) or fn(hi): exp saturates at e^hi and at e^lo (about 0 for a calibrated softmax), sigmoid,
    tanh and erf at their values at the range's ends, relu becomes min(max(x, 0), hi) above hi.
    ``clip_lo``/``clip_hi`` = False drops a bound the caller guarantees (softmax: z <= 0).
    The error on the range is the interpolation error (checked against numpy in
    tests/runtime/test_fits.py) plus about 2 ulp of fixed point.
    Cost: clip 10 (0 with no bound) + :func:`poly_rounds` (degree) rounds."""
    f = e.frac_bits
    d_lo, d_hi = FIT_DEFAULT_RANGES[op]
    lo_ = d_lo if lo is None else float(lo)
    hi_ = d_hi if hi is None else float(hi)
    if not hi_ > lo_:
        raise ValueError(f"{op} fit range [{lo_}, {hi_}] is empty")
    xc = _clip_ring(e, x, int(ring_const(lo_, f)) if clip_lo else None, int(ring_const(hi_, f)) if clip_hi else None)
    return eval_poly(e, xc, fitted_coefficients(op, lo_, hi_, int(degree)), lo_, hi_)


def _with_fit(op: str, degree: int) -> Callable[..., Secret]:
    def run(e: Engine, x: Secret, lo: float | None = None, hi: float | None = None, **attrs: Any) -> Secret:
        return fitted(e, x, op, lo, hi, degree)

    run.__name__ = f"fitted[{op}, {degree}]"
    run.__doc__ = fitted.__doc__
    return run


# ---- registry -------------------------------------------------------------------------------------
Kernel = Callable[..., Secret]


def _with_impl(fn: Callable[..., Secret], impl: str, **fixed: Any) -> Kernel:
    def run(e: Engine, *inputs: Any, **attrs: Any) -> Secret:
        return fn(e, *inputs, impl=impl, **fixed, **attrs)

    run.__name__ = f"{fn.__name__}[{impl}]"
    run.__doc__ = fn.__doc__
    return run


def _plain(fn: Callable[..., Secret], drop: Sequence[str] = ()) -> Kernel:
    def run(e: Engine, *inputs: Any, **attrs: Any) -> Secret:
        return fn(e, *inputs, **{k: v for k, v in attrs.items() if k not in drop})

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


IMPLEMENTATIONS: dict[str, dict[str, Kernel]] = {}
DESCRIPTIONS: dict[str, dict[str, str]] = {}


def _register(op: str, impl: str, fn: Kernel, description: str) -> None:
    IMPLEMENTATIONS.setdefault(op, {})[impl] = fn
    DESCRIPTIONS.setdefault(op, {})[impl] = description


def _build(op: str, impl: Impl) -> tuple[Kernel, str] | None:
    """The callable and description for a numbered implementation (:data:`siguard.compiler.impl.NUMBERED`),
    or None."""
    if impl.number is None:
        return None
    family, num, impl = impl.family, impl.number, impl.name
    if family == "fit" and op in FIT_TARGETS and num >= 1:
        return _with_fit(op, num), (
            f"clip to the fitted range [lo, hi] + degree-{num} Chebyshev interpolant"
        )
    if op == "exp" and family == "limit" and num >= 1:
        return _with_impl(exp, impl), f"(1 + x/2^{num})^(2^{num}), clipped to [-2^{num}, 19.4]"
    if op == "reciprocal" and family == "newton" and num >= 0:
        return _with_impl(reciprocal, impl), f"{num} Newton iterations; guess exp (CrypTen) or from lo/hi"
    if family == "chebyshev" and num >= 2:
        if op in ("sigmoid", "tanh", "erf"):
            return _with_impl({"sigmoid": sigmoid, "tanh": tanh, "erf": erf}[op], impl), (
                f"clip to [-B, B] + degree-{num} Chebyshev"
            )
        if op in ("gelu", "softplus"):
            return _with_impl({"gelu": gelu, "softplus": softplus}[op], impl), (
                f"relu(x) + degree-{num} Chebyshev of the even remainder at min(|x|, B)"
            )
        if op == "lrn":
            return _with_impl(lrn, impl), f"D^-beta by clipped degree-{num} Chebyshev"
    return None


def describe(op: str, impl: str | Impl, shape: Sequence[int] = (2, 10), **attrs: Any) -> str:
    """``impl``'s description and its round count on a secret of ``shape`` (the last axis is a softmax's K),
    with the op's ``attrs``. The count is what the cost engine measures running the implementation, never a
    number written by hand (the tests check the cost engine against the transport's counts)."""
    impl = Impl.parse(impl, op)
    rounds = measured_rounds(op, impl, shape, **attrs)
    return f"{DESCRIPTIONS[op][impl.name]}; {rounds} rounds on a {tuple(shape)} secret"


def measured_rounds(op: str, impl: str | Impl, shape: Sequence[int] = (2, 10), **attrs: Any) -> int:
    """The rounds of (op, impl) on a secret of ``shape`` with the op's ``attrs`` (and ``impl``'s tuning), as
    the cost engine measures them running the implementation: the one source of an implementation's rounds."""
    impl = Impl.parse(impl, op)
    engine = CostEngine(16)
    secret = MetaShares(torch.empty(tuple(shape), dtype=torch.int64, device="meta"))
    get_implementation(op, impl)(engine, secret, **{**attrs, **impl.param_dict})
    return int(engine.total["rounds"])


def get_implementation(op: str, impl: str | Impl) -> Kernel:
    """The callable for (op, impl) -- ``impl`` a name or an :class:`Impl` (its tuning is the caller's to pass) --
    resolving numbered names not pre-registered."""
    name = impl.name if isinstance(impl, Impl) else impl
    fn = IMPLEMENTATIONS.get(op, {}).get(name)
    if fn is not None:
        return fn
    try:
        built = _build(op, Impl.parse(impl, op))
    except ValueError:
        built = None
    if built is None:
        raise KeyError(f"op {op!r} has no implementation {name!r} (known: {sorted(IMPLEMENTATIONS.get(op, {}))})")
    _register(op, name, *built)
    return built[0]


def _populate() -> None:
    exact = "exact"
    _register("relu", exact, _plain(relu), "x * NOT msb(x); exact")
    _register("leaky_relu", exact, _plain(leaky_relu), "x*A + mul_bit(x*(1-A), x>=0), one trunc")
    _register("prelu", exact, _plain(prelu), "relu + trunc(slope * (x - relu))")
    _register("clip", exact, _plain(clip), "both comparisons in one msb, one mul_bit; exact")
    _register("hard_sigmoid", exact, _plain(hard_sigmoid), "affine (one trunc) + exact clip to [0, 1]")
    _register("hard_swish", exact, _plain(hard_swish), "x * hard_sigmoid(x): one clip, one product")
    _register("reduce_max", "tree", _plain(reduce_max_axes), "comparison tree over the reduced axes")
    _register("maxpool", "tree", _plain(maxpool2d), "comparison tree over the window")
    _register("max", "tree", _plain(reduce_max), "comparison tree")
    _register("argmax", "tree", _plain(argmax_onehot), "tree carrying one-hot masks, ties to first")
    for n in range(4, 11):
        _register("exp", f"limit{n}", *_build("exp", Impl.parse(f"limit{n}")))  # type: ignore[misc]
    _register("exp", "exp2", _with_impl(exp, "exp2"), "thresholds at k ln 2 + degree-4 Chebyshev of e^r")
    for k in range(1, 13):
        _register("reciprocal", f"newton{k}", *_build("reciprocal", Impl.parse(f"newton{k}")))  # type: ignore[misc]
    _register(
        "sqrt",
        "newton_rsqrt",
        _with_impl(sqrt, "newton_rsqrt"),
        "coupled Newton for x^-1/2, sqrt(x) as its g half",
    )
    for name, desc in [
        ("max_exp_recip", "exact max, exp limit8, Newton reciprocal on [1, K] (linear guess)"),
        ("crypten", "exact max, exp limit8, 10 Newton iterations from 3exp(1-2x)+0.003"),
        ("exp2", "exact max, exp by thresholds + polynomial, Newton on [1, K]"),
        ("piranha", "exact max, clipped linear (z+2)/2 or 0.001, Newton on [2, 2K]"),
        ("secureml", "relu / sum relu, uniform if the sum is 0; threshold guess + 4 Newton"),
    ]:
        _register("softmax", name, _with_impl(softmax, name), desc)
    _register(
        "log_softmax",
        "max_exp_log",
        _with_impl(log_softmax, "max_exp_log"),
        "z - ln(sum e^z): exp limit8, log by thresholds + degree-8 Chebyshev",
    )
    _register(
        "sigmoid", "exp_recip", _with_impl(sigmoid, "exp_recip"), "1/(1+e^-|x|) (limit8, 2 Newton) + sign"
    )
    _register("tanh", "sigmoid", _with_impl(tanh, "sigmoid"), "2 sigmoid(2x) - 1")
    _register("erf", "chebyshev", _with_impl(erf, "chebyshev"), "clip to [-B, B] + degree-24 Chebyshev")
    _register("gelu", "erf", _with_impl(gelu, "erf"), "x * Phi(x), Phi by clipped degree-24 Chebyshev")
    _register("gelu", "tanh", _with_impl(gelu, "tanh"), "0.5x(1+tanh(u)) = x sigmoid(2u), u cubic")
    _register(
        "softplus", "exp_log", _with_impl(softplus, "exp_log"), "relu(x) + ln(1 + e^-|x|), limit8 + log poly"
    )
    _register(
        "layer_norm",
        "newton_rsqrt",
        _with_impl(layer_norm, "newton_rsqrt"),
        "mean, variance, coupled-Newton inverse sqrt",
    )
    _register("lrn", "newton", _with_impl(lrn, "newton"), "sum of squares, D^-beta by inverse sqrts")
    defaults = {"sigmoid": (sigmoid, 32), "tanh": (tanh, 32), "gelu": (gelu, 16), "softplus": (softplus, 16)}
    for op, (fn, d) in {**defaults, "lrn": (lrn, 8)}.items():
        _register(op, "chebyshev", _with_impl(fn, "chebyshev"), f"as chebyshev{d}")
    for op in ("sigmoid", "tanh", "erf", "gelu", "softplus", "lrn"):
        for d in (8, 12, 16, 20, 24, 32):
            _register(op, f"chebyshev{d}", *_build(op, Impl.parse(f"chebyshev{d}")))  # type: ignore[misc]


_populate()
