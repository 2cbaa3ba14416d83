"""The SIGuard guard on secret shares: MemGuard's noise search with fixed iteration counts.

Written once against :class:`siguard.runtime.kernels.engine.Engine` (so the fixed-point reference, the secure
parties and the cost model run the same code) from the existing building blocks only: softmax,
argmax, comparisons (msb), bit selections (mul_bit), products, truncation, polynomials and the
Newton inverse square root. The float64 oracle of the same algorithm is
:func:`siguard.privacy.memguard.guard_reference`.

Algorithm (per query; z logits in R^k, h the defender MLP k -> 128 -> 64 -> 1, h > 0 = member)::

    p = softmax(z); l = onehot(argmax z); a0 = h(p); q = p; q* = p; accepted = 0
    for r in 1..R:                                   # rounds
        q = p                                        # fresh noise e = 0
        for t in 1..T+1:                             # T gradient steps, then one more evaluation
            a = h(q)                                 # keeps the ReLU masks d1, d2 for the backward pass
            viol_j = [q_j > q_l]; kept = AND_j not viol_j          (softmax is monotone in u = z + e)
            valid = sign: [sign a != sign a0]  |  margin: [|a| <= margin]
            freeze: newly = kept & valid & not accepted   (every t)   paper: newly = kept & valid (t = T+1)
            q* = newly ? q : q*;  accepted |= newly;  found |= newly
            if t == T+1: break
            gq = c1 sgn(a) grad_h(q) + c3 sgn(q - p)
            g  = q * gq - q (q . gq) + c2 (viol - l sum(viol))      (softmax Jacobian; multi-class hinge)
            delta = -lr g / ||g||
            q = q * exp(delta) / sum(q * exp(delta))                (= softmax(u + delta), see below)
        c3 = found ? 10 c3 : c3;  lr = found ? lr : 1.1 lr
    reveal q*

Why these forms (each keeps rounds down without changing what is computed):

* **Softmax by multiplicative update.** softmax(u + delta) = q * e^delta / sum(q * e^delta).
  Because |delta_j| <= lr, e^delta is a degree-4 Chebyshev polynomial on a small interval and the
  denominator lies in [e^-lr, e^lr], so its reciprocal is a short polynomial too: no max tree, no
  wide-range exponential, no wide-range reciprocal per step. The logits u are never needed again.
* **Label check without argmax.** argmax(z + e) = l  <=>  no j with q_j > q_l: one comparison per
  class inside the step's single ``msb`` batch, combined by a tree of ANDs.
* **Multi-class hinge** (Weston-Watkins): c2 sum_j relu(u_j - u_l) vanishes exactly when the label
  is kept, like MemGuard's max-hinge, and its gradient comes from the same comparisons.
* **Oblivious control flow.** Every query does the same work in every step; acceptance is a
  secret bit that only steers selections (``mul_bit``), never a branch.
* **c3 is capped** at ``c3_max`` (default 100) so that gradient magnitudes stay inside fixed-point
  headroom (MemGuard grows it without bound; the reference applies the same cap).

Shapes: z (B, k) secret at scale f; W1 (k, H1), b1 (H1,), W2 (H1, H2), b2 (H2,), w3 (H2, 1),
b3 (1,) secret at scale f. Returns q* (B, k) at scale f.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from siguard.core.config import GuardConfig

from .approx import eval_poly, fit_chebyshev, msb_many, mul_bit_many, mul_many, ring_int, step_function, trunc_many
from .engine import Bits, Engine, Secret
from .nonlinear import exp, exp_steps, max_and_argmax, reciprocal, rsqrt, softmax

__all__ = ["secure_guard", "defender_score", "guard_progress"]

#: called as (iterations done, iterations in all) by party P0's guard (or the reference engine's) after
#: each of its R x (T + 1) iterations; set with :func:`guard_progress`. Public counts only.
_PROGRESS: Callable[[int, int], None] | None = None


@contextmanager
def guard_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Report the guard's progress to ``callback(done, total)`` while the block runs (in this process: threads
    and reference mode; a progress bar for a long guarded run). The counts are public (part of the plan)."""
    global _PROGRESS
    previous, _PROGRESS = _PROGRESS, callback
    try:
        yield
    finally:
        _PROGRESS = previous


def _report(e: Engine, done: int, total: int) -> None:
    hook = _PROGRESS
    if hook is not None and getattr(e, "party", 0) == 0:
        hook(done, total)


_t = ring_int  # a public ring integer as a shared 0-dim tensor


def _layer(e: Engine, x: Secret, W: Secret, b: Secret, shift: int) -> Secret:
    """x @ W + b before truncation: b (scale f) brought to the product's scale by a left shift. 1 round."""
    return e.add(e.matmul(x, W), e.mul(e.local(lambda t: t.reshape(1, -1), b), _t(1 << shift)))


def defender_score(e: Engine, q: Secret, W1, b1, W2, b2, w3, b3, with_backward: bool = False,
                   w3_row: Secret | None = None, q_scale: int | None = None) -> tuple[Secret, Bits, Secret | None]:
    """h(q) for q (B, k) at scale f. Returns (a (B, 1), m1, y) where m1 is the sign bit of the first
    hidden pre-activation (ReLU'(x1) = not m1) and, if ``with_backward``, y = ReLU'(x2) * w3^T
    (B, H2), the start of the backward pass, computed in the same ``mul_bit`` as the second ReLU.
    ``w3_row``: w3^T broadcast to (B, H2), if the caller has it already (it is only a layout of w3).
    ``q_scale``: the scale of q if not f (the guard keeps probabilities at about 2f).

    a is returned UNTRUNCATED, at scale 2f: the guard only ever uses its sign. Each hidden layer's
    truncation runs in the rounds of its ReLU's sign test, which reads the untruncated sum
    (:meth:`Engine.parallel`). Cost: 3 x matmul 1 + 2 x (msb 8 || trunc 2) + 2 x mul_bit 2 = 23 rounds
    (29 with the truncations in sequence and a truncated score)."""
    f = e.frac_bits
    s1 = f if q_scale is None else q_scale
    pre1 = _layer(e, q, W1, b1, s1)
    m1, x1 = e.parallel((e.msb, pre1), (e.trunc, pre1, s1))
    h1 = e.mul_bit(x1, e.bit_not(m1))
    pre2 = _layer(e, h1, W2, b2, f)
    m2, x2 = e.parallel((e.msb, pre2), (e.trunc, pre2, f))
    d2 = e.bit_not(m2)
    y = None
    if with_backward:
        if w3_row is None:
            w3_row = _w3_row(e, w3, tuple(x2.shape))
        h2, y = mul_bit_many(e, [x2, w3_row], [d2, d2])
    else:
        h2 = e.mul_bit(x2, d2)
    return _layer(e, h2, w3, b3, f), m1, y


def _w3_row(e: Engine, w3: Secret, shape: tuple[int, int]) -> Secret:
    """w3 (H2, 1) laid out as rows of shape (B, H2)."""
    return e.local(lambda v: v.reshape(1, -1).expand(*shape).contiguous(), w3)


def _zero_bits(e: Engine, b: Bits) -> Bits:
    """A Boolean sharing of zeros with ``b``'s shape (the zero map applied share-wise)."""
    return e.bit_local(torch.zeros_like, b)


def _and_all(e: Engine, bits: Bits) -> Bits:
    """AND over the last axis of (B, n) bits by a tree: ceil(log2 n) rounds."""
    n = bits.shape[-1]
    while n > 1:
        half = n // 2
        lo = e.bit_local(lambda t, h=half: t[..., :h], bits)
        hi = e.bit_local(lambda t, h=half: t[..., h : 2 * h], bits)
        both = e.bit_and(lo, hi)
        if n % 2:
            rest = e.bit_local(lambda t, h=half: t[..., 2 * h :], bits)
            both = e.bit_cat([both, rest], -1)
        bits = both
        n = bits.shape[-1]
    return bits


def _select(e: Engine, cur: Secret, new: Secret, bit: Bits) -> Secret:
    """bit ? new : cur, for a (B, 1) bit broadcast over the last axis. 2 rounds."""
    diff = e.sub(new, cur)
    wide = e.bit_local(lambda t: t.expand(*diff.shape).contiguous(), bit)
    return e.add(cur, e.mul_bit(diff, wide))


def _update_constants(e: Engine, cfg: GuardConfig, c3: Any, lr: Any, found: Bits) -> tuple[Any, Any]:
    """c3 <- found ? 10 c3 : c3 (capped at c3_max); lr <- found ? lr : 1.1 lr.

    While c3 is public (before the first update) the cap is checked in the clear; afterwards one
    comparison decides it obliviously. Cost: (msb 8 + AND 1 when c3 is secret) + trunc 2 for
    0.1 lr when lr is secret + mul_bit 2."""
    f = e.frac_bits
    if e.is_secret(c3):
        (over,) = msb_many(e, [e.sub(e.public(cfg.c3_max / 10 * 1.001), c3)])  # 1 iff c3 > c3_max / 10
        grow = e.bit_and(found, e.bit_not(over))
    else:
        grow = found if float(c3.item()) * 10 <= cfg.c3_max * 2**f * (1 + 1e-9) else _zero_bits(e, found)
    inc_lr = e.mul_public_real(lr, 0.1)
    d_c3, d_lr = mul_bit_many(e, [e.mul(c3, _t(9)), inc_lr], [grow, e.bit_not(found)])
    return e.add(c3, d_c3), e.add(lr, d_lr)


def _prob_scale(f: int) -> int:
    """Scale of probabilities inside the guard: about 2f, so that a class 22 logits below the top
    (e^-22 ~ 2^-32) keeps its value and its gradient; capped so q * gradient products stay < 2^62."""
    return max(f, min(2 * f, 54 - f))


def _softmax_wide(e: Engine, z: Secret, qs: int) -> tuple[Secret, Secret]:
    """(softmax(z) at scale qs, one-hot of argmax z as integers). Entries down to e^(-qs ln 2) keep
    relative precision. Cost: max tree 40 (k = 10) + exp 21 + reciprocal on [1, k] 26 + mul 3."""
    f = e.frac_bits
    k = int(z.shape[-1])
    top, onehot = max_and_argmax(e, z, axis=-1, scale=0)
    u0 = e.sub(z, top)  # <= 0, the top entry exactly 0
    ex = exp_steps(e, u0, lo=-(qs - 1) * math.log(2), hi=0.0, out_scale=qs)
    total = e.trunc(e.local(lambda v: v.sum(-1, keepdim=True), ex), qs - f)  # in [1, k] at scale f
    inv = reciprocal(e, total, impl="newton4", lo=1.0, hi=float(k))
    return e.trunc(e.mul(ex, inv), f), onehot


def _rsqrt_crypten(e: Engine, x: Secret, iterations: int = 3) -> Secret:
    """CrypTen's default inverse square root (scale f): y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024 (exp by 8
    squarings), then ``iterations`` Newton steps y <- y (3 - x y^2) / 2. Cost: 2 + 34 + 2 + 2 + 9 per step."""
    f = e.frac_bits
    arg = e.neg(e.add(e.mul_public_real(x, 0.5), e.public(0.2)))
    y = e.add(e.mul_public_real(exp(e, arg, impl="limit8"), 2.2), e.public(0.2))
    y = e.sub(y, e.mul_public_real(x, 1 / 1024))
    for _ in range(iterations):
        xy2 = e.trunc(e.mul(x, e.trunc(e.mul(y, y), f)), f)
        y = e.trunc(e.mul(y, e.sub(e.public(3.0), xy2)), f + 1)
    return y


def _softmax_crypten(e: Engine, u: Secret, qs: int) -> Secret:
    """CrypTen's default softmax of u (exact max, exp by 8 squarings, 10 Newton steps) at scale f, brought to
    the guard's probability scale qs (a public power of two: exact)."""
    f = e.frac_bits
    q = softmax(e, u, axis=-1, impl="crypten")
    return e.mul(q, _t(1 << (qs - f))) if qs > f else q


def _power_of_two_scale(e: Engine, g: Secret, gs: int, top: int) -> Secret:
    """g * 2^-j (result at scale f) where 2^j <= max_i |g_i| < 2^(j+1), j in [-gs, top]: the gradient's
    magnitude bucket, from ONE msb over all thresholds (|g| >= 2^j  <=>  g >= 2^j or -g >= 2^j), an OR
    over the classes (AND tree of negations) and ONE mul_bit for the piecewise-constant factor.
    All-zero g stays 0. Cost: msb 8 + ceil(log2 k) + mul_bit 2 + mul 1 + trunc 2."""
    f = e.frac_bits
    js = list(range(-gs, top + 1))
    thr = torch.tensor([1 << (gs + j) for j in js], dtype=torch.int64).reshape(-1, 1, 1)
    wide = e.local(lambda v: v.unsqueeze(0).expand(len(js), *v.shape).contiguous(), g)
    pos = e.sub(wide, thr)
    neg = e.sub(e.neg(wide), thr)
    m_pos, m_neg = msb_many(e, [pos, neg])
    big = e.bit_xor(e.bit_not(m_pos), e.bit_not(m_neg))  # exclusive: g >= T and -g >= T cannot both hold
    # [max_i |g_i| >= 2^j] = NOT AND_i NOT big_ij  -> bits (J, B, 1)
    anybig = e.bit_not(_and_all(e, e.bit_not(big)))
    factors = torch.tensor([0] + [1 << (f - j) if j <= f else 0 for j in js], dtype=torch.int64)
    (scale_f,), _ = step_function(e, anybig, [factors])
    # g (scale gs) * 2^(f - j) (scale f) / 2^gs -> scale f with max |.| in [1, 2)
    return e.trunc(e.mul(g, scale_f), gs)


def secure_guard(e: Engine, z: Secret, W1, b1, W2, b2, w3, b3, config: GuardConfig | None = None,
                 **overrides: Any) -> Secret:
    """Guarded probabilities q* (B, k) at scale f for logits z (B, k); see the module docstring.

    Probabilities live at scale qs (about 2f) inside the guard, so that confident queries (a top-2
    logit gap up to ~22) keep non-zero runner-up probabilities and hence a gradient; the gradient is
    brought to [1, 2) by its power-of-two magnitude before the L2 normalisation, so that the tiny
    gradients of such queries are normalised like large ones (as in floating point)."""
    cfg = config or GuardConfig()
    if overrides:
        cfg = GuardConfig(**{**cfg.__dict__, **overrides})
    f = e.frac_bits
    qs = _prob_scale(f)
    k = int(z.shape[-1])

    # ---- once per query --------------------------------------------------------------------------
    crypten = cfg.internals == "crypten"
    if crypten:
        _, onehot = max_and_argmax(e, z, axis=-1, scale=0)
        p = _softmax_crypten(e, z, qs)
    else:
        p, onehot = _softmax_wide(e, z, qs)
    a0, _, _ = defender_score(e, p, W1, b1, W2, b2, w3, b3, q_scale=qs)
    (s0,) = msb_many(e, [a0])  # sign bit of the original decision

    # polynomial pieces of the multiplicative softmax update
    lmax = cfg.lr_max * 1.02 + 2.0**-f * 8
    exp_coef = fit_chebyshev(np.exp, -lmax, lmax, cfg.exp_degree)
    d_lo, d_hi = math.exp(-lmax) * 0.97, math.exp(lmax) * 1.03
    recip_coef = fit_chebyshev(_np_recip, d_lo, d_hi, cfg.recip_degree)
    c2_ring = _t(round(cfg.c2 * 2**qs))
    c1_is_one = cfg.c1 == 1.0

    q_star = p
    accepted = _zero_bits(e, s0)
    c3: Any = e.public(cfg.c3)
    lr: Any = e.public(cfg.lr)
    margin = e.public(cfg.margin, 2 * f)  # at the score's scale (defender_score leaves it untruncated)

    qshape = tuple(z.shape)
    # layouts of public-shape constants, hoisted out of the loops (local maps of the weights)
    w2_t = e.local(lambda v: v.t().contiguous(), W2)
    w1_t = e.local(lambda v: v.t().contiguous(), W1)
    w3_row = _w3_row(e, w3, (qshape[0], int(W2.shape[1])))
    for _round in range(cfg.rounds):
        q = p
        u = z  # the noised logits (scale f), kept by the CrypTen-style update only
        found = _zero_bits(e, s0)
        c3_wide = e.local(lambda v: v.expand(*qshape).contiguous(), c3)  # c3 changes once per round
        for t in range(cfg.steps + 1):
            last = t == cfg.steps
            _report(e, _round * (cfg.steps + 1) + t, cfg.rounds * (cfg.steps + 1))
            a, m1, y = defender_score(e, q, W1, b1, W2, b2, w3, b3, with_backward=not last, w3_row=w3_row,
                                      q_scale=qs)
            (q_l,) = mul_many(e, [(onehot, q)])
            q_l = e.local(lambda v: v.sum(-1, keepdim=True), q_l)
            checks = [a, e.sub(q, p), e.sub(q_l, q)]
            if cfg.validator == "margin":
                checks += [e.sub(margin, a), e.add(a, margin)]
            bits = msb_many(e, checks)
            m_a, m_qp, viol = bits[0], bits[1], bits[2]
            if cfg.validator == "sign":
                valid = e.bit_xor(m_a, s0)
            else:  # |a| <= margin  <=>  not [a > margin] and not [a < -margin] (exclusive events)
                valid = e.bit_not(e.bit_xor(bits[3], bits[4]))
            test_now = cfg.schedule == "freeze" or last
            if test_now:  # the acceptance test and the oblivious keep: AND tree 2 + select 2 rounds
                parts = [e.bit_not(viol), valid]
                if cfg.schedule == "freeze":
                    parts.append(e.bit_not(accepted))
                newly = _and_all(e, e.bit_cat(parts, -1))
                q_star = _select(e, q_star, q, newly)
                if cfg.schedule == "freeze":
                    accepted = e.bit_xor(accepted, newly)
                found = e.bit_xor(found, newly) if cfg.schedule == "freeze" else newly
            if last:
                break

            # ---- gradient of c1|a| + c2 sum relu(u_j - u_l) + c3 |q - p|_1 ----------------------
            # grad_h(q) = W1 (ReLU'(x1) * (W2 (ReLU'(x2) * w3))); y = ReLU'(x2) * w3 came with the forward pass
            g1 = e.trunc(e.matmul(y, w2_t), f)
            g1 = e.mul_bit(g1, e.bit_not(m1))
            gh = e.trunc(e.matmul(g1, w1_t), f)
            if not c1_is_one:
                gh = e.mul_public_real(gh, cfg.c1)
            # sgn(a) * gh and sgn(q - p) * c3 as x - 2 x [negative], and the violations as integers: one mul_bit
            m_a_wide = e.bit_local(lambda v: v.expand(*qshape).contiguous(), m_a)
            gh_neg, c3_neg, viol_a = mul_bit_many(e, [gh, c3_wide, _t(1)], [m_a_wide, m_qp, viol])
            gq = e.add(e.sub(gh, e.mul(gh_neg, _t(2))), e.sub(c3_wide, e.mul(c3_neg, _t(2))))
            cnt = e.local(lambda v: v.sum(-1, keepdim=True), viol_a)
            # softmax Jacobian-vector product at scale qs (tiny entries of confident queries survive):
            # g_i = q_i S_i with S_i = sum_j q_j (gq_i - gq_j): the pairwise form is exact for a normalised q
            # and keeps S_i precise when it is tiny (the top class of a confident query), where
            # gq_i - q . gq would cancel catastrophically at fixed point
            diffs = e.local(lambda v: v.unsqueeze(-1) - v.unsqueeze(-2), gq)  # (B, k, k): gq_i - gq_j, scale f
            q_j = e.local(lambda v: v.unsqueeze(-2).expand(*qshape, k).contiguous(), q)
            prod, lc = mul_many(e, [(q_j, diffs), (onehot, cnt)])
            # S at scale qs; q split as A 2^(qs - f) + B_lo with A = q at scale f, so that both products fit
            s_full, q_hi = trunc_many(e, [e.local(lambda v: v.sum(-1), prod), q], [f, qs - f])
            q_lo = e.sub(q, e.mul(q_hi, _t(1 << (qs - f))))
            p_hi, p_lo = mul_many(e, [(q_hi, s_full), (q_lo, s_full)])
            # q_hi S (scale qs + f) down by f, q_lo S (scale 2 qs) down by qs, in the same rounds
            g_hi, g_lo = e.parallel((e.trunc, p_hi, f), (e.trunc, p_lo, qs))
            g = e.add(g_hi, g_lo)  # scale qs
            g = e.add(g, e.mul(e.sub(viol_a, lc), c2_ring))  # integers x c2 at scale qs: exact
            # ---- normalised step and multiplicative softmax update ------------------------------
            gn = _power_of_two_scale(e, g, qs, cfg.grad_bits_hi)  # scale f, max |.| in [1, 2)
            n2 = e.trunc(e.local(lambda v: v.sum(-1, keepdim=True), e.mul(gn, gn)), f)  # in [1, 4k]
            if crypten:
                inv = _rsqrt_crypten(e, n2)
            else:
                inv = rsqrt(e, n2, lo=0.9, hi=4.0 * k + 1, iterations=cfg.norm_iterations)
            step = e.trunc(e.mul(inv, lr), f) if e.is_secret(lr) else e.mul_public_real(inv, lr.item() / 2**f)
            delta = e.neg(e.trunc(e.mul(gn, step), f))
            if crypten:
                u = e.add(u, delta)
                q = _softmax_crypten(e, u, qs)
                continue
            ex = eval_poly(e, delta, exp_coef, -lmax, lmax)
            # w = q e^delta (scale qs) and its row sum d (scale f) truncated from the same products at once
            wr = e.mul(q, ex)  # scale qs + f
            w, d = e.parallel((e.trunc, wr, f), (e.trunc, e.local(lambda v: v.sum(-1, keepdim=True), wr), qs))
            rd = eval_poly(e, d, recip_coef, d_lo, d_hi)
            q = e.trunc(e.mul(w, rd), f)  # scale qs
        c3, lr = _update_constants(e, cfg, c3, lr, found)
    return e.trunc(q_star, qs - f) if qs > f else q_star


def _np_recip(x):
    return 1.0 / x
