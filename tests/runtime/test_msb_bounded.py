"""The bounded sign test: msb(x, bits=m, drop=d) for a value with the PUBLIC bound |x| < 2^(m-1).

Each share component drops its d low bits locally, the carry-out tree runs on the w = m - d + 1 bits
left (w = m for d = 0), packed as 64 / 2^ceil(log2 w) lanes per word: 2 + ceil(log2 w) rounds
(docs/protocols.md §5a). Exact for x < 0 and x >= 2^(d+1); x in [0, 2^(d+1)) may read negative.
"""

import pytest
import torch

from siguard.runtime.kernels.approx import msb_many, msb_many_with
from siguard.runtime.kernels.cost import CostEngine
from siguard.runtime.kernels.engine import msb_layout, sign_bound
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.mpc.inprocess import run_threads
from tests.runtime.test_cost import check
from tests.runtime.test_rss import open_at_p0

#: (bits, drop): widths 32 (7 rounds), 16 (6), 6 (5), 3 (4); d = 0 (exact, no band); the largest m with a drop
CASES = [(40, 9), (56, 25), (20, 0), (17, 2), (63, 32), (10, 5), (3, 1), (32, 0)]


def values(m: int, d: int, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Uniform values inside the bound, then its edges, 0, +-1 and both sides of the band's ends."""
    half = 1 << (m - 1)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(-half, half, (n,), generator=g, dtype=torch.int64)
    band = 1 << (d + 1)
    edges = [half - 1, -half, -half + 1, 0, 1, -1, band - 1, band, band + 1, -band, 1 << d, (1 << d) - 1]
    edges = [v for v in edges if -half <= v < half]
    return torch.cat([rand, torch.tensor(edges, dtype=torch.int64)])


def secure_bits(x: torch.Tensor, m: int, d: int, scheduler: str = "threads", owner: str = "client") -> torch.Tensor:
    def party(e):
        X = e.input(owner, x if e.party == 0 else None, tuple(x.shape))
        return open_at_p0(e, e.msb(X, m, d))

    def client(c):
        c.share_input(x)

    results, _, _ = run_threads(party, client if owner == "client" else None, timeout=60, scheduler=scheduler)
    return results[0]


def in_band(x: torch.Tensor, d: int) -> torch.Tensor:
    return (x >= 0) & (x < (1 << (d + 1))) if d else torch.zeros_like(x, dtype=torch.bool)


@pytest.mark.parametrize("m,d", CASES)
def test_bounded_msb_is_the_sign_outside_the_band(m, d):
    x = values(m, d, seed=m * 64 + d)
    truth = (x < 0).long()
    got = secure_bits(x, m, d)
    band = in_band(x, d)
    assert torch.equal(got[~band], truth[~band]), int((got != truth)[~band].sum())
    # the reference engine: the secure result with carry 0, i.e. the exact sign inside the bound
    plain = PlainEngine()
    assert torch.equal(plain.msb(Clear(x), m, d).v, truth)
    assert plain.bound_violations == 0 and plain.bound_peak <= 1.0


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
@pytest.mark.parametrize("owner", ["client", "model"])
def test_bounded_msb_in_both_schedulers_and_sharings(scheduler, owner):
    m, d = 48, 17  # w = 32
    x = values(m, d, n=2000, seed=3)
    got = secure_bits(x, m, d, scheduler, owner)
    band = in_band(x, d)
    assert torch.equal(got[~band], (x < 0).long()[~band])


def test_the_band_is_where_the_carry_of_the_dropped_bits_lands():
    """Inside [0, 2^(d+1)) the result depends on the shares (c in {0, 1, 2}): both outcomes occur, and
    values in [2^d, 2^(d+1)) read negative only when c = 2 (rarer than below 2^d)."""
    m, d = 30, 8
    x = torch.arange(0, 1 << (d + 1), dtype=torch.int64).repeat(8)
    got = secure_bits(x, m, d)
    low, high = got[x < (1 << d)].float().mean(), got[x >= (1 << d)].float().mean()
    assert 0.0 < high < low < 1.0, (low, high)
    # just outside the band: exact
    edge = torch.tensor([-1, -2, 1 << (d + 1), (1 << (d + 1)) + 1] * 500, dtype=torch.int64)
    assert torch.equal(secure_bits(edge, m, d), (edge < 0).long())


def test_a_value_outside_the_bound_breaks_it():
    """The bound is what makes the test sound: a value of magnitude >= 2^m wraps around the w kept bits
    and reads with the wrong sign in the secure engine and in the reference (which counts the violation)."""
    m, d = 40, 9
    bad = torch.tensor([(1 << m) + (1 << (d + 2)), -(1 << m) - (1 << (d + 2))] * 50, dtype=torch.int64)
    got = secure_bits(bad, m, d)
    assert torch.equal(got, 1 - (bad < 0).long())  # every one wrong
    plain = PlainEngine()
    assert torch.equal(plain.msb(Clear(bad), m, d).v, got)
    assert plain.bound_violations == bad.numel() and plain.bound_peak > 1.0
    # the exact 64-bit test of the same values is right
    assert torch.equal(plain.msb(Clear(bad)).v, (bad < 0).long())


def test_layout_rounds_and_fallback():
    assert msb_layout(None) is None
    assert msb_layout(64) is None  # no bound worth having: the 64-bit test
    assert msb_layout(40, 2) is None  # w = 39 > 32: the exact test costs the same 8 rounds
    assert msb_layout(56, 25) == (32, 5, 2)
    assert msb_layout(33, 18) == (16, 4, 4)
    assert msb_layout(20, 0) == (20, 5, 2)
    assert sign_bound(56) == (56, 25) and sign_bound(20) == (20, 0) and sign_bound(40, 16) == (40, 25)
    for bad in [(1, 0), (65, 0), (64, 3), (10, 10), (10, -1)]:
        with pytest.raises(ValueError):
            msb_layout(*bad)


@pytest.mark.parametrize("m,d,n", [(56, 25, 7), (56, 25, 8), (33, 18, 13), (10, 5, 17), (3, 1, 1), (40, 2, 5)])
def test_bounded_msb_rounds_and_bytes_equal_the_cost_model(m, d, n):
    got = check(lambda e, x: e.msb(x, m, d), [(n,)])
    layout = msb_layout(m, d)
    if layout is None:
        assert got["rounds"] == 8 and got["bytes_per_party"] == [64 * n] * 3
    else:
        _, levels, lanes = layout
        assert got["rounds"] == 2 + levels
        assert got["bytes_per_party"] == [8 * (2 + levels) * -(-n // lanes)] * 3


def test_bounded_msb_in_parallel_and_msb_many_groups_equal_the_cost_model():
    def program(e, x, y):
        bits, (t,) = msb_many_with(e, [x, y, e.neg(x)], [(56, 25), None, (56, 25)], [(e.trunc, y, 16)])
        return bits, t

    got = check(program, [(3, 5), (4,)])
    assert got["rounds"] == 8  # the unbounded operand's 8 rounds; the bounded group rides along
    got = check(lambda e, x: msb_many(e, [x, e.neg(x)], [(56, 25), (40, 9)]), [(3, 5)])
    assert got["rounds"] == 7


def test_msb_many_with_bounds_values():
    a = values(56, 25, n=300, seed=5)
    b = values(40, 9, n=300, seed=6)[: a.numel()]

    def program(e, A, B):
        bits, (t,) = msb_many_with(e, [A, B, e.neg(B)], [(56, 25), (40, 9), (40, 9)], [(e.trunc, B, 4)])
        return [*bits, t]

    plain = program(PlainEngine(), Clear(a), Clear(b))

    def party(e):
        A = e.input("model", a if e.party == 0 else None, tuple(a.shape))
        B = e.input("model", b if e.party == 0 else None, tuple(b.shape))
        return [open_at_p0(e, v) for v in program(e, A, B)]

    results, _, _ = run_threads(party, None, timeout=60, scheduler="lockstep")
    got = results[0]
    for v, bits, d in ((a, got[0], 25), (b, got[1], 9), (-b, got[2], 9)):
        band = in_band(v, d)
        assert torch.equal(bits[~band], (v < 0).long()[~band])
    assert torch.equal(plain[0].v, (a < 0).long()) and torch.equal(plain[1].v, (b < 0).long())
    assert (got[3] - plain[3].v).abs().max() <= 1


def test_cost_engine_counts_bounded_msb():
    e = CostEngine()
    from siguard.runtime.kernels.cost import MetaShares, _meta

    e.msb(MetaShares(_meta((10, 148))), 56, 25)
    assert e.total["rounds"] == 7 and e.total["bytes_per_party"] == [8 * 7 * 740] * 3


def test_bounded_msb_views_do_not_depend_on_the_secret(monkeypatch):
    """Every word a server receives in the bounded test (majority, generate and tree rounds, two lanes per word)
    has the same distribution for a positive and a negative secret (test_security's criterion)."""
    from tests.runtime.test_security import ALPHA, record_views, same_distribution

    n, m, d = 20_000, 40, 9
    runs = []
    for secret in (1 << 30, -(1 << 30) + 12345):
        views = record_views(monkeypatch)
        x = torch.full((n,), secret, dtype=torch.int64)

        def party(e):
            X = e.input("client", None, (n,))
            with e.transport.step("compute"):
                e.msb(X, m, d)

        run_threads(party, lambda c, x=x: c.share_input(x), timeout=60)
        monkeypatch.undo()
        runs.append(views)
    for party in range(3):
        a = [v for v in runs[0][party] if v[0] == "compute"]
        b = [v for v in runs[1][party] if v[0] == "compute"]
        assert len(a) == len(b) == 7 and all(v[2].numel() == n // 2 for v in a)
        for k, ((_, peer, msg_a), (_, _, msg_b)) in enumerate(zip(a, b, strict=True)):
            p = same_distribution(msg_a, msg_b)
            assert p > ALPHA, f"P{party} message {k} from {peer} depends on the secret (p={p:.2g})"
