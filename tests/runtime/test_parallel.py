"""Engine.parallel: independent msb/trunc calls share rounds (rounds = the longest call, bytes add), give
the same values as one after the other, and the cost model counts it the same way as the transport."""

import pytest
import torch

from siguard.runtime.kernels.cost import CostEngine
from siguard.runtime.kernels.nonlinear import relu
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.mpc.inprocess import PartyFailure, run_threads
from tests.runtime.test_cost import check
from tests.runtime.test_rss import compare, open_at_p0, rand_words, with_edges


def _calls(e, x, y):
    """Independent calls of different lengths: msb 8, trunc 2, trunc 2 (another input and shift)."""
    return [(e.msb, x), (e.trunc, x, 16), (e.trunc, y, 5)]


def test_parallel_values_equal_the_plain_engine():
    x = with_edges(rand_words((3_000,), 2**61, 31))
    y = rand_words((3_000,), 2**40, 32)

    def program(e, X, Y):
        m, t, u = e.parallel(*_calls(e, X, Y))
        return [e.b2a(m), t, u]

    (m_want, m_got), (t_want, t_got), (u_want, u_got) = compare(program, x, y, exact=False)
    assert torch.equal(m_got, m_want) and torch.equal(m_got, (x < 0).to(torch.int64))
    assert torch.equal(t_want, x >> 16) and torch.equal(u_want, y >> 5)
    assert set((t_got - t_want).unique().tolist()) <= {0, -1}  # the secure truncation's own error
    assert set((u_got - u_want).unique().tolist()) <= {0, -1}


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_parallel_rounds_are_the_longest_call_and_bytes_add(scheduler):
    n = 50

    def counted(par):
        def party(e):
            x = e.input("model", torch.arange(n) - 20 if e.party == 0 else None, (n,))
            y = e.input("model", torch.arange(n) << 10 if e.party == 0 else None, (n,))
            with e.transport.step("op"):
                calls = _calls(e, x, y)
                out = e.parallel(*calls) if par else [c[0](*c[1:]) for c in calls]
            return open_at_p0(e, out[0]), open_at_p0(e, out[2])

        res, _, stats = run_threads(party, None, scheduler=scheduler, timeout=20)
        op = [stats[p]["op"] for p in range(3)]
        return res[0], {s.rounds for s in op}, [s.payload_bytes for s in op]

    (seq_m, seq_u), seq_rounds, seq_bytes = counted(False)
    (par_m, par_u), par_rounds, par_bytes = counted(True)
    assert seq_rounds == {8 + 2 + 2} and par_rounds == {8}
    assert par_bytes == seq_bytes
    assert torch.equal(par_m, seq_m) and torch.equal(par_m, (torch.arange(n) < 20).to(torch.int64))
    assert (par_u - (torch.arange(n) << 5)).abs().max() <= 1


def test_cost_model_counts_parallel_like_the_transport():
    def program(e, x, y):
        e.parallel(*_calls(e, x, y))
        e.parallel((e.msb, x))  # one call: nothing to merge

    got = check(program, [(6, 5), (6, 5)])
    assert got["rounds"] == 8 + 8


def test_parallel_takes_only_stepwise_primitives_of_the_same_engine():
    plain, other = PlainEngine(), PlainEngine()
    x = Clear(torch.arange(4))
    for bad in [(plain.mul, x, x), (other.msb, x), (lambda: None,)]:
        with pytest.raises(ValueError, match="msb, trunc"):
            plain.parallel(bad)
    cost = CostEngine()
    with pytest.raises(ValueError, match="msb, trunc"):
        cost.parallel((cost.mul, cost.input("model", None, (2,)), 3))

    def party(e):
        x = e.input("model", torch.arange(4) if e.party == 0 else None, (4,))
        e.parallel((e.trunc, x, 1), (e.bit_and, x, x))

    with pytest.raises(PartyFailure, match="msb, trunc"):
        run_threads(party, None, timeout=5)


def test_fused_relu_is_relu_of_the_truncation():
    x = with_edges(rand_words((4_000,), 2**50, 41), [0, -1, 1, (1 << 16) - 1, 1 << 16, -(1 << 16)])

    def program(e, X):
        return [relu(e, X, shift=16)]

    ((want, got),) = compare(program, x, exact=False)
    assert torch.equal(want, torch.clamp(x >> 16, min=0))  # plain: exact floor, then clipped
    assert (got - want).abs().max() <= 1
    cost = CostEngine()
    relu(cost, cost.input("model", None, (10,)), shift=16)
    assert cost.total["rounds"] == 1 + 10  # input + fused ReLU (unfused: trunc 2 + 10)


# ---- Engine.fork: arbitrary independent branches (products, comparisons, nested forks) share rounds ----

def _branches(e, x, y):
    """Branches of different kinds and lengths: mul + trunc (3), msb then mul_bit (10), a nested fork of
    b2a(msb) (10) and a matmul (1), and a branch without any round (local)."""
    def prod():
        return e.trunc(e.mul(x, y), 8)

    def select():
        return e.mul_bit(y, e.msb(x))

    def nested():
        column = e.local(lambda t: t.reshape(-1, 1), x)
        row = e.local(lambda t: t.reshape(1, -1), y)
        return e.fork(lambda: e.b2a(e.msb(y)), lambda: e.matmul(column, row))

    def local():
        return e.add(x, y)

    return [prod, select, nested, local]


def test_fork_values_equal_the_plain_engine():
    x = rand_words((40,), 2**30, 51)
    y = rand_words((40,), 2**20, 52)

    def program(e, X, Y):
        p, s, (b, mm), loc = e.fork(*_branches(e, X, Y))
        return [p, s, b, mm, loc]

    got = compare(program, x, y, exact=False)
    (p_want, p_got), (s_want, s_got), (b_want, b_got), (mm_want, mm_got), (l_want, l_got) = got
    assert torch.equal(p_want, (x * y) >> 8) and (p_got - p_want).abs().max() <= 1
    assert torch.equal(s_got, s_want) and torch.equal(s_want, torch.where(x < 0, y, 0))
    assert torch.equal(b_got, b_want) and torch.equal(b_want, (y < 0).to(torch.int64))
    assert torch.equal(mm_got, mm_want) and torch.equal(mm_want, x.reshape(-1, 1) * y.reshape(1, -1))
    assert torch.equal(l_got, x + y)


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_fork_rounds_are_the_longest_branch_and_bytes_add(scheduler):
    n = 30

    def counted(fork):
        def party(e):
            x = e.input("model", torch.arange(n) - 10 if e.party == 0 else None, (n,))
            y = e.input("model", (torch.arange(n) - 5) << 4 if e.party == 0 else None, (n,))
            with e.transport.step("op"):
                branches = _branches(e, x, y)
                out = e.fork(*branches) if fork else [b() for b in branches]
            return open_at_p0(e, out[1])

        res, _, stats = run_threads(party, None, scheduler=scheduler, timeout=20)
        op = [stats[p]["op"] for p in range(3)]
        return res[0], {s.rounds for s in op}, [s.payload_bytes for s in op]

    seq, seq_rounds, seq_bytes = counted(False)
    par, par_rounds, par_bytes = counted(True)
    assert seq_rounds == {3 + 10 + 10} and par_rounds == {10}  # the nested fork is merged either way
    assert par_bytes == seq_bytes
    assert torch.equal(par, seq) and torch.equal(par, torch.where(torch.arange(n) < 10, (torch.arange(n) - 5) << 4, 0))


def test_cost_model_counts_fork_like_the_transport():
    def program(e, x, y):
        e.fork(*_branches(e, x, y))

    got = check(program, [(7,), (7,)])
    assert got["rounds"] == 10


def test_a_failing_branch_fails_the_fork():
    def party(e):
        x = e.input("model", torch.arange(4) if e.party == 0 else None, (4,))
        e.fork(lambda: e.msb(x), lambda: e.trunc(x, 99))

    with pytest.raises(PartyFailure, match="outside 1..62"):
        run_threads(party, None, timeout=5)


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_fork_reuses_its_branch_greenlets_also_after_a_failed_fork(scheduler):
    """The engine keeps fork's branch greenlets for the next fork (nested ones too): the values stay right
    fork after fork, a failed fork (a branch raising while another waits in a round) leaves the engine
    usable, and the kept greenlets do not pile up."""
    n = 12

    def party(e):
        x = e.input("model", torch.arange(n) - 6 if e.party == 0 else None, (n,))
        y = e.input("model", (torch.arange(n) - 3) << 4 if e.party == 0 else None, (n,))

        def failing():
            e.mul(x, y)
            raise ValueError("branch failed after a round")

        outs, kept = [], []
        for k in range(4):
            if k == 2:
                with pytest.raises(ValueError, match="after a round"):
                    e.fork(failing, lambda: e.mul(e.mul(x, y), x), lambda: e.add(x, y))
            outs.append(e.fork(*_branches(e, x, y))[1])  # the mul_bit branch; a nested fork inside
            kept.append(len(e._runners))
        return [open_at_p0(e, v) for v in outs], kept

    res, _, _ = run_threads(party, None, scheduler=scheduler, timeout=20)
    values, kept = res[0]
    want = torch.where(torch.arange(n) < 6, (torch.arange(n) - 3) << 4, 0)
    assert all(torch.equal(v, want) for v in values)
    assert kept == [kept[0]] * 4 and kept[0] <= 6  # 4 branches + 2 nested, reused each time
