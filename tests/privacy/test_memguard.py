"""The plaintext guard reference: labels kept, acceptance sound, gradient exact, schedules as specified."""

from __future__ import annotations

import math

import numpy as np
import pytest

from siguard.privacy.defender import DefenderWeights
from siguard.privacy.memguard import guard_loss, guard_loss_gradient, guard_reference, quantize_release, softmax

K = 10


def random_defender(k: int = K, seed: int = 0) -> DefenderWeights:
    """A defender with random weights (He-scaled), so its scores straddle 0 on probability vectors."""
    rng = np.random.default_rng(seed)
    return DefenderWeights(W1=rng.normal(0, np.sqrt(2 / k), (128, k)) * 4, b1=rng.normal(0, 0.5, 128),
                           W2=rng.normal(0, np.sqrt(2 / 128), (64, 128)), b2=rng.normal(0, 0.1, 64),
                           w3=rng.normal(0, np.sqrt(2 / 64), (1, 64)), b3=np.array([0.0]))


@pytest.fixture(scope="module")
def defender() -> DefenderWeights:
    return random_defender()


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    """300 queries: confident, unsure and nearly tied logit vectors."""
    rng = np.random.default_rng(1)
    return rng.normal(0, 1, (300, K)) * rng.choice([0.3, 2.0, 6.0], size=(300, 1))


def literal_guard(z: np.ndarray, h: DefenderWeights, rounds: int, steps: int, c1: float, c2: float, c3: float,
                  lr: float, schedule: str, validator: str, margin: float) -> tuple[np.ndarray, bool]:
    """The algorithm written out for one query with scalar loops: an independent check of the vectorised one."""
    k = len(z)
    u0 = z - z.max()
    p = np.exp(u0) / np.exp(u0).sum()
    lab = int(np.argmax(z))
    a0 = float(h.score(p[None])[0])
    e_star, accepted = np.zeros(k), False
    for _ in range(rounds):
        e, found = np.zeros(k), False
        for t in range(1, steps + 2):
            u = u0 + e
            q = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
            pre1 = h.W1 @ q + h.b1
            r1 = np.maximum(pre1, 0)
            pre2 = h.W2 @ r1 + h.b2
            a = float(h.w3[0] @ np.maximum(pre2, 0) + h.b3[0])
            viol = np.array([1.0 if (j != lab and u[j] > u[lab]) else 0.0 for j in range(k)])
            valid = (a0 * a <= 0) if validator == "sign" else (abs(a) <= margin)
            ok = viol.sum() == 0 and valid
            if schedule == "freeze" and ok and not accepted:
                e_star, accepted, found = e.copy(), True, True
            if schedule == "paper" and t == steps + 1 and ok:
                e_star, accepted, found = e.copy(), True, True
            if t == steps + 1:
                break
            grad_h = h.W1.T @ ((pre1 >= 0) * (h.W2.T @ ((pre2 >= 0) * h.w3[0])))
            gq = c1 * (1.0 if a >= 0 else -1.0) * grad_h + c3 * np.where(q - p >= 0, 1.0, -1.0)
            g = np.array([q[j] * gq[j] - q[j] * float(q @ gq) for j in range(k)])
            g = g + c2 * (viol - (np.arange(k) == lab) * viol.sum())
            e = e - lr * g / np.sqrt(float(g @ g) + 1e-12)
        if found:
            c3 *= 10
        else:
            lr *= 1.1
    return e_star, accepted


@pytest.mark.parametrize("schedule,validator", [("freeze", "sign"), ("paper", "sign"), ("freeze", "margin")])
def test_vectorised_equals_literal_algorithm(defender, logits, schedule, validator):
    opts = dict(rounds=3, steps=7, c1=1.0, c2=10.0, c3=0.1, lr=0.4, schedule=schedule, validator=validator,
                margin=0.3)
    res = guard_reference(logits[:40], defender, **opts)
    for i in range(40):
        e_star, accepted = literal_guard(logits[i], defender, **opts)
        assert res.accepted[i] == accepted
        np.testing.assert_allclose(res.noise[i], e_star, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"schedule": "paper"}, {"validator": "margin"}, {"rounds": 1, "steps": 300},
                                     {"lr": 2.0, "c2": 0.1}])
def test_labels_are_preserved_and_acceptance_is_sound(defender, logits, options):
    res = guard_reference(logits, defender, **options)
    assert res.label_preserved.all()
    assert res.accepted.mean() > 0.2  # the test is not vacuous
    # every accepted noise keeps the label and passes the validator; unaccepted queries get no noise
    u = logits - logits.max(1, keepdims=True) + res.noise
    assert (u.argmax(1) == res.labels).all()
    a = defender.score(softmax(u))
    if options.get("validator", "sign") == "sign":
        assert (res.a0[res.accepted] * a[res.accepted] <= 0).all()
    else:
        assert (np.abs(a[res.accepted]) <= 0.5).all()
    assert not res.noise[~res.accepted].any()
    np.testing.assert_allclose(res.probs, res.guarded)  # release_prob = 1
    np.testing.assert_allclose(res.distortion, np.abs(res.probs - res.plain).sum(1))
    np.testing.assert_allclose(res.a_final, defender.score(res.probs))


def _fixed_sign_loss(u, p, onehot, h, s_a, s_qp, m1, m2, c1, c2, c3):
    """L with sgn(a), sgn(q - p) and the ReLU masks frozen: the function whose exact gradient the guard uses."""
    q = softmax(u)
    r1 = m1 * (q @ h.W1.T + h.b1)
    a = (m2 * (r1 @ h.W2.T + h.b2)) @ h.w3[0] + h.b3[0]
    u_l = (u * onehot).sum(1, keepdims=True)
    return c1 * s_a * a + c2 * np.maximum(u - u_l, 0).sum(1) + c3 * (s_qp * (q - p)).sum(1)


def test_gradient_matches_finite_differences(defender):
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (50, K))
    u0 = z - z.max(1, keepdims=True)
    p = softmax(u0)
    onehot = np.eye(K)[z.argmax(1)]
    e = rng.normal(0, 1.5, (50, K))  # some labels violated, so the hinge is active
    u = u0 + e
    c1, c2, c3 = 1.3, 10.0, np.linspace(0.05, 5, 50)  # per-query c3, as the schedule makes it
    g, q, a, viol = guard_loss_gradient(u, p, onehot, defender, c1=c1, c2=c2, c3=c3)
    assert viol.sum() > 0 and (viol.sum(1) == 0).any()
    _, m1, m2 = defender.forward(q)
    frozen = (defender, np.where(a >= 0, 1.0, -1.0), np.where(q - p >= 0, 1.0, -1.0), m1, m2, c1, c2, c3)
    # at the point itself, the loss with frozen signs and masks is the guard's loss
    np.testing.assert_allclose(_fixed_sign_loss(u, p, onehot, *frozen),
                               guard_loss(u, p, onehot, defender, c1=c1, c2=c2, c3=c3), rtol=1e-12)
    h = 1e-6
    fd = np.zeros_like(u)
    for j in range(K):
        d = np.zeros_like(u)
        d[:, j] = h
        fd[:, j] = (_fixed_sign_loss(u + d, p, onehot, *frozen) - _fixed_sign_loss(u - d, p, onehot, *frozen)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)


def test_freeze_keeps_the_first_success(defender, logits):
    one = guard_reference(logits, defender, rounds=1)
    six = guard_reference(logits, defender, rounds=6)
    first = one.accepted
    assert first.any() and (six.accepted >= first).all()
    np.testing.assert_array_equal(six.noise[first], one.noise[first])
    assert (six.accept_round[first] == 1).all()
    # acceptance may happen at any step, including at t = 1 (e = 0) only if a0 already passes
    assert six.accept_step[six.accepted].min() >= 1 and six.accept_step.max() <= 50


def test_paper_overwrites_with_the_last_success(defender, logits):
    runs = {r: guard_reference(logits, defender, rounds=r, schedule="paper") for r in range(1, 7)}
    six = runs[6]
    assert set(np.unique(six.accept_step)) <= {0, 50}  # tested only after the inner loop
    for i in np.flatnonzero(six.accepted):
        r = six.accept_round[i]
        np.testing.assert_array_equal(six.noise[i], runs[r].noise[i])  # e* is the iterate of its last success
    overwritten = runs[1].accepted & (six.accept_round > 1)
    assert overwritten.any()
    assert not np.allclose(six.noise[overwritten], runs[1].noise[overwritten])


def test_freeze_accepts_at_least_what_paper_does_at_the_same_step(defender, logits):
    paper = guard_reference(logits, defender, schedule="paper")
    freeze = guard_reference(logits, defender, schedule="freeze")
    assert freeze.accepted.sum() >= paper.accepted[paper.accept_round == 1].sum()


def test_release_probability_is_seeded_phase_two(defender, logits):
    full = guard_reference(logits, defender)
    none = guard_reference(logits, defender, release_prob=0.0)
    np.testing.assert_array_equal(none.probs, none.plain)
    assert not none.released.any() and (none.distortion == 0).all()
    half = guard_reference(logits, defender, release_prob=0.5, seed=3)
    assert 0.35 < half.released.mean() < 0.65
    np.testing.assert_array_equal(half.probs[half.released], full.guarded[half.released])
    np.testing.assert_array_equal(half.probs[~half.released], full.plain[~half.released])
    np.testing.assert_array_equal(half.released, guard_reference(logits, defender, release_prob=0.5, seed=3).released)


def test_ties_take_the_lowest_index_and_bad_options_fail(defender):
    res = guard_reference(np.array([[1.0, 3.0, 3.0] + [0.0] * (K - 3)]), defender, rounds=1, steps=3)
    assert res.labels[0] == 1 and res.label_preserved[0]
    with pytest.raises(ValueError, match="schedule"):
        guard_reference(np.zeros((1, K)), defender, schedule="eager")
    with pytest.raises(ValueError, match="validator"):
        guard_reference(np.zeros((1, K)), defender, validator="both")
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        guard_reference(np.zeros((2, 3)), defender)


# ---- the parallel schedule with sign steps (the default) -------------------------------------------------
def literal_parallel(z: np.ndarray, h: DefenderWeights, rounds: int, steps: int, c1: float, c3: float, lr: float,
                     growth: float, validator: str, margin: float, sharpen_lr: float = 0.0,
                     sharpen_margin: float = 0.5) -> tuple[np.ndarray, bool]:
    """The parallel schedule for one query with scalar loops: every round r from e = 0 with lr growth^r, sign
    steps (the hinge's sign first; sign tests in ratio space, "negative" below -2^-14), the first success in
    (round, step) order; "hybrid": the first decision flip in that order, else the first |a| <= margin. With
    ``sharpen_lr``, one more round whose every step moves the label's logit up by sharpen_lr and every other down
    by as much, taken only where no round succeeds: its first step with |a| <= sharpen_margin, else its first flip."""
    k = len(z)
    lab = int(np.argmax(z))
    u0 = np.log(np.exp(z - z.max()) + 2.0**-30 * (np.arange(k) != lab))  # ratios start at least 2^-30
    p = np.exp(u0) / np.exp(u0).sum()
    a0 = float(h.score(p[None])[0])
    tiers = ["sign", "margin"] if validator == "hybrid" else [validator]
    first: dict[str, np.ndarray | None] = {v: None for v in tiers}
    sharp: dict[str, np.ndarray | None] = {v: None for v in tiers}
    tie = 2.0**-14
    r0 = np.exp(u0 - u0[lab])
    for r in range(rounds + (1 if sharpen_lr else 0)):
        e = np.zeros(k)
        for t in range(1, steps + 2):
            u = u0 + e
            q = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
            pre1 = h.W1 @ q + h.b1
            pre2 = h.W2 @ np.maximum(pre1, 0) + h.b2
            a = float(h.w3[0] @ np.maximum(pre2, 0) + h.b3[0])
            viol = [1.0 if (j != lab and u[j] > u[lab]) else 0.0 for j in range(k)]
            for v in tiers:
                found = sharp if r == rounds else first
                valid = (a0 * a <= 0) if v == "sign" else (abs(a) <= (sharpen_margin if r == rounds else margin))
                if sum(viol) == 0 and valid and found[v] is None:
                    found[v] = e.copy()
            if t == steps + 1:
                break
            grad_h = h.W1.T @ ((pre1 >= 0) * (h.W2.T @ ((pre2 >= 0) * h.w3[0])))
            ratio = np.exp(u - u[lab])  # ratios to the label
            sig = [-1.0 if ratio[i] * r0.sum() - r0[i] * ratio.sum() < -tie else 1.0 for i in range(k)]  # sgn(q - p)
            gq = [c1 * (1.0 if a >= 0 else -1.0) * grad_h[i] + c3 * sig[i] for i in range(k)]
            d = np.zeros(k)
            for i in range(k):
                hinge = viol[i] if i != lab else -sum(viol)
                s = sum(ratio[j] * (gq[i] - gq[j]) for j in range(k))
                d[i] = np.sign(hinge) if hinge != 0 else (-1.0 if s < -tie else 1.0)
            if r == rounds:  # the sharpening round
                e = e + sharpen_lr * np.array([1.0 if j == lab else -1.0 for j in range(k)])
            else:
                e = e - lr * growth**r * d
    for e in [first[v] for v in tiers] + [sharp[v] for v in reversed(tiers)]:
        if e is not None:
            return e, True
    return np.zeros(k), False


@pytest.mark.parametrize("validator", ["sign", "margin", "hybrid"])
def test_parallel_sign_steps_equal_literal_algorithm(defender, logits, validator):
    opts = dict(rounds=3, steps=6, c1=1.0, c3=0.1, lr=0.15, validator=validator, margin=0.3)
    res = guard_reference(logits[:60], defender, schedule="parallel", step="sign", lr_growth=1.4, **opts)
    assert res.accepted.any() and not res.accepted.all()
    for i in range(60):
        e, acc = literal_parallel(logits[i], defender, growth=1.4, **opts)
        assert acc == res.accepted[i]
        np.testing.assert_allclose(res.noise[i], e, atol=1e-12)
    assert res.label_preserved.all()


@pytest.mark.parametrize("validator", ["sign", "margin"])
def test_parallel_schedule_gives_the_sequential_freeze_output(defender, logits, validator):
    """Every round before a query's first success has failed, so the rounds as independent candidates give
    freeze's output exactly (c3 grows only after a success, which freeze never uses again)."""
    opts = dict(rounds=4, steps=9, lr=0.3, lr_growth=1.2, validator=validator, margin=0.3, step="l2")
    par = guard_reference(logits, defender, schedule="parallel", **opts)
    seq = guard_reference(logits, defender, schedule="freeze", **opts)
    assert seq.accepted.any() and (seq.accept_round > 1).any()
    np.testing.assert_array_equal(par.accepted, seq.accepted)
    np.testing.assert_array_equal(par.accept_round, seq.accept_round)
    np.testing.assert_allclose(par.guarded, seq.guarded, atol=1e-15)


def test_sign_steps_move_every_logit_by_the_learning_rate(defender, logits):
    res = guard_reference(logits, defender, schedule="parallel", step="sign", rounds=1, steps=3, lr=0.25)
    moved = res.accepted & (res.accept_step > 1)
    assert moved.any()
    gaps = np.abs(res.noise[moved])  # after s steps every |e_i| is a multiple of lr up to s lr
    steps = (res.accept_step[moved] - 1)[:, None]
    assert np.allclose(gaps / 0.25, np.round(gaps / 0.25)) and (gaps <= steps * 0.25 + 1e-12).all()
    assert np.allclose(np.abs(res.noise[res.accepted & (res.accept_step == 2)]), 0.25)


def test_hybrid_prefers_a_flipped_decision(defender, logits):
    opts = dict(schedule="parallel", step="sign", rounds=3, steps=8, lr=0.1)
    sign = guard_reference(logits, defender, validator="sign", **opts)
    hybrid = guard_reference(logits, defender, validator="hybrid", margin=0.3, **opts)
    np.testing.assert_array_equal(hybrid.noise[sign.accepted], sign.noise[sign.accepted])
    assert (hybrid.accepted >= sign.accepted).all() and hybrid.accepted.sum() > sign.accepted.sum()
    with pytest.raises(ValueError, match="hybrid validator needs the parallel schedule"):
        guard_reference(logits, defender, validator="hybrid")


def literal_rounding(q: np.ndarray, label: int, bits: int) -> np.ndarray:
    """The release's rounding for one vector, written out: floor to the 2^-bits grid, the rest to the label."""
    out = [math.floor(v * 2**bits) / 2**bits if j != label else 0.0 for j, v in enumerate(q)]
    out[label] = 1.0 - sum(out)
    return np.array(out)


@pytest.mark.parametrize("validator", ["sign", "hybrid"])
def test_sharpening_round_and_rounded_release_equal_literal_algorithm(defender, logits, validator):
    """The default's two additions: the sharpening round (after every search candidate) and the rounding."""
    opts = dict(rounds=2, steps=6, c1=1.0, c3=0.1, lr=0.1, validator=validator, margin=0.2)
    res = guard_reference(logits, defender, schedule="parallel", step="sign", lr_growth=1.3, sharpen_lr=0.3,
                          sharpen_margin=0.6, release_bits=5, **opts)
    sharpened = res.accept_round == opts["rounds"] + 1
    assert sharpened.any() and res.accepted.sum() > sharpened.sum()
    u0 = np.log(np.exp(logits - logits.max(1, keepdims=True)) + 2.0**-30 * (np.arange(K) != logits.argmax(1)[:, None]))
    for i in range(len(logits)):
        e, acc = literal_parallel(logits[i], defender, growth=1.3, sharpen_lr=0.3, sharpen_margin=0.6, **opts)
        assert acc == res.accepted[i]
        np.testing.assert_allclose(res.noise[i], e, atol=1e-12)
        released = literal_rounding(softmax(u0[i:i + 1] + e)[0], int(np.argmax(logits[i])), 5)
        np.testing.assert_allclose(res.guarded[i], released, atol=1e-12)
    # a sharpened query: the label's gap grew by 2 sharpen_lr per step, and the defender's test passes there
    lab = logits.argmax(1)
    noise = res.noise[sharpened]
    steps = noise[np.arange(len(noise)), lab[sharpened]] / 0.3
    # (0 steps: p itself within the sharpening round's wider margin, where no search candidate succeeded)
    assert np.allclose(steps, np.round(steps)) and (steps >= 0).all() and (steps >= 1).any()
    assert np.allclose(noise, (2 * (np.arange(K) == lab[sharpened][:, None]) - 1) * 0.3 * steps[:, None])
    a = defender.score(softmax(u0[sharpened] + noise))
    assert ((res.a0[sharpened] * a <= 0) | (np.abs(a) <= 0.6)).all()


def test_the_rounded_release_keeps_the_label_and_sums_to_one():
    rng = np.random.default_rng(3)
    q = softmax(rng.normal(0, 1, (500, K)) * rng.choice([0.3, 3.0, 9.0], size=(500, 1)))
    labels = q.argmax(1)
    for bits in (1, 4, 7):
        out = quantize_release(q, labels, bits)
        assert np.allclose(out.sum(1), 1.0, atol=1e-12)
        assert (out.argmax(1) == labels).all() and (np.sort(out, 1)[:, -2] < out.max(1)).all()  # a strict top-1
        others = np.arange(K) != labels[:, None]
        assert (out[others] <= q[others]).all() and (out[others] > q[others] - 2.0**-bits).all()
        for i in range(0, 500, 50):
            np.testing.assert_allclose(out[i], literal_rounding(q[i], int(labels[i]), bits), atol=1e-12)
    assert quantize_release(q, labels, 0) is q


def test_the_sweeps_default_is_the_products_default():
    """benchmarks/guard_adaptive_sweep.py audits "default": it must be the configuration a compiled plan runs."""
    import importlib.util
    from pathlib import Path

    from siguard.core.config import GuardConfig

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "guard_adaptive_sweep.py"
    spec = importlib.util.spec_from_file_location("guard_adaptive_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    product = GuardConfig().oracle_options()
    assert {k: product[k] for k in module.CONFIGS["default"]} == module.CONFIGS["default"]
