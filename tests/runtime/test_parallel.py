"""Engine.parallel: independent protocols share rounds (rounds = the longest branch, bytes add), give
the same values as one after the other, and the cost model counts it the same way as the transport."""

import pytest
import torch

from runtime.cost import CostEngine
from runtime.nonlinear import relu
from runtime.plain import Clear, PlainEngine
from runtime.rss import PartyFailure, run_threads
from tests.runtime.test_cost import check
from tests.runtime.test_rss import compare, open_at_p0, rand_words, with_edges


def _branches(e, x, y):
    """Four independent protocols of different lengths: msb 8, trunc 2, mul 1, msb + mul_bit 10 rounds."""
    return [lambda: e.msb(x), lambda: e.trunc(x, 16), lambda: e.mul(y, y), lambda: e.mul_bit(y, e.msb(y))]


def test_parallel_values_equal_the_plain_engine():
    x = with_edges(rand_words((3_000,), 2**61, 31))
    y = rand_words((3_000,), 2**30, 32)

    def program(e, X, Y):
        m, t, yy, my = e.parallel(*_branches(e, X, Y))
        return [e.b2a(m), t, yy, my]

    pairs = compare(program, x, y, exact=False)
    (m_want, m_got), (t_want, t_got), (yy_want, yy_got), (my_want, my_got) = pairs
    assert torch.equal(m_got, m_want) and torch.equal(m_got, (x < 0).to(torch.int64))
    assert set((t_got - t_want).unique().tolist()) <= {0, -1}  # the secure truncation's own error
    assert torch.equal(yy_got, yy_want)
    assert torch.equal(my_got, my_want)


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_parallel_rounds_are_the_longest_branch_and_bytes_add(scheduler):
    n = 50

    def counted(par):
        def party(e):
            x = e.input("model", torch.arange(n) - 20 if e.party == 0 else None, (n,))
            y = e.input("model", torch.arange(n) if e.party == 0 else None, (n,))
            with e.transport.step("op"):
                fns = _branches(e, x, y)
                out = e.parallel(*fns) if par else [f() for f in fns]
            return open_at_p0(e, out[1])

        res, _, stats = run_threads(party, None, scheduler=scheduler, timeout=20)
        op = [stats[p]["op"] for p in range(3)]
        return res[0], {s.rounds for s in op}, [s.payload_bytes for s in op]

    seq_val, seq_rounds, seq_bytes = counted(False)
    par_val, par_rounds, par_bytes = counted(True)
    assert seq_rounds == {8 + 2 + 1 + 10} and par_rounds == {10}
    assert par_bytes == seq_bytes
    assert set((par_val - seq_val).unique().tolist()) <= {-1, 0, 1}


def test_cost_model_counts_parallel_like_the_transport():
    def program(e, x, y):
        e.parallel(*_branches(e, x, y))
        e.parallel(lambda: e.msb(x))  # one branch: nothing to merge

    got = check(program, [(6, 5), (6, 5)])
    assert got["rounds"] == 10 + 8
    cost = CostEngine()
    x, y = cost.input("model", None, (6, 5)), cost.input("model", None, (6, 5))
    a, b = cost.parallel(lambda: cost.trunc(x, 3), lambda: cost.mul(x, y))
    assert tuple(a.shape) == tuple(b.shape) == (6, 5)


def test_plain_engine_runs_branches_in_order():
    e = PlainEngine()
    order = []
    out = e.parallel(lambda: order.append(1) or 1, lambda: order.append(2) or 2)
    assert out == [1, 2] and order == [1, 2]


def test_a_failing_branch_fails_the_party_and_nobody_hangs():
    def party(e):
        x = e.input("model", torch.arange(4) if e.party == 0 else None, (4,))

        def bad():
            e.msb(x)
            if e.party == 2:
                raise ValueError("branch failed")
            return e.msb(x)

        e.parallel(lambda: e.trunc(x, 1), bad)

    with pytest.raises(PartyFailure, match="P2 failed: ValueError: branch failed"):
        run_threads(party, None, timeout=5)


def test_fused_relu_is_relu_of_the_truncation():
    x = with_edges(rand_words((4_000,), 2**50, 41), [0, -1, 1, (1 << 16) - 1, 1 << 16, -(1 << 16)])

    def program(e, X):
        return [relu(e, X, shift=16)]

    ((want, got),) = compare(program, x, exact=False)
    assert torch.equal(want, torch.clamp(x >> 16, min=0))  # plain: exact floor, then clipped
    assert (got - want).abs().max() <= 1
    plain = relu(PlainEngine(), Clear(x), shift=16)
    assert torch.equal(plain.v, want)
    cost = CostEngine()
    relu(cost, cost.input("model", None, (10,)), shift=16)
    assert cost.total["rounds"] == 1 + 10  # input + fused ReLU (unfused: trunc 2 + 10)
