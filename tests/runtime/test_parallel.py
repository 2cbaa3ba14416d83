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
