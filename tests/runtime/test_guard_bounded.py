"""The parallel guard with its bounded sign tests (docs/guard.md, "Sign tests on fewer bits"): the rounds the
cost model gives and the transport counts, the public bounds the guard pass derives, and that they hold."""

import math

import numpy as np
import pytest
import torch

import siguard.runtime.kernels.guard as guard_module
from siguard.core.config import GuardConfig
from siguard.passes.guard import activation_bound_bits, guard_bounds
from siguard.privacy.defender import DefenderWeights
from siguard.runtime.kernels.cost import CostEngine, MetaShares, _meta
from siguard.runtime.kernels.guard import (
    _goldschmidt_iterations,
    _ratio_sum_bound,
    _recip_goldschmidt,
    _SignBounds,
    guard_phases,
    secure_guard,
)
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.ring import decode, encode


def defender(k: int = 10, seed: int = 0, scale: float = 1.0) -> DefenderWeights:
    g = np.random.default_rng(seed)
    r = lambda *s, sd=0.1: g.normal(0, sd * scale, s)  # noqa: E731
    return DefenderWeights(W1=r(128, k, sd=0.3), b1=r(128), W2=r(64, 128), b2=r(64), w3=r(1, 64, sd=0.2), b3=r(1))


def weights(d: DefenderWeights) -> list[np.ndarray]:
    return [d.W1.T, d.b1, d.W2.T, d.b2, d.w3.T, d.b3]


def cost_of(cfg: GuardConfig, batch: int = 1, k: int = 10) -> tuple[dict, dict]:
    e = CostEngine()
    e.guard_marks = []
    shapes = [(k, 128), (128,), (128, 64), (64,), (64, 1), (1,)]
    secure_guard(e, MetaShares(_meta((batch, k))), *[MetaShares(_meta(s)) for s in shapes], config=cfg)
    return e.total, guard_phases(e.guard_marks)


def test_default_guard_rounds_with_the_bounds_and_without():
    cfg = GuardConfig.for_schedule(**guard_bounds(defender(), GuardConfig()))
    total, ph = cost_of(cfg)
    assert (ph["once"]["rounds"], ph["per_iteration"]["rounds"], ph["final"]["rounds"]) == (64, 38, 46)
    assert total["rounds"] == 64 + 25 * 38 + 46 == 1060
    # the module docstring and docs/guard.md say so
    assert "costs 38 rounds" in guard_module.__doc__ and "64 + 38 T + 46" in guard_module.__doc__
    assert "(1,060 at the default 10 x 25" in guard_module.__doc__
    doc = guard_module._guard_parallel.__doc__.split("Rounds per step")[1]
    assert "38. Final" in doc and ": 46." in doc
    # the release's rounding alone: 10 rounds, as its docstring says
    assert "= 10" in guard_module.quantize_release.__doc__
    bounds = guard_bounds(defender(), GuardConfig())
    _, full = cost_of(GuardConfig.for_schedule(release_bits=0, **bounds))
    assert ph["final"]["rounds"] - full["final"]["rounds"] == 10
    # the sharpening round costs no round (its direction tests read public operands), only bytes
    no_sharpen, _ = cost_of(GuardConfig.for_schedule(sharpen_lr=0.0, **bounds))
    assert no_sharpen["rounds"] == total["rounds"]
    assert max(no_sharpen["bytes_per_party"]) < max(total["bytes_per_party"])
    # a configuration without the activation bounds keeps 64-bit tests of the layers and the score
    total, ph = cost_of(GuardConfig.for_schedule())
    assert ph["per_iteration"]["rounds"] == 1 + 8 + 2 + 1 + 8 + 2 + 8 + 7 + 2 + 2 == 41
    assert ph["final"]["rounds"] == 1 + 8 + 2 + 1 + 8 + 2 + 8 + 9 + 10 == 49
    # the sign validator alone: 11 blocks (the sharpening round's included), a prefix OR of 4 rounds in the last
    # steps' selection, then the release's rounding
    total, ph = cost_of(GuardConfig.for_schedule(validator="sign", **guard_bounds(defender(), GuardConfig())))
    assert (ph["per_iteration"]["rounds"], ph["final"]["rounds"]) == (38, 35 + 10)


@pytest.mark.parametrize("bounded", [True, False])
def test_guard_rounds_and_bytes_equal_the_transport_count(bounded):
    d = defender(seed=3)
    ws = weights(d)
    z = np.random.default_rng(2).normal(0, 3, (2, 10))
    cfg = GuardConfig.for_schedule(rounds=2, steps=2, **(guard_bounds(d, GuardConfig()) if bounded else {}))
    want, _ = cost_of(cfg, batch=2)

    def party(e):
        shared = [e.input("model", encode(w, 16) if e.party == 0 else None, w.shape) for w in ws]
        x = e.input("P1", encode(z, 16) if e.party == 1 else None, z.shape)
        with e.transport.step("guard"):
            out = secure_guard(e, x, *shared, config=cfg)
        return e.reveal(out, "P0")

    res, _, stats = run_threads(party, None, timeout=120, scheduler="lockstep")
    assert {stats[p]["guard"].rounds for p in range(3)} == {want["rounds"]}
    assert [stats[p]["guard"].payload_bytes for p in range(3)] == want["bytes_per_party"]
    plain = secure_guard(PlainEngine(), Clear(encode(z, 16)), *[Clear(encode(w, 16)) for w in ws], config=cfg)
    assert np.abs(decode(res[0], 16) - decode(plain.v, 16)).max() < 1e-3


def test_activation_bounds_hold_for_every_probability_vector():
    for seed, scale in ((0, 1.0), (1, 3.0), (2, 0.2)):
        d = defender(seed=seed, scale=scale)
        b1, b2, b3 = activation_bound_bits(d)
        g = np.random.default_rng(seed)
        q = np.concatenate([g.dirichlet(np.full(10, 0.1), 20000), np.eye(10)])  # spread and the corners
        pre1 = q @ d.W1.T + d.b1
        pre2 = np.maximum(pre1, 0) @ d.W2.T + d.b2
        a = np.maximum(pre2, 0) @ d.w3.T + d.b3
        assert np.abs(pre1).max() < 2.0**b1 and np.abs(pre2).max() < 2.0**b2 and np.abs(a).max() < 2.0**b3
        # and they are not loose by more than a few bits (the corners reach the first layer's)
        assert np.abs(pre1).max() >= 2.0 ** (b1 - 2)


def test_a_hand_computed_bound():
    d = defender()
    d.W1[:] = 0.0
    d.b1[:] = 0.0
    d.W1[0, 3] = 1.5  # unit 0 in [0, 1.5] over the simplex
    d.b1[1] = -0.7
    b1, b2, b3 = activation_bound_bits(d)
    assert b1 == 1  # 1.5 * 1.02 + 2^-8 < 2
    assert guard_bounds(d, GuardConfig())["h1_bound_bits"] == b1


@pytest.mark.parametrize("gap", [3.0, 12.0, 30.0])
def test_the_sign_tests_stay_inside_their_bounds(gap):
    """Queries from confident to flat (and exact ties), on the fixed-point reference: no bounded test ever sees a
    value outside its declared bound (PlainEngine counts them), with room to spare."""
    d = defender(seed=5)
    g = np.random.default_rng(7)
    z = g.normal(0, gap / 3, (24, 10))
    z[:4, 1] = z[:4, 0] = z[:4].max(1)  # ties with the top logit
    z[4:8] = 0.0  # all equal
    cfg = GuardConfig.for_schedule(rounds=4, steps=10, lr=0.3, **guard_bounds(d, GuardConfig()))
    e = PlainEngine()
    out = decode(secure_guard(e, Clear(encode(z, 16)), *[Clear(encode(w, 16)) for w in weights(d)], config=cfg).v, 16)
    assert e.bound_violations == 0
    assert 0.0 < e.bound_peak <= 0.51  # the direction test's hinge term is half its bound; the others far less
    assert np.allclose(out.sum(1), 1.0, atol=5e-3)


def test_sign_bounds_and_bands_at_the_default():
    cfg = GuardConfig.for_schedule(grad_bound_bits=8, h1_bound_bits=2, h2_bound_bits=2, score_bound_bits=4)
    sb = _SignBounds(cfg, 10, 16)
    assert sb.layer1 == (56, 25) and sb.layer2 == (40, 9) and sb.score == (42, 11)
    # S at scale 45 (s_shift 3): |S| < 2^60, the hinge at 2^61, 63 bits
    assert sb.s_bits == 60 and sb.hinge_bit == 61 and sb.direction == (63, 32)
    # every band is a tiny fraction of its bound
    for m, drop in (sb.layer1, sb.layer2, sb.score, sb.direction):
        assert drop + 1 <= m - 29
    none = _SignBounds(GuardConfig.for_schedule(), 10, 16)
    assert none.layer1_exact and none.layer2 is None and none.score is None


def test_goldschmidt_reciprocal_on_the_guard_range():
    hi = _ratio_sum_bound(GuardConfig(), 10)
    assert 23 < hi < 24 and _goldschmidt_iterations(1.0, hi) == 6
    x = torch.linspace(1.0, hi, 2001, dtype=torch.float64)
    e = PlainEngine()
    y = _recip_goldschmidt(e, Clear(encode(x.numpy(), 16)), 1.0, hi, 20)
    xr = decode(encode(x.numpy(), 16), 16)
    err = np.abs(decode(y.v, 20) - 1.0 / xr)  # at most two ulps of the output scale 2^-20
    assert err.max() < 2.0**-19, err.max()
    c = CostEngine()
    _recip_goldschmidt(c, MetaShares(_meta((5, 1))), 1.0, hi, 20)
    assert c.total["rounds"] == 2 + 3 + 3 * 6 == 23
    assert math.isclose(hi, 10 * math.exp(2 * GuardConfig().lr_max) * 1.02)


def test_step_constants_halve_exactly_and_stay_within_an_ulp():
    """The update r (U x + V y) = ((U + V) / 2) r (b_j xor b_l) + ((U - V) / 2) (r b_j - r b_l) needs U + V even."""
    from siguard.runtime.kernels.guard import _step_constants

    cfg = GuardConfig()
    for lr in [cfg.lr * cfg.lr_growth**i for i in range(cfg.rounds)] + [0.001, 0.5, 1.0]:
        hs, hd = _step_constants(lr, 16)
        U, V = hs + hd, hs - hd
        assert abs(U - (math.exp(2 * lr) - 1) * 2**16) <= 1.0 and abs(V - (math.exp(-2 * lr) - 1) * 2**16) <= 1.0
        for bj in (0, 1):
            for bl in (0, 1):  # the factor of every case: e^(2 lr), e^(-2 lr) or 1
                factor = 2**16 + hs * (bj ^ bl) + hd * (bj - bl)
                assert factor == 2**16 + (U if (bj, bl) == (1, 0) else V if (bj, bl) == (0, 1) else 0)
