"""Plaintext float64 reference of the guard (MemGuard with fixed iteration counts): the oracle of the secure guard.

Algorithm, per query (vectorised over a batch; z are logits in R^k, h the defender, > 0 = "member"):

    u0 = z - max(z);  p = softmax(u0);  l = one-hot(argmax z) (ties -> lowest index);  a0 = h(p)
    e* = 0;  accepted = False;  c3 = c3_0;  lr = lr_0
    for r = 1..R:
        e = 0;  found = False
        for t = 1..T, and once more at t = T+1 for evaluation only:
            u = u0 + e;  q = softmax(u);  a = h(q)
            viol_j = [u_j > u_l]                       (0 at j = l; the label is kept <=> sum(viol) == 0)
            ok = sum(viol) == 0  and  valid(a)         valid: "sign"   a0 * a <= 0  (the decision flipped)
                                                              "margin" |a| <= margin
            schedule "freeze": if ok and not accepted: e* = e; accepted = found = True   (every t, incl. T+1)
            schedule "paper":  at t = T+1 only: if ok: e* = e; accepted = found = True   (overwrites e*)
            if t == T+1: stop
            gradient of L = c1 |a| + c2 sum_j relu(u_j - u_l) + c3 ||q - p||_1 with respect to e:
                gq = c1 sgn(a) grad_h(q) + c3 sgn(q - p)        sgn(0) = +1; ReLU masks [pre >= 0]
                g  = q * gq - q * <q, gq>                       softmax Jacobian-vector product
                g  = g + c2 (viol - l * sum(viol))              Weston-Watkins hinge (0 when the label is kept)
                e  = e - lr * g / sqrt(||g||^2 + eps)
        after the round: found ? c3 = 10 c3 : lr = 1.1 lr
    phase II (MemGuard's randomised release, plaintext): with probability release_prob output
    softmax(u0 + e*), otherwise softmax(u0) (a seeded numpy Generator; nothing here is secret-shared).

Every query does the same work (R * (T + 1) forward passes and R * T gradient steps), as in MPC, where
the acceptance test is an oblivious select.

Saturation: ||g|| is about q_j ~ e^-gap (gap = top-2 logit gap), so above a gap of ~14 it falls below
sqrt(eps) = 1e-6 and a step moves only ~e^-(gap - 14) of lr; escaping takes ~e^(gap - 14) / lr steps, so
with lr = 0.2 a query with a gap above ~18 stays where it is in 300 steps (released unguarded, as p). In
fixed point with f fractional bits q_j rounds to 0 from a gap of ~f ln 2 (~11 for f = 16): g is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .defender import DefenderWeights, single_threaded

__all__ = [
    "SCHEDULES",
    "VALIDATORS",
    "GuardResult",
    "guard_reference",
    "plaintext_memguard",
    "guard_loss",
    "guard_loss_gradient",
    "quantize_release",
    "candidate_order",
    "softmax",
]

SCHEDULES = ("freeze", "paper", "parallel")
STEPS = ("l2", "sign")
VALIDATORS = ("sign", "margin", "hybrid")
_EPS = 1e-12


def softmax(u: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, k), shifted by the row maximum."""
    ex = np.exp(u - u.max(axis=1, keepdims=True))
    return ex / ex.sum(axis=1, keepdims=True)


def _sgn(x: np.ndarray) -> np.ndarray:
    """+1 where x >= 0, else -1 (the sign of 0 is +1, as a single comparison gives it in MPC)."""
    return np.where(x >= 0.0, 1.0, -1.0)


@dataclass
class GuardResult:
    """Outputs of :func:`guard_reference` for B queries of k classes.

    probs: (B, k) the released vector (softmax(u0 + e*) where ``released``, else softmax(u0)).
    guarded: (B, k) softmax(u0 + e*), the vector the secure guard reveals (phase I only).
    noise: (B, k) e*, the accepted noise on the shifted logits (0 where nothing was accepted).
    plain: (B, k) p = softmax(z), the unguarded output.
    labels: (B,) argmax z (ties -> lowest index).
    accepted: (B,) bool, some e passed the test.
    accept_round, accept_step: (B,) int, 1-based round r and step t at which e* was taken (for "paper" the
        last overwrite, t = T+1); 0 where nothing was accepted.
    released: (B,) bool, phase II released the guarded vector.
    a0: (B,) h(p); a_final: (B,) h(probs), the defender's score of what is released.
    distortion: (B,) ||probs - p||_1.
    """

    probs: np.ndarray
    guarded: np.ndarray
    noise: np.ndarray
    plain: np.ndarray
    labels: np.ndarray
    accepted: np.ndarray
    accept_round: np.ndarray
    accept_step: np.ndarray
    released: np.ndarray
    a0: np.ndarray
    a_final: np.ndarray
    distortion: np.ndarray

    @property
    def label_preserved(self) -> np.ndarray:
        """(B,) bool: the released vector's top-1 is the unguarded one."""
        return self.probs.argmax(axis=1) == self.labels

    def summary(self) -> dict[str, float]:
        """Acceptance rate, label-preserved rate, mean/max L1 distortion, flipped-decision rate."""
        return {
            "acceptance": float(self.accepted.mean()),
            "label_preserved": float(self.label_preserved.mean()),
            "mean_l1": float(self.distortion.mean()),
            "max_l1": float(self.distortion.max()) if len(self.distortion) else 0.0,
            "decision_flipped": float((self.a0 * self.a_final <= 0).mean()),
        }


def _hinge_terms(u: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """viol (B, k): [u_j > u_l] as 0/1 floats; 0 at the label l itself."""
    u_l = (u * onehot).sum(axis=1, keepdims=True)
    return (u > u_l).astype(np.float64)


def guard_loss_gradient(u: np.ndarray, p: np.ndarray, onehot: np.ndarray, defender: DefenderWeights, *,
                        c1: float | np.ndarray = 1.0, c2: float | np.ndarray = 10.0,
                        c3: float | np.ndarray = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One forward/backward pass of the guard's loss at shifted logits ``u`` (B, k).

    Args:
        u: (B, k) u0 + e; p: (B, k) the unguarded probabilities; onehot: (B, k) the label l.
        c1, c2, c3: scalars or (B,) per-query weights.

    Returns:
        ``(g, q, a, viol)``: dL/de (B, k) for L = c1|a| + c2 sum_j relu(u_j - u_l) + c3 ||q - p||_1 with
        sgn(a), sgn(q - p) and the ReLU masks taken at this point; q = softmax(u) (B, k); a = h(q) (B,);
        viol (B, k) the hinge's active set.
    """
    c1, c2, c3 = (np.reshape(np.asarray(c, dtype=np.float64), (-1, 1)) for c in (c1, c2, c3))
    q = softmax(u)
    a, m1, m2 = defender.forward(q)
    viol = _hinge_terms(u, onehot)
    gq = c1 * _sgn(a)[:, None] * defender.input_gradient(m1, m2) + c3 * _sgn(q - p)
    g = q * gq - q * (q * gq).sum(axis=1, keepdims=True)
    g = g + c2 * (viol - onehot * viol.sum(axis=1, keepdims=True))
    return g, q, a, viol


def guard_loss(u: np.ndarray, p: np.ndarray, onehot: np.ndarray, defender: DefenderWeights, *,
               c1: float = 1.0, c2: float = 10.0, c3: float = 0.1) -> np.ndarray:
    """L (B,) = c1 |h(q)| + c2 sum_j relu(u_j - u_l) + c3 ||q - p||_1 with q = softmax(u) (u, p, onehot (B, k))."""
    q = softmax(u)
    u_l = (u * onehot).sum(axis=1, keepdims=True)
    hinge = np.maximum(u - u_l, 0.0).sum(axis=1)
    return c1 * np.abs(defender.score(q)) + c2 * hinge + c3 * np.abs(q - p).sum(axis=1)


def guard_reference(logits: np.ndarray, defender: DefenderWeights, *, rounds: int = 6, steps: int = 49,
                    c1: float = 1.0, c2: float = 10.0, c3: float = 0.1, lr: float = 0.2, schedule: str = "freeze",
                    c3_max: float = 100.0,
                    validator: str = "sign", margin: float = 0.5, release_prob: float = 1.0,
                    seed: int = 0, step: str = "l2", lr_growth: float = 1.1, sharpen_lr: float = 0.0,
                    sharpen_margin: float = 0.5, release_bits: int = 0) -> GuardResult:
    """Run the guard (module docstring) on a batch of logits (B, k) in float64; returns a :class:`GuardResult`.

    ``rounds`` = R, ``steps`` = T, ``schedule`` in :data:`SCHEDULES`, ``validator`` in :data:`VALIDATORS`,
    ``margin`` for the "margin" validator, ``release_prob`` and ``seed`` for phase II. ``c3_max`` caps c3's
    growth (the secure guard needs it for fixed-point headroom; MemGuard itself lets c3 grow). ``step`` in
    :data:`STEPS`: "l2" moves e by lr along the normalised gradient (MemGuard), "sign" by lr along the sign of
    every coordinate of the gradient, the hinge's sign taking precedence where the hinge is active.
    ``lr_growth``: each round's learning rate is the previous failed round's times this.
    ``sharpen_lr`` (parallel schedule; 0 = off): one more candidate round, whose steps raise the label's logit by
    ``sharpen_lr`` and lower every other by as much (the direction is fixed, so the label is always kept), taken
    only where no search candidate succeeds: its first step with |h| <= ``sharpen_margin``, failing that its first
    flip (:func:`candidate_order`). A query the search cannot bring to the decision boundary is sharpened towards
    it instead of released unguarded. ``release_bits`` = b (0 = off): the released vector is rounded down to
    multiples of 2^-b for every class but the label, which takes the rest (:func:`quantize_release`).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != defender.num_classes:
        raise ValueError(f"logits must be (B, {defender.num_classes}), got {list(z.shape)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if validator not in VALIDATORS:
        raise ValueError(f"validator must be one of {VALIDATORS}, got {validator!r}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if validator == "hybrid" and schedule != "parallel":
        raise ValueError("the hybrid validator needs the parallel schedule")
    if rounds < 0 or steps < 0 or not 0.0 <= release_prob <= 1.0:
        raise ValueError("rounds and steps must be >= 0 and release_prob in [0, 1]")
    if sharpen_lr < 0 or (sharpen_lr > 0 and schedule != "parallel") or not sharpen_margin > 0:
        raise ValueError("sharpen_lr must be >= 0 (> 0 only with the parallel schedule) and sharpen_margin > 0")
    if not 0 <= int(release_bits) <= 12:
        raise ValueError(f"release_bits must lie in [0, 12], got {release_bits}")
    with single_threaded():
        return _guard(z, defender, rounds=rounds, steps=steps, c1=c1, c2=c2, c3=c3, lr=lr, schedule=schedule,
                      validator=validator, margin=margin, release_prob=release_prob, seed=seed, c3_max=c3_max,
                      step=step, lr_growth=lr_growth, sharpen_lr=sharpen_lr, sharpen_margin=sharpen_margin,
                      release_bits=int(release_bits))


def candidate_order(tiers: tuple[str, ...], rounds: int, sharpen: bool) -> list[tuple[int, int]]:
    """The parallel schedule's candidate blocks in selection order, as (tier index, round index): every tier's R
    rounds in tier order, then the sharpening round's tiers in reverse order -- along its path the score rises
    towards the boundary, so its first step within the margin comes before a flip, which is the fallback for a
    step that jumps the band. The secure guard orders its candidates the same way."""
    order = [(i, r) for i in range(len(tiers)) for r in range(rounds)]
    return order + ([(i, rounds) for i in reversed(range(len(tiers)))] if sharpen else [])


def quantize_release(q: np.ndarray, labels: np.ndarray, bits: int) -> np.ndarray:
    """(B, k) q with every class but the label rounded down to a multiple of 2^-bits and the label's entry
    1 - the others' sum (so the label stays the strict top-1 and the vector sums to 1); ``bits`` = 0: q."""
    if not bits:
        return q
    scale = float(1 << bits)
    out = np.floor(q * scale) / scale
    rows = np.arange(len(q))
    out[rows, labels] = 0.0
    out[rows, labels] = 1.0 - out.sum(axis=1)
    return out


#: sign steps: the tests of sgn(q - p) and of S read "negative" only below -2^-TIE_BITS in ratio units (see
#: :func:`_direction`), as the parties do (siguard.runtime.kernels.guard.TIE_BITS): at fixed point both operands vanish
#: exactly for classes far below the label, and the truncation's +-1 ulp must not decide their sign
TIE = 2.0**-14
#: sign steps start from the ratios e^(u0_j - u0_l) + RATIO_FLOOR (j != l), as the parties do: at fixed point a
#: class more than ~21 logits below the label keeps 10 significant bits there instead of rounding to 0 (a ratio
#: of 0 could never grow); a class 15 logits below moves by 0.1 %
RATIO_FLOOR = 2.0**-30


def _direction(u: np.ndarray, p: np.ndarray, onehot: np.ndarray, defender: DefenderWeights, *, c1: float,
               c2: float, c3: np.ndarray, step: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(direction d (B, k), a (B,), viol (B, k)) at u: the update is e <- e - lr d.

    "l2": d = g / ||g||.  "sign": in ratio space r = e^(u - u_l) (D = sum r; r0, D0 the same at e = 0):
    sigma_i = -1 if r_i D0 - r0_i D < -TIE (i.e. q_i < p_i) else +1; gq = c1 sgn(a) grad_h + c3 sigma;
    S_i = sum_j r_j (gq_i - gq_j) (g_i = q_i S_i / D: the same sign); d_i = sgn(hinge_i) where the hinge is
    active (viol_i, or i = l with a violation), else -1 if S_i < -TIE, else +1."""
    if step == "l2":
        g, _, a, viol = guard_loss_gradient(u, p, onehot, defender, c1=c1, c2=c2, c3=c3)
        return g / np.sqrt((g * g).sum(axis=1, keepdims=True) + _EPS), a, viol
    c3c = np.reshape(np.asarray(c3, dtype=np.float64), (-1, 1))
    q = softmax(u)
    a, m1, m2 = defender.forward(q)
    viol = _hinge_terms(u, onehot)
    r = q / (q * onehot).sum(axis=1, keepdims=True)
    r0 = p / (p * onehot).sum(axis=1, keepdims=True)
    sig = np.where(r * r0.sum(axis=1, keepdims=True) - r0 * r.sum(axis=1, keepdims=True) < -TIE, -1.0, 1.0)
    gq = c1 * _sgn(a)[:, None] * defender.input_gradient(m1, m2) + c3c * sig
    s = gq * r.sum(axis=1, keepdims=True) - (r * gq).sum(axis=1, keepdims=True)
    hinge = viol - onehot * viol.sum(axis=1, keepdims=True)
    d = np.where(hinge != 0.0, np.sign(hinge), np.where(s < -TIE, -1.0, 1.0))
    return d, a, viol


def _descend(u0: np.ndarray, p: np.ndarray, onehot: np.ndarray, a0: np.ndarray, defender: DefenderWeights, *,
             steps: int, lr: np.ndarray, c1: float, c2: float, c3: np.ndarray, freeze: bool, tiers: tuple[str, ...],
             margin: float | np.ndarray, step: str, accepted: np.ndarray,
             forced: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One round of T steps from e = 0. For each validator in ``tiers``: (hit (B,) bool, e_hit (B, k),
    t_hit (B,)): with ``freeze`` the first e that passes the test at some t (only where not ``accepted``
    yet), else the e after the last step if it passes (t = T+1). Rows where ``forced`` (B,) is set take the
    sharpening direction d = 1 - 2 onehot (the label's logit up, every other down) instead of the loss's;
    ``margin`` may be per row (B,)."""
    B, k = u0.shape
    e = np.zeros((B, k))
    hits = [(np.zeros(B, dtype=bool), np.zeros((B, k)), np.zeros(B, dtype=np.int64)) for _ in tiers]
    for t in range(1, steps + 2):
        d, a, viol = _direction(u0 + e, p, onehot, defender, c1=c1, c2=c2, c3=c3, step=step)
        kept = viol.sum(axis=1) == 0
        for v, (got, e_v, t_v) in zip(tiers, hits, strict=True):
            ok = kept & (a0 * a <= 0.0 if v == "sign" else np.abs(a) <= margin)
            now = (ok & ~accepted & ~got) if freeze else (ok if t == steps + 1 else np.zeros(B, dtype=bool))
            e_v[now], t_v[now] = e[now], t
            got |= now
        if t == steps + 1:
            break
        if forced is not None:
            d = np.where(forced[:, None], 1.0 - 2.0 * onehot, d)
        e = e - lr[:, None] * d
    return hits


def _guard(z: np.ndarray, defender: DefenderWeights, *, rounds: int, steps: int, c1: float, c2: float, c3: float,
           lr: float, schedule: str, validator: str, margin: float, release_prob: float, seed: int,
           c3_max: float, step: str, lr_growth: float, sharpen_lr: float, sharpen_margin: float,
           release_bits: int) -> GuardResult:
    """The body of :func:`guard_reference` on validated float64 logits z (B, k)."""
    B, k = z.shape
    u0 = z - z.max(axis=1, keepdims=True)
    labels = z.argmax(axis=1)
    onehot = np.zeros((B, k))
    onehot[np.arange(B), labels] = 1.0
    if step == "sign":  # the ratio floor of the parties (RATIO_FLOOR): e^(u0_j) + 2^-30 for every j != l
        u0 = np.log(np.exp(u0) + RATIO_FLOOR * (1.0 - onehot))
    p = softmax(u0)
    a0 = defender.score(p)

    e_star = np.zeros((B, k))
    accepted = np.zeros(B, dtype=bool)
    acc_round = np.zeros(B, dtype=np.int64)
    acc_step = np.zeros(B, dtype=np.int64)
    opts = dict(c1=c1, c2=c2, margin=margin, step=step)
    if schedule == "parallel":
        # the R rounds as R independent candidates in one batch: round r starts from e = 0 with c3 and
        # lr growth^(r-1) -- what the sequential freeze schedule runs in every round before a query's first
        # success -- and the query keeps the first success in (round, step) order: freeze's output. "hybrid":
        # the first success of the sign test in that order; failing that, the first of the margin test.
        tiers = ("sign", "margin") if validator == "hybrid" else (validator,)
        # sharpen_lr > 0: one more block (round R + 1) with the fixed sharpening direction, its margin test at
        # sharpen_margin; it comes after every search candidate, its tiers in reverse order (:func:`candidate_order`)
        blocks = rounds + (1 if sharpen_lr > 0 else 0)
        tile = lambda x: np.concatenate([x] * blocks)  # noqa: E731
        lrs = np.repeat(np.append(lr * lr_growth ** np.arange(rounds), [sharpen_lr] * (blocks - rounds)), B)
        forced = np.repeat(np.arange(blocks) >= rounds, B)
        margins = np.where(forced, sharpen_margin, margin)
        hits = _descend(tile(u0), tile(p), tile(onehot), tile(a0), defender, steps=steps, lr=lrs,
                        c3=np.full(B * blocks, float(c3)), freeze=True, tiers=tiers,
                        accepted=np.zeros(B * blocks, dtype=bool), forced=forced if blocks > rounds else None,
                        **{**opts, "margin": margins})
        for tier, r in candidate_order(tiers, rounds, blocks > rounds):
            got, e_v, t_v = hits[tier]
            rows = slice(r * B, (r + 1) * B)
            now = got[rows] & ~accepted
            e_star[now], acc_step[now], acc_round[now] = e_v[rows][now], t_v[rows][now], r + 1
            accepted |= now
    else:
        c3_q = np.full(B, float(c3))
        lr_q = np.full(B, float(lr))
        for r in range(1, rounds + 1):
            ((found, e_take, t_take),) = _descend(u0, p, onehot, a0, defender, steps=steps, lr=lr_q, c3=c3_q,
                                                  freeze=schedule == "freeze", tiers=(validator,),
                                                  accepted=accepted, **opts)
            e_star[found], acc_step[found], acc_round[found] = e_take[found], t_take[found], r
            accepted |= found
            c3_q = np.where(found, np.minimum(10.0 * c3_q, c3_max), c3_q)  # capped for fixed-point headroom
            lr_q = np.where(found, lr_q, lr_growth * lr_q)

    guarded = quantize_release(softmax(u0 + e_star), labels, release_bits)
    released = np.random.default_rng(seed).random(B) < release_prob  # plaintext phase II, not MPC
    out = np.where(released[:, None], guarded, quantize_release(p, labels, release_bits))
    return GuardResult(probs=out, guarded=guarded, noise=e_star, plain=p, labels=labels, accepted=accepted,
                       accept_round=acc_round, accept_step=acc_step, released=released, a0=a0,
                       a_final=defender.score(out), distortion=np.abs(out - p).sum(axis=1))


def plaintext_memguard(logits: np.ndarray, defender: DefenderWeights, **options: Any) -> GuardResult:
    """MemGuard without MPC, for the audit: :func:`guard_reference` on plaintext logits (same options)."""
    return guard_reference(logits, defender, **options)
