"""The SIGuard guard on secret shares: MemGuard's noise search with fixed iteration counts.

Written once against :class:`siguard.runtime.kernels.engine.Engine` (so the fixed-point reference, the secure
parties and the cost model run the same code) from the existing building blocks only: comparisons
(msb), bit selections (mul_bit), products, truncation, one exponential and one reciprocal per query,
and :meth:`Engine.fork` / :meth:`Engine.parallel` so that independent work shares rounds. The float64
oracle of the same algorithm is :func:`siguard.privacy.memguard.guard_reference` (the tests hold the two to
the same decisions). Notes on the protocols and their costs: docs/guard.md.

Algorithm (per query; z logits in R^k, h the defender MLP k -> 128 -> 64 -> 1, h > 0 = member)::

    p = softmax(z); l = argmax z; a0 = h(p)
    candidates r = 1..R, all at once (schedule "parallel", the default):
        e = 0; lr_r = lr growth^(r-1)
        for t = 1..T+1:
            q = softmax(z + e); a = h(q)
            ok_t = [no j: q_j > q_l] and valid(a)       valid: sign  a0 a <= 0 (the decision flipped)
                                                                margin |a| <= margin
                                                                hybrid: both tests kept, sign first
            if t == T+1: break
            gq = c1 sgn(a) grad_h(q) + c3 sgn(q - p); S_i = sum_j q_j (gq_i - gq_j)   (g_i = q_i S_i)
            d_i = sgn(hinge_i) where the label hinge is active (viol_i, or i = l with any violation)
                  else sgn(S_i)
            e = e - lr_r d                                 (a sign step: every logit moves by lr_r)
    candidate R+1 (sharpen_lr > 0): the same, with the fixed d = 1 - 2 onehot(l) and lr = sharpen_lr
    q* = softmax(z + e) of the first ok in (tier, round, step) order, else p
    release q* with every q*_j (j != l) rounded down to a multiple of 2^-release_bits, q*_l = 1 - their sum

Every round before a query's first success has failed, so running the rounds as independent
candidates gives the sequential "freeze" schedule's choice while taking T + 1 sequential iterations
instead of R (T + 1). Sign steps need no normalisation of the gradient (no inverse square root, no
power-of-two rescaling) and keep the state in ratio space (see :func:`_guard_parallel`): each step
costs 38 rounds (the sign tests run on 32 bits where the guard pass gives a public bound), the guard
64 + 38 T + 46 for R x T candidates (1,060 at the default 10 x 25, with the sharpening round and the release's
rounding, :func:`quantize_release`).

The sequential schedules keep MemGuard's normalised-gradient step (:func:`_guard_sequential`)::

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
        c3 = found ? 10 c3 : c3;  lr = found ? lr : growth lr
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
from siguard.privacy.memguard import candidate_order

from .approx import (
    _pack_bits,
    eval_poly,
    fit_chebyshev,
    msb_many,
    msb_many_with,
    mul_bit_many,
    mul_many,
    ring_const,
    ring_int,
    step_function,
    trunc_many,
    unpack,
)
from .engine import Bits, Engine, Secret, sign_bound
from .nonlinear import _recip_linear, exp, exp_steps, max_and_argmax, reciprocal, rsqrt, softmax

__all__ = ["secure_guard", "defender_score", "guard_progress", "guard_phases", "quantize_release"]

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
    """Progress after ``done`` of ``total`` iterations; on the cost engine, also a phase mark (guard_phases)."""
    hook = _PROGRESS
    if hook is not None and getattr(e, "party", 0) == 0:
        hook(done, total)
    _mark(e, "iteration")


def _mark(e: Engine, label: str) -> None:
    marks = getattr(e, "guard_marks", None)  # set by the cost pass on its engine (siguard.passes.cost.node_cost)
    if marks is not None:
        total = e.total
        marks.append((label, int(total["rounds"]), int(max(total["bytes_per_party"]))))


def guard_phases(marks: list[tuple[str, int, int]]) -> dict[str, Any]:
    """The guard's cost split into its phases from the cost engine's marks: ``once`` (per query, before the
    first iteration), ``per_iteration`` (each of the ``iterations`` sequential iterations but the last; for
    the parallel schedule an iteration is a step of all candidates at once), and ``final`` (the last
    iteration's evaluation, the selection of the released vector and its normalisation). Rounds and bytes
    of the busiest party; rounds add up to the guard's."""
    its = [m for m in marks if m[0] == "iteration"]
    start, end = marks[0], marks[-1]
    n = len(its)
    per = ((its[-1][1] - its[0][1]) // (n - 1), (its[-1][2] - its[0][2]) // (n - 1)) if n > 1 else (0, 0)
    return {"once": {"rounds": its[0][1] - start[1], "bytes": its[0][2] - start[2]},
            "per_iteration": {"rounds": per[0], "bytes": per[1]}, "iterations": n,
            "final": {"rounds": end[1] - its[-1][1], "bytes": end[2] - its[-1][2]}}




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
    """c3 <- found ? 10 c3 : c3 (capped at c3_max); lr <- found ? lr : lr_growth lr.

    While c3 is public (before the first update) the cap is checked in the clear; afterwards one
    comparison decides it obliviously. Cost: (msb 8 + AND 1 when c3 is secret) + trunc 2 for
    0.1 lr when lr is secret + mul_bit 2."""
    f = e.frac_bits
    if e.is_secret(c3):
        (over,) = msb_many(e, [e.sub(e.public(cfg.c3_max / 10 * 1.001), c3)])  # 1 iff c3 > c3_max / 10
        grow = e.bit_and(found, e.bit_not(over))
    else:
        grow = found if float(c3.item()) * 10 <= cfg.c3_max * 2**f * (1 + 1e-9) else _zero_bits(e, found)
    inc_lr = e.mul_public_real(lr, cfg.lr_growth - 1.0)
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

    The parallel schedule (default) runs :func:`_guard_parallel`, the sequential ones :func:`_guard_sequential`.
    On the cost engine, the marks of :func:`guard_phases` split the cost into its phases."""
    cfg = config or GuardConfig()
    if overrides:
        cfg = GuardConfig(**{**cfg.__dict__, **overrides})
    _mark(e, "start")
    out = (_guard_parallel if cfg.schedule == "parallel" else _guard_sequential)(e, cfg, z, W1, b1, W2, b2, w3, b3)
    _mark(e, "end")
    return out


def _guard_sequential(e: Engine, cfg: GuardConfig, z: Secret, W1, b1, W2, b2, w3, b3) -> Secret:
    """The ``freeze`` and ``paper`` schedules (module docstring): R sequential rounds of T + 1 iterations.

    Probabilities live at scale qs (about 2f) inside the guard, so that confident queries (a top-2
    logit gap up to ~22) keep non-zero runner-up probabilities and hence a gradient; the gradient is
    brought to [1, 2) by its power-of-two magnitude before the L2 normalisation, so that the tiny
    gradients of such queries are normalised like large ones (as in floating point)."""
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


# ---- the parallel schedule: every round a candidate of one batch, sign steps in ratio space -----------
LN2 = math.log(2.0)
#: the two sign tests whose operands vanish exactly for classes far below the label (r_j = r0_j = 0 at fixed
#: point: sgn(q - p) and S) read "negative" only below -2^-TIE_BITS (real units), so that the truncation's
#: +-1 ulp cannot flip them (the oracle applies the same rule: siguard.privacy.memguard)
TIE_BITS = 14
#: the parallel schedule raises every ratio r_j (j != l) by 2^-RATIO_FLOOR_BITS at the start
#: (siguard.privacy.memguard's RATIO_FLOOR)
RATIO_FLOOR_BITS = 30
#: the width (bits) of the bounded sign tests: 7 rounds instead of 8 (docs/protocols.md §5a)
SIGN_WIDTH = 32
#: the final normalisation q_c = r_c / D_c: the reciprocal's scale (r_c at qr = 40 times it stays below 2^62)
#: and its target relative error
_INV_SCALE = 20
_INV_ERROR = 2.0**-24


def _s_bits(cfg: GuardConfig, k: int, f: int) -> int:
    """b with |S_i| < 2^b (real units) for S_i = sum_j r_j (gq_i - gq_j): with G = 2^grad_bound_bits > |gq|,
    |S_i| <= 2 G sum_j r_j < 2 G D_max (:func:`_ratio_sum_bound`), kept with one bit to spare."""
    return math.ceil(math.log2(2.0 * _ratio_sum_bound(cfg, k))) + 1 + cfg.grad_bound_bits


def _ratio_sum_bound(cfg: GuardConfig, k: int) -> float:
    """D_max > D = sum_j r_j at every step: r_l = 1, and r_j <= e^(2 lr_max) for j != l (a ratio at most 1 grows
    by at most e^(2 lr) in a step; one above 1 is a violation, whose hinge moves it down by e^(-2 lr) next),
    with 2 % to spare for the fixed-point rounding of the steps' factors."""
    return k * math.exp(2.0 * cfg.lr_max) * 1.02


def s_shift(cfg: GuardConfig, k: int, f: int) -> int:
    """Bits by which the ratios r (scale 2f) are truncated before the products of S = sum_j r_j (gq_i - gq_j),
    so that |S| < 2^60 whatever the query: |gq| <= 2^grad_bound_bits (the defender's public gradient bound,
    set by the guard pass from its weights), sum_j r_j <= k e^(2 lr_max) while the label is kept and at most
    one step beyond it, |gq_i - gq_j| <= 2 |gq|."""
    qs = _prob_scale(f)
    return max(0, qs + f + _s_bits(cfg, k, f) - 60)


def _bits_above(bound: float, scale: int) -> int:
    """The smallest m with bound (1 + 2^-20) * 2^scale <= 2^(m - 1): a value with |x| < bound (real) at ``scale``
    fits m signed bits (the bounded msb's ``bits``) also after the public 2^(drop + 1) <= 2^(m - 30) of
    :meth:`_SignBounds.nonneg` is added."""
    return scale + max(0, math.ceil(math.log2(bound * (1.0 + 2.0**-20)))) + 1


class _SignBounds:
    """The PUBLIC bounds of the parallel schedule's per-step sign tests, as (bits, drop) for :meth:`Engine.msb`
    (None: no sound bound known, the 64-bit test). D_max bounds D = sum_j r_j (:func:`_ratio_sum_bound`); the
    scales are those of :func:`_guard_parallel` (qs = 2f = 32, qr = 40, f = 16 by default). Each test keeps
    SIGN_WIDTH = 32 bits (7 rounds): the band of a test with bound 2^(m-1) is 2^(m+2-SIGN_WIDTH) ring units.
    Every test but the label check adds the public 2^(drop+1) first (:meth:`nonneg`), so that x >= 0 reads
    non-negative exactly as in the 64-bit test (ReLU'(0) = 1, an exact 0 of a tie-shifted operand stays +1)
    and only x in [-2^(drop+1), 0) may read non-negative.

    * ``layer1`` -- D (r/D W1 + b1) at scale qs + f, [D D0 (q - p) + 2^-TIE_BITS] (both at scale qs + f, for
      every class and for the label as D0 - D) and [1 - r] (scale qr, moved to qs + f by 2^(qs + f - qr)): one
      bound, the largest of D_max 2^h1_bound_bits (the pre-activation is D times a value in the interval the guard
      pass bounds), D_max + 2^-TIE_BITS (r D0 and r0 D are both in [0, D_max]) and e^(2 lr_max) 1.02 (r_j).
      m = 56 by default (h1_bound_bits 2): band 2^26 = 2^-22 at scale 48, below the first layer's truncation
      by qs (ulp 2^-16 of D pre) and 2^-8 of 2^-TIE_BITS. A ReLU of a pre-activation in [-2^-22, 0) may stay
      open (its output is 0 or -1 ulp either way). The label check keeps its band on the "violated" side
      (conservative: an r_j in (1 - 2^-30, 1] may read as a violation, none above 1 is missed), and the label's
      own entry, exactly 0, is raised by 2^(drop+1) (it must never read as a violation).
    * ``layer2`` -- D (h1 W2 + b2) at scale 2f: D_max 2^h2_bound_bits; m = 40, band 2^10 = 2^-22.
    * ``score`` -- D a, margin D -+ D a at scale 2f: D_max (2^score_bound_bits + margin) (the larger of margin and
      the sharpening round's sharpen_margin); m = 42 by default,
      band 2^12 = 2^-20 (D a carries the truncation errors of two layers, about 2^-14).
    * ``direction`` -- S' = S_c +- S_h + 2^(B_S + 1) H + 2^-TIE_BITS + 2^(drop+1) at scale qs - shift + f with
      |S| < 2^B_S (:func:`s_shift`): |S'| < 2^(B_S + 2), m = B_S + 3 (63 when B_S = 60). The public 2^(drop+1)
      moves the band below the tie: S >= -2^-TIE_BITS reads non-negative as before (an exact 0 stays +1), and
      only S in [-2^-TIE_BITS - 2^(drop+1), -2^-TIE_BITS) may read non-negative. The band is 2^(bound bits - 27)
      real, 2^-26 of the bound on |S| (2^-12 at grad_bound_bits 8, 2^-15 at 5): below the error S carries from
      the truncated gradient (about 2^-16 per entry of gq, times D and the pairwise sum)."""

    def __init__(self, cfg: GuardConfig, k: int, f: int):
        qs = _prob_scale(f)
        dmax = _ratio_sum_bound(cfg, k)
        tie = 2.0**-TIE_BITS
        rmax = math.exp(2.0 * cfg.lr_max) * 1.02
        m1 = _bits_above(max(dmax + tie, rmax), qs + f)
        if cfg.h1_bound_bits is not None:
            m1 = max(m1, _bits_above(dmax * 2.0**cfg.h1_bound_bits, qs + f))
        self.layer1 = sign_bound(m1, SIGN_WIDTH)
        self.layer1_exact = cfg.h1_bound_bits is None  # then pre1 takes the 64-bit test
        self.layer2 = (None if cfg.h2_bound_bits is None
                       else sign_bound(_bits_above(dmax * 2.0**cfg.h2_bound_bits, 2 * f), SIGN_WIDTH))
        self.score = (None if cfg.score_bound_bits is None
                      else sign_bound(_bits_above(dmax * (2.0**cfg.score_bound_bits + _largest_margin(cfg)), 2 * f),
                                      SIGN_WIDTH))
        shift = s_shift(cfg, k, f)
        self.s_bits = qs - shift + f + _s_bits(cfg, k, f)  # B_S: |S| < 2^B_S (<= 2^60)
        self.hinge_bit = self.s_bits + 1
        self.direction = sign_bound(self.s_bits + 3, SIGN_WIDTH)

    @staticmethod
    def nonneg(e: Engine, x: Secret, bound: tuple[int, int] | None) -> Secret:
        """x + 2^(drop+1): the bounded test's band moved below 0 (see the class docstring)."""
        return e.add(x, _t(2 << bound[1])) if bound is not None and bound[1] else x


def _largest_margin(cfg: GuardConfig) -> float:
    """The widest margin any candidate's test uses: the sharpening round's rows test |a| <= sharpen_margin."""
    return max(cfg.margin, cfg.sharpen_margin if cfg.sharpen_lr > 0 else 0.0)


def _step_constants(lr: float, f: int) -> tuple[int, int]:
    """((U + V) / 2, (U - V) / 2) for the integers U ~ (e^(2 lr) - 1) 2^f and V ~ (e^(-2 lr) - 1) 2^f of a sign step
    (:func:`_guard_parallel`'s update), rounded to the nearest pair with U + V even so that both halves are
    integers: each factor 1 + U 2^-f, 1 + V 2^-f within 2^-f of e^(+-2 lr) (2^-(f+1) where plain rounding already
    gives an even sum)."""
    u, v = (math.exp(2 * lr) - 1) * 2**f, (math.exp(-2 * lr) - 1) * 2**f
    pairs = [(a, b) for a in (math.floor(u), math.ceil(u)) for b in (math.floor(v), math.ceil(v)) if (a + b) % 2 == 0]
    a, b = min(pairs, key=lambda p: (max(abs(p[0] - u), abs(p[1] - v)), abs(p[0] - u) + abs(p[1] - v)))
    return (a + b) // 2, (a - b) // 2


def _tile(e: Engine, x: Secret, n: int) -> Secret:
    """(B, ...) -> (n B, ...): the candidates' rows, candidate r at rows r B .. (r + 1) B - 1."""
    return e.local(lambda t: t.repeat(n, *([1] * (t.dim() - 1))), x)


def _prefix_or(e: Engine, bits: Bits) -> Bits:
    """Inclusive prefix OR along the last axis (Kogge-Stone): ceil(log2 n) AND rounds."""
    n = bits.shape[-1]
    d = 1
    while d < n:
        lo = e.bit_local(lambda t, d=d: t[..., : n - d], bits)
        hi = e.bit_local(lambda t, d=d: t[..., d:], bits)
        both_not = e.bit_and(e.bit_not(hi), e.bit_not(lo))  # NOT (hi OR lo)
        head = e.bit_local(lambda t, d=d: t[..., :d], bits)
        bits = e.bit_cat([head, e.bit_not(both_not)], -1)
        d *= 2
    return bits


def _goldschmidt_iterations(lo: float, hi: float, target: float = _INV_ERROR) -> int:
    """Iterations k with eps0^(2^k) <= target for the linear guess on [lo, hi] (relative error eps0)."""
    eps0 = _recip_linear(lo, hi)[2]
    k = 0
    while eps0 ** (2**k) > target:
        k += 1
    return k


def _recip_goldschmidt(e: Engine, x: Secret, lo: float, hi: float, out_scale: int) -> Secret:
    """1/x for x in [lo, hi] at scale f, returned at ``out_scale`` (<= 30), by Goldschmidt's iteration from the
    minimax linear guess y0 = alpha - beta x (relative error eps0): e0 = 1 - x y0, then y <- y (1 + e) and
    e <- e^2 (both products in one mul and one trunc), so y_k = (1 - e0^(2^k)) / x: relative error
    eps0^(2^k) plus a few 2^-30 (internal scale 30). Cost: guess 2 + e0 3 + 3 per iteration
    (k = :func:`_goldschmidt_iterations`: 6 on [1, 24]), against 2 + 6 per iteration for Newton's form."""
    f = e.frac_bits
    s = 30
    alpha, beta, _ = _recip_linear(float(lo), float(hi))
    k = _goldschmidt_iterations(lo, hi)
    y = e.trunc(e.sub(_t(int(ring_const(alpha, s)) << f), e.mul(x, ring_const(beta, s))), f)  # scale s
    err = e.sub(_t(1 << s), e.trunc(e.mul(x, y), f))  # 1 - x y0, scale s
    for i in range(k):
        grown = e.add(err, _t(1 << s))  # 1 + e
        if i == k - 1:
            return e.trunc(e.mul(y, grown), 2 * s - out_scale)
        y, err = trunc_many(e, mul_many(e, [(y, grown), (err, err)]), s)
    return e.trunc(e.mul(y, _t(1 << s)), 2 * s - out_scale)  # k = 0: the guess


def _guard_parallel(e: Engine, cfg: GuardConfig, z: Secret, W1, b1, W2, b2, w3, b3) -> Secret:
    """The ``parallel`` schedule with sign steps (module docstring), in ratio space.

    Every round is a candidate: the R rounds run as one batch of R B rows (round r with lr r, all from
    e = 0 with c3), and each query keeps the first success in (round, step) order -- the sequential freeze
    schedule's output, since every round before a query's first success has failed. The state is the
    vector of ratios r_j = q_j / q_l = e^(u_j - u_l) (scale qs + 8; every r_j, j != l, starts raised by
    2^-RATIO_FLOOR_BITS), so r_l = 1 and no step normalises (the step's products use r with r_l masked out):

    * a sign step moves u by -lr sgn(g): r_j <- r_j e^(2 lr (b_j - b_l)) with b = [g < 0], i.e. times
      e^(2 lr) where b_j and not b_l, e^(-2 lr) where b_l and not b_j: one mul_bit of r with
      b_j xor b_l, b_j and b_l (no AND: :func:`_step_constants`), one truncation;
    * the label check is r_j > 1 (local); sgn(q - p) = sgn(r D0 - r0 D) with D = sum r (products), for the
      label sgn(D0 - D);
    * h is positively homogeneous in (x, biases): D h(r / D) = h'(r) with every bias times D, so the
      ReLU masks, the sign of a and the test |a| <= margin (|D a| <= margin D) need no reciprocal;
    * sgn(g_i) = sgn(S_i) with S_i = sum_j r_j (gq_i - gq_j) (g_i = q_i S_i / D); the hinge is folded in
      as S' = S + 2^(B_S + 1) H (H_j = viol_j, H_l = -[any violation], |S| < 2^B_S) so that one msb gives the
      step's bits ("negative" only below -2^-TIE_BITS, as for sgn(q - p));
      S = sgn(a) S_h + S_c splits into the defender's part and c3's, both known before sgn(a): the msb
      tests both signs, and the ratios r [a < 0] and r [a >= 0] are moved by the bits of S_c - S_h and
      S_c + S_h respectively (one mul_bit call for both halves, so the choice costs no round of its own);
    * every sign test with a public bound (:class:`_SignBounds`) runs on 32 bits: 7 rounds instead of 8.
    Every candidate is normalised, q_c = r_c / D_c, while the last iteration runs (:func:`_recip_goldschmidt`
    in a fork beside it, with the part of the selection the earlier steps decide); the selection then picks
    the released q directly.

    Rounds per step (with the guard pass's bounds): products 1, msb || trunc 7, mul_bit 2, matmul 1,
    msb 7 || (trunc 2, the score's products x2 w3 1), mul_bit 2 (ReLU'(x2) x2 w3, whose sum is D a), then three
    branches in one fork (score msb 7 | backward 7 | hinge bits 4 + b2a 2 + products 1) 7, the sign test of
    S_c + S_h and S_c - S_h 7 (r split by [a < 0] into the halves each sign moves, in the same rounds: no mux
    round), mul_bit 2, trunc 2: 38. Final: the last evaluation 27 (beside it the normalisation 26 and the
    earlier steps' selection 11), the last steps' selection 7, the selecting mul_bit 2, the release's rounding 10
    (:func:`quantize_release`): 46. The sharpening round is one more block of rows in the forward pass and the
    tests (bytes, no rounds); its steps' direction bits are public (:func:`_with_sharpen_bits`), so the backward
    pass, the hinge's arithmetic and the direction test skip its rows.
    See :func:`guard_phases`."""
    f = e.frac_bits
    qs = _prob_scale(f)  # the ratios' scale in products
    qr = qs + 8  # the ratios' own scale: r_j down to 2^-qr (a logit gap up to ~27) stays non-zero
    B, k = int(z.shape[0]), int(z.shape[1])
    # the candidate blocks of every tier: the R rounds, then (sharpen_lr > 0) the sharpening round, whose steps
    # take the fixed direction "the label up, every other class down" (:func:`_with_sharpen_bits`)
    R, T = cfg.rounds + (1 if cfg.sharpen_lr > 0 else 0), cfg.steps
    n = R * B
    H1, H2 = int(W1.shape[1]), int(W2.shape[1])
    sb = _SignBounds(cfg, k, f)
    # the backward pass truncates once (by 2f, at 3f) when 2^grad_bound_bits at scale 3f has room below 2^62
    late_trunc = 3 * f + cfg.grad_bound_bits + 1 <= 62

    # ---- once per query: r0 = e^(z - max z) with r0_l = 1 exactly, D0 = sum r0 ------------------------
    top, onehot = max_and_argmax(e, z, axis=-1, scale=0)
    ex = exp_steps(e, e.sub(z, top), lo=-(qr - 1) * LN2, hi=0.0, out_scale=qr)

    def fix_label() -> tuple[Secret, Secret, Secret, Secret]:
        (corr,) = mul_many(e, [(onehot, e.sub(_t(1 << qr), ex))])
        # every other ratio gets 2^-RATIO_FLOOR_BITS: 10 significant bits for a class far below the label
        # (a 0 would never grow under multiplicative steps); the oracle starts from the same ratios
        r0 = e.add(e.add(ex, corr), e.mul(e.sub(_t(1), onehot), _t(1 << (qr - RATIO_FLOOR_BITS))))
        total = e.local(lambda v: v.sum(-1, keepdim=True), r0)
        d0, r0_32, r0_s = e.parallel((e.trunc, total, qr - f), (e.trunc, r0, qr - qs),
                                     (e.trunc, r0, qr - qs + shift))
        return r0, d0, r0_32, r0_s

    def label_row() -> Secret:  # W1's row of the label, (B, H1): the label's column of the backward pass
        return e.matmul(onehot, W1)

    def scaled_w3() -> tuple[Secret, Secret]:  # w3 laid out as rows, and c1 w3: the backward pass starts from c1 h
        row = _w3_row(e, w3, (n, H2))
        return row, row if cfg.c1 == 1.0 else e.mul_public_real(row, cfg.c1)

    shift = s_shift(cfg, k, f)
    (r0, d0, r0_32, r0_s), w1l, (w3_row, w3c_row) = e.fork(fix_label, label_row, scaled_w3)
    r0t, d0t, r0t_32, r0t_s, onehot_t = (_tile(e, v, R) for v in (r0, d0, r0_32, r0_s, onehot))
    b_row = e.local(lambda a, b, c: torch.cat([a, b, c]).reshape(1, -1), b1, b2, b3)
    w2_t = e.local(lambda v: v.t().contiguous(), W2)
    w1_t = e.local(lambda v: v.t().contiguous(), W1)
    lrs = [cfg.lr * cfg.lr_growth**i for i in range(cfg.rounds)] + [cfg.sharpen_lr] * (R - cfg.rounds)
    half_sum, half_diff = (torch.tensor([c[i] for c in map(_step_constants, lrs, [f] * R) for _ in range(B)],
                                        dtype=torch.int64).reshape(n, 1) for i in (0, 1))
    c3_ring = _t(round(cfg.c3 * 2**f))
    # the margin test's margin per row: the sharpening round's rows test |a| <= sharpen_margin
    margin_ring = torch.tensor([round((cfg.sharpen_margin if r >= cfg.rounds else cfg.margin) * 2**f)
                                for r in range(R) for _ in range(B)], dtype=torch.int64).reshape(n, 1)
    tie_48 = _t(1 << (qs + f - TIE_BITS))

    tiers = ("sign", "margin") if cfg.validator == "hybrid" else (cfg.validator,)
    # the search's rows; the sharpening round's B rows follow them, and their steps' direction is public, so the
    # backward pass, the hinge's arithmetic and the direction test run on the search's rows only
    ns = cfg.rounds * B
    search = (lambda v: e.local(lambda w: w[:ns].contiguous(), v)) if ns < n else (lambda v: v)  # noqa: E731
    search_bits = (lambda b: e.bit_local(lambda w: w[:ns].contiguous(), b)) if ns < n else (lambda b: b)  # noqa: E731
    w3c_s, w1l_s = search(w3c_row), _tile(e, w1l, cfg.rounds)

    def evaluate(r: Secret, r32: Secret, r_s: Secret, d: Secret, last: bool) -> tuple[list[Bits], Any, Secret]:
        """One iteration's forward pass and tests at the candidates' ratios r: the score's sign bits,
        (anyv, hv, s_c, s_h) for the step (hv, s_c, s_h None in the last iteration) and r with r_l = 0."""
        # products: the first layer, every bias times D, and the two sides of sgn(q - p)
        rw1, (bd, rd0, r0d, r_at_l) = e.fork(
            lambda: e.matmul(r32, W1),
            lambda: mul_many(e, [(d, b_row), (r32, d0t), (r0t_32, d), (onehot_t, r)]))
        r_other = e.sub(r, r_at_l)  # r with the label's entry 0: a step never moves r_l = 1
        bd1, bd2, bd3 = (e.local(lambda v, a=a, b=b: v[:, a:b].contiguous(), bd)
                         for a, b in ((0, H1), (H1, H1 + H2), (H1 + H2, H1 + H2 + 1)))
        pre1 = e.add(rw1, e.mul(bd1, _t(1 << (qs - f))))  # D (r/D W1 + b1), scale qs + f
        sig_arg = e.add(e.sub(rd0, r0d), tie_48)  # [r D0 - r0 D < -2^-TIE_BITS]
        # the label's own sgn(q_l - p_l): r_l D0 - r0_l D = D0 - D (r_l = r0_l = 1), at scale qs + f
        sig_l = e.add(e.mul(e.sub(d0t, d), _t(1 << qs)), tie_48)
        # [r_j > 1], at scale qs + f; the label's own entry (exactly 0) is raised above the band by 2^(drop+1)
        viol_arg = e.add(e.mul(e.sub(_t(1 << qr), r), _t(1 << (qs + f - qr))),
                         e.mul(onehot_t, _t(2 << sb.layer1[1])))
        bounds = [None if sb.layer1_exact else sb.layer1] + [sb.layer1] * 3
        checks = [sb.nonneg(e, v, b) for v, b in zip((pre1, sig_arg, sig_l), bounds, strict=False)] + [viol_arg]
        (m1, m_sig, m_sig_l, viol), (x1,) = msb_many_with(e, checks, bounds, [(e.trunc, pre1, qs)])
        h1 = e.mul_bit(x1, e.bit_not(m1))
        pre2 = e.add(e.matmul(h1, W2), bd2)
        # the score's products x2 w3 (scale 2f) run inside the sign test's rounds (truncation 2 + mul 1), so that
        # the ReLU's mul_bit gives relu(x2) w3 directly: D a = sum_h ReLU'(x2_h) x2_h w3_h + D b3, no matmul after
        m2, xw = e.fork(lambda: msb_many(e, [sb.nonneg(e, pre2, sb.layer2)], [sb.layer2])[0],
                        lambda: e.mul(e.trunc(pre2, f), w3_row))
        d2 = e.bit_not(m2)
        if last:
            hw, y = e.mul_bit(xw, d2), None
        else:
            hw, y = mul_bit_many(e, [xw, w3c_s], [d2, search_bits(d2)])

        def score() -> list[Bits]:
            da = e.add(e.local(lambda v: v.sum(-1, keepdim=True), hw), bd3)  # D a, scale 2f
            if tiers == ("sign",):
                return msb_many(e, [sb.nonneg(e, da, sb.score)], [sb.score])
            md = e.mul(d, margin_ring)  # margin D, scale 2f
            return msb_many(e, [sb.nonneg(e, v, sb.score) for v in (da, e.sub(md, da), e.add(da, md))], [sb.score] * 3)

        def pairwise(v: Secret) -> Secret:
            """S_i = sum_j r_j (v_i - v_j) for v (ns, k + 1) (the label's entry last): one product round."""
            diffs = e.local(lambda w: w.unsqueeze(-1) - w[:, :k].unsqueeze(-2), v)  # (ns, k + 1, k)
            rj = e.local(lambda w: w.unsqueeze(-2).expand(ns, k + 1, k).contiguous(), search(r_s))
            return e.local(lambda w: w.sum(-1), e.mul(rj, diffs))

        def backward() -> Secret:  # S of grad_h (c1 h) at q, (ns, k + 1)
            m1_s = e.bit_not(search_bits(m1))
            if late_trunc:  # g1 at scale 2f, its products at 3f, one truncation by 2f
                g1 = e.mul_bit(e.matmul(y, w2_t), m1_s)
            else:
                g1 = e.mul_bit(e.trunc(e.matmul(y, w2_t), f), m1_s)
            gm, gl = e.fork(lambda: e.matmul(g1, w1_t),
                            lambda: e.local(lambda v: v.sum(-1, keepdim=True), e.mul(g1, w1l_s)))
            return pairwise(e.trunc(e.cat([gm, gl], -1), 2 * f if late_trunc else f))

        def hinge() -> tuple[Bits, Secret | None, Secret | None]:
            """[any violation] (n, 1); the hinge's sign H and S of c3 sgn(q - p), (ns, k + 1)."""
            anyv = e.bit_not(_and_all(e, e.bit_not(viol)))
            if last:
                return anyv, None, None
            signs = [search_bits(b) for b in (viol, m_sig, m_sig_l, anyv)]
            va, sa, sal, anya = unpack(e, e.b2a(_pack_bits(e, signs)),
                                       [torch.Size((ns, k)), torch.Size((ns, k)), torch.Size((ns, 1)),
                                        torch.Size((ns, 1))])
            sc = e.sub(c3_ring, e.mul(e.cat([sa, sal], -1), e.mul(c3_ring, _t(2))))  # c3 sgn(q - p), label last
            return anyv, e.cat([va, e.neg(anya)], -1), pairwise(sc)

        out = e.fork(score, hinge) if last else e.fork(score, hinge, backward)
        return out[0], (*out[1], None if last else out[2]), r_other

    def normalise(rs: list[Secret], ds: list[Secret]) -> list[Secret]:
        """q = r / D (scale f) for every candidate (r at scale qr, D at scale f in [1, D_max])."""
        dall = e.cat(ds, 0)
        inv = _recip_goldschmidt(e, dall, 1.0, _ratio_sum_bound(cfg, k), _INV_SCALE)
        q = e.trunc(e.mul(e.cat(rs, 0), inv), qr + _INV_SCALE - f)
        sizes = [int(v.shape[0]) for v in rs]
        out, start = [], 0
        for size in sizes:
            out.append(e.local(lambda v, a=start, b=start + size: v[a:b].contiguous(), q))
            start += size
        return out

    r, r32, r_s, d = r0t, r0t_32, r0t_s, d0t
    history: list[Secret] = []
    dhist: list[Secret] = []
    anyvs: list[Bits] = []  # per step: any label violation (n, 1)
    valids: list[list[Bits]] = [[] for _ in tiers]  # per tier and step: the validator's test (n, 1)
    s0: Bits | None = None
    qs_norm: list[Secret] = []
    nt, N = len(tiers), R * (T + 1)
    blocks = nt * R  # a block: the T + 1 steps of one (tier, round); candidates in (tier, round, step) order
    # ... with the sharpening round's blocks last, their tiers reversed (the oracle's candidate_order)
    order = [i * R + r for i, r in candidate_order(tiers, cfg.rounds, R > cfg.rounds)]

    def ok_bits(anys: list[Bits], vals: list[list[Bits]], steps: int) -> Bits:
        """[no violation and valid] of ``steps`` steps, (B, blocks, steps) in (tier, round, step) order: 1 AND."""
        ok = e.bit_and(e.bit_not(e.bit_cat([e.bit_cat(anys, -1)] * nt, -1)),
                       e.bit_cat([e.bit_cat(v, -1) for v in vals], -1))  # (n, nt steps)
        return e.bit_local(lambda v: v.reshape(R, B, nt, steps).permute(1, 2, 0, 3).reshape(B, blocks, steps)
                           [:, order].contiguous(), ok)

    def exclusive(seen: Bits) -> Bits:
        """An inclusive prefix OR shifted by one along the last axis: [some earlier position is set]."""
        return e.bit_cat([_zero_bits(e, e.bit_local(lambda v: v[..., :1], seen)),
                          e.bit_local(lambda v: v[..., :-1], seen)], -1)

    def early_selection(anys: list[Bits], vals: list[list[Bits]]) -> tuple[Bits, Bits, Bits]:
        """The selection's part that the steps before the last decide (beside the last evaluation: AND 1, prefix
        OR over the B x blocks T earlier candidates 9, AND 1): per earlier candidate ok and no earlier ok among
        them (B, blocks T); per block, some ok among the earlier candidates up to its last step (B, blocks);
        some ok at all (B, 1)."""
        ok = e.bit_local(lambda v: v.reshape(B, blocks * T), ok_bits(anys, vals, T))
        seen = _prefix_or(e, ok)
        alone = e.bit_and(ok, e.bit_not(exclusive(seen)))
        block_seen = e.bit_local(lambda v: v.reshape(B, blocks, T)[:, :, T - 1].contiguous(), seen)
        return alone, block_seen, e.bit_local(lambda v: v[:, -1:].contiguous(), seen)

    for t in range(T + 1):
        last = t == T
        _report(e, t, T + 1)
        history.append(r)
        dhist.append(d)
        if last:  # every candidate's normalisation (and p's) and the earlier steps' selection run beside it
            (sbits, (anyv, hv, s_c, s_h), r_other), qs_norm, (alone_e, block_seen, any_e) = e.fork(
                lambda r=r, r32=r32, r_s=r_s, d=d: evaluate(r, r32, r_s, d, True),
                lambda: normalise([*history, r0], [*dhist, d0]),
                lambda a=list(anyvs), v=[list(x) for x in valids]: early_selection(a, v))
        else:
            sbits, (anyv, hv, s_c, s_h), r_other = evaluate(r, r32, r_s, d, False)
        m_a = sbits[0]
        if s0 is None:
            s0 = m_a  # t = 0: every candidate row holds p itself
        anyvs.append(anyv)
        for i, tier in enumerate(tiers):  # sign: flipped; margin: not (D a > margin D) and not (D a < -margin D)
            valids[i].append(e.bit_xor(m_a, s0) if tier == "sign" else e.bit_not(e.bit_xor(sbits[1], sbits[2])))
        if last:
            break

        # ---- the step's direction bits b = [g < 0] (with the label's entry b_l last) ----------------------
        # S = sgn(a) S_h + S_c: the sign test of both candidates S_c + S_h and S_c - S_h (the hinge folded in
        # as 2^(B_S + 1) H), each moving its half of r (below); |S| < 2^B_S (s_shift), bound: _SignBounds
        big = sb.nonneg(e, e.add(e.add(s_c, e.mul(hv, _t(1 << sb.hinge_bit))), _t(1 << (qs - shift + f - TIE_BITS))),
                        sb.direction)
        flip = e.bit_local(lambda v: v.expand(n, k).contiguous(), m_a)
        (b_pos, b_neg), r_neg = e.fork(
            lambda big=big, s_h=s_h: msb_many(e, [e.add(big, s_h), e.sub(big, s_h)], [sb.direction] * 2),
            lambda r_other=r_other, flip=flip: e.mul_bit(r_other, flip))
        if ns < n:  # the sharpening round's rows: b_j = 0 for every class, b_l = 1 (public bits, local)
            b_pos, b_neg = (_with_sharpen_bits(e, b, B) for b in (b_pos, b_neg))
        r_pos = e.sub(r_other, r_neg)
        # per candidate: r_j <- r_j e^(2 lr) where b_j and not b_l (x), r_j e^(-2 lr) where b_l and not b_j (y).
        # With s = b_j xor b_l (local): x = (s + b_j - b_l) / 2 and y = (s - b_j + b_l) / 2, so
        # r (U x + V y) = ((U + V) / 2) r s + ((U - V) / 2) (r b_j - r b_l): three products with a bit, in ONE
        # mul_bit call with both halves of r, and no AND round (U, V: e^(+-2 lr) - 1 at scale f, U + V even)
        bj = [e.bit_local(lambda v: v[:, :k].contiguous(), b) for b in (b_pos, b_neg)]
        bl = [e.bit_local(lambda v: v[:, k:].expand(n, k).contiguous(), b) for b in (b_pos, b_neg)]
        sx = [e.bit_xor(a, b) for a, b in zip(bj, bl, strict=True)]
        sp, sn, jp, jn, lp, ln = mul_bit_many(e, [r_pos, r_neg] * 3, [*sx, *bj, *bl])
        rsx, rdiff = e.add(sp, sn), e.sub(e.add(jp, jn), e.add(lp, ln))
        incr = e.add(e.mul(rsx, half_sum), e.mul(rdiff, half_diff))  # scale qr + f
        wide_r = e.add(e.mul(r, _t(1 << f)), incr)  # the new r at scale qr + f
        dsum = e.local(lambda v: v.sum(-1, keepdim=True), wide_r)
        inc, d, r32, r_s = e.parallel((e.trunc, incr, f), (e.trunc, dsum, qr), (e.trunc, wide_r, qr + f - qs),
                                      (e.trunc, wide_r, qr + f - qs + shift))
        r = e.add(r, inc)

    # ---- final selection: the first success in (tier, round, step) order, else p ---------------------------
    # candidate c of block beta is first iff ok_c, no earlier ok among the earlier steps (early_selection) and
    # no ok last step in a block before beta; p iff no ok at all. OR distributes, so only the last steps' prefix
    # OR over the blocks is left: AND 1 (their ok), prefix OR 5 (20 blocks) || AND 1, AND 1
    ok_l = e.bit_local(lambda v: v.reshape(B, blocks), ok_bits([anyvs[T]], [[v[T]] for v in valids], 1))
    seen_l, alone_l = e.fork(lambda: _prefix_or(e, ok_l), lambda: e.bit_and(ok_l, e.bit_not(block_seen)))
    not_before = e.bit_not(exclusive(seen_l))  # (B, blocks): no ok last step in an earlier block
    first = e.bit_and(
        e.bit_cat([alone_e, alone_l, e.bit_not(any_e)], -1),
        e.bit_cat([e.bit_local(lambda v: v.unsqueeze(-1).expand(B, blocks, T).reshape(B, blocks * T), not_before),
                   not_before, e.bit_not(e.bit_local(lambda v: v[:, -1:].contiguous(), seen_l))], -1))
    first = e.bit_cat([e.bit_local(lambda v: torch.cat([v[:, :blocks * T].reshape(B, blocks, T),
                                                         v[:, blocks * T:blocks * (T + 1)].reshape(B, blocks, 1)], -1)
                                   .reshape(B, blocks * (T + 1)), first),
                       e.bit_local(lambda v: v[:, -1:].contiguous(), first)], -1)  # (B, nt N + 1): one bit set
    q_steps, q_p = qs_norm[:-1], qs_norm[-1]
    stack = e.local(lambda *hs: torch.stack(hs, 0).reshape(T + 1, R, B, k).permute(2, 1, 0, 3)
                    .reshape(B, N, k).repeat(1, nt, 1).reshape(B, blocks, T + 1, k)[:, order]
                    .reshape(B, nt * N, k), *q_steps)
    cands = e.cat([stack, e.local(lambda v: v.unsqueeze(1), q_p)], 1)  # (B, nt N + 1, k), scale f
    wide = e.bit_local(lambda v: v.unsqueeze(-1).expand(B, nt * N + 1, k).contiguous(), first)
    out = e.local(lambda v: v.sum(1), e.mul_bit(cands, wide))  # (B, k) scale f
    return quantize_release(e, out, onehot, cfg.release_bits) if cfg.release_bits else out


def _with_sharpen_bits(e: Engine, b: Bits, rows: int) -> Bits:
    """The direction bits b (ns, k + 1) of the search's rows followed by the sharpening round's ``rows`` rows: the
    public b_j = 0 for every class and b_l = 1 for the label's entry (the last column), i.e. r_j <- r_j e^(-2 lr)
    for every j != l. A sharing of public bits is local (zeros, and their negation)."""
    zeros = _zero_bits(e, e.bit_local(lambda v: v[:rows].contiguous(), b))  # (rows, k + 1)
    ones = e.bit_not(e.bit_local(lambda v: v[:, -1:].contiguous(), zeros))
    return e.bit_cat([b, e.bit_cat([e.bit_local(lambda v: v[:, :-1].contiguous(), zeros), ones], -1)], 0)


def quantize_release(e: Engine, q: Secret, onehot: Secret, bits: int) -> Secret:
    """q (B, k) at scale f with every class but the label rounded down to a multiple of 2^-bits and the label's
    entry 2^f minus their sum (:func:`siguard.privacy.memguard.quantize_release`, exact): the label stays the
    strict top-1 and the vector sums to 1. floor(q_j 2^bits) = #{i = 1 .. 2^bits - 1: q_j >= i 2^-bits}, the
    label's entry first lowered by 1 (q_l < 1 + 2^-bits, so it counts 0): one msb of the (2^bits - 1) k
    differences, exact on f + 3 bits (|q - 1 - i 2^-bits| < 2, half the bound), b2a of the bits, and one product
    with the one-hot label.
    Rounds: msb 7 (6 at f <= 13) + b2a 2 + product 1 = 10; bytes per query: (2^bits - 1) k msb and b2a
    elements, k products."""
    f = e.frac_bits
    B, k = int(q.shape[0]), int(q.shape[1])
    levels, unit = (1 << bits) - 1, 1 << (f - bits)
    shifted = e.sub(q, e.mul(onehot, _t(1 << f)))
    thresholds = (torch.arange(1, levels + 1, dtype=torch.int64) * unit).reshape(-1, 1, 1)
    diffs = e.sub(e.local(lambda v: v.unsqueeze(0).expand(levels, B, k).contiguous(), shifted), thresholds)
    (below,) = msb_many(e, [diffs], [sign_bound(f + 3, SIGN_WIDTH)])
    floors = e.mul(e.local(lambda v: v.sum(0), e.b2a(e.bit_not(below))), _t(unit))  # scale f, 0 at the label
    rest = e.sub(_t(1 << f), e.local(lambda v: v.sum(-1, keepdim=True), floors))
    return e.add(floors, e.mul(onehot, rest))
