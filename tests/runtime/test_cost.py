"""The cost model equals what the in-process transport counts, primitive by primitive."""

import pytest
import torch
import torch.nn.functional as F

from siguard.runtime.kernels.cost import PRIMITIVE_COSTS, CostEngine
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.transport import StepStats


def zeros(*shape):
    return torch.zeros(shape, dtype=torch.int64)


def measured(stats_of_party, step="op") -> StepStats:
    return stats_of_party.get(step, StepStats())


def check(program, inputs, client_inputs=(), client_output=None):
    """Run ``program(engine, secrets)`` inside step "op" on CostEngine and on RSS threads; the
    rounds and per-party bytes must agree exactly. ``inputs``: shapes shared by the model owner
    before the step; ``client_inputs``: shapes the client shares inside the step."""

    def run(e, values):
        xs = [e.input("model", values[k] if values is not None else None, s) for k, s in enumerate(inputs)]
        with _step(e, "op"):
            cs = [e.input("client", None, s) for s in client_inputs]
            program(e, *xs, *cs)

    cost = CostEngine()
    run(cost, [zeros(*s) for s in inputs])
    want = cost.steps.get("op", {"rounds": 0, "bytes_per_party": [0, 0, 0], "client_bytes": 0})

    def party(e):
        run(e, [zeros(*s) for s in inputs] if e.party == 0 else None)

    def client(c):
        for s in client_inputs:
            c.share_input(zeros(*s))
        if client_output is not None:
            c.receive_output(client_output)

    needs_client = bool(client_inputs) or client_output is not None
    _, _, stats = run_threads(party, client if needs_client else None, timeout=20)
    rounds = {measured(stats[p]).rounds for p in range(3)}
    assert rounds == {want["rounds"]}, (rounds, want)
    assert [measured(stats[p]).payload_bytes for p in range(3)] == want["bytes_per_party"]
    assert stats[3].get("main", StepStats()).payload_bytes == want["client_bytes"]
    return want


class _step:
    def __init__(self, engine, name):
        self.cm = engine.transport.step(name) if hasattr(engine, "transport") else engine.step(name)

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def per_element(name, n):
    c = PRIMITIVE_COSTS[name]
    return {"rounds": c.rounds, "bytes_per_party": [b * n for b in c.bytes], "client_bytes": c.client * n}


# ---- single primitives, checked against the table as well -------------------------------------
CASES = {
    "mul": ([(3, 4), (3, 4)], lambda e, x, y: e.mul(x, y), 12),
    "matmul": ([(3, 5), (5, 4)], lambda e, x, y: e.matmul(x, y), 12),
    "conv2d": ([(1, 2, 5, 5), (3, 2, 3, 3)], lambda e, x, w: e.conv2d(x, w, (1, 1), (1, 1), (1, 1), 1), 75),
    "trunc": ([(7,)], lambda e, x: e.trunc(x, 16), 7),
    "msb": ([(7,)], lambda e, x: e.msb(x), 7),
    "b2a": ([(7,)], lambda e, x: e.b2a(e.msb(x)), None),
    "mul_bit": ([(7,)], lambda e, x: e.mul_bit(x, e.msb(x)), None),
    "bit_and": ([(7,), (7,)], lambda e, x, y: e.bit_and(e.msb(x), e.msb(y)), None),
    "reveal:P0": ([(6,)], lambda e, x: e.reveal(x, "P0"), 6),
    "reveal:P1": ([(6,)], lambda e, x: e.reveal(x, "P1"), 6),
    "reveal:P2": ([(6,)], lambda e, x: e.reveal(x, "P2"), 6),
    "input:P0": ([], lambda e: e.input("model", zeros(2, 3) if e.party in (0, None) else None, (2, 3)), 6),
    "input:P1": ([], lambda e: e.input("P1", zeros(2, 3) if e.party in (1, None) else None, (2, 3)), 6),
    "input:P2": ([], lambda e: e.input("P2", zeros(2, 3) if e.party in (2, None) else None, (2, 3)), 6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_costs_match_transport(name):
    inputs, program, n = CASES[name]
    got = check(program, inputs)
    if n is not None:
        assert got == per_element(name, n)


def test_locals_cost_nothing():
    def program(e, x, y):
        z = e.add(e.sub(x, y), torch.tensor(3))
        z = e.neg(e.local(lambda v: v.reshape(2, 6).sum(0), z))
        z = e.cat([z, torch.ones(2, dtype=torch.int64)], 0)
        z = e.mul(z, torch.tensor(5))
        e.matmul(e.local(lambda v: v.reshape(2, 4), z), torch.ones(4, 3, dtype=torch.int64))

    assert check(program, [(12,), (12,)]) == per_element("add", 12)


def test_client_input_and_reveal_to_client():
    got = check(lambda e, c: e.reveal(c, "client"), [], client_inputs=[(2, 5)], client_output=(2, 5))
    # input 1 round + the servers' consistency check 1 round (one 32-byte digest each) + reveal 1 round
    assert got["rounds"] == 3
    assert got["bytes_per_party"] == [80 + 32, 80 + 32, 80 + 32]
    assert got["client_bytes"] == 480


def test_table_costs_for_bits_and_conversions():
    # msb (8 rounds, 64 B) then the primitive; subtract the msb part.
    msb = per_element("msb", 7)
    for name, prog in [("b2a", CASES["b2a"][1]), ("mul_bit", CASES["mul_bit"][1])]:
        got = check(prog, [(7,)])
        rest = [got["bytes_per_party"][p] - msb["bytes_per_party"][p] for p in range(3)]
        assert got["rounds"] - msb["rounds"] == PRIMITIVE_COSTS[name].rounds
        assert rest == [b * 7 for b in PRIMITIVE_COSTS[name].bytes]


def test_mul_bit_broadcast_and_public():
    check(lambda e, x, y: e.mul_bit(x, e.msb(y)), [(4, 3), (4, 1)])
    check(lambda e, x, y: e.mul_bit(x, e.msb(y)), [(4, 1), (4, 3)])
    check(lambda e, y: e.mul_bit(torch.tensor(5), e.msb(y)), [(4, 3)])
    check(lambda e, y: e.mul_bit(torch.ones(2, 4, 3, dtype=torch.int64), e.msb(y)), [(4, 3)])


def test_relu_and_matmul_trunc_compositions():
    relu = check(lambda e, x: e.mul_bit(x, e.bit_not(e.msb(x))), [(5, 4)])
    assert relu == {"rounds": 10, "bytes_per_party": [88 * 20, 80 * 20, 80 * 20], "client_bytes": 0}
    layer = check(lambda e, x, w: e.trunc(e.matmul(x, w), 16), [(2, 8), (8, 3)])
    assert layer == {"rounds": 3, "bytes_per_party": [24 * 6, 16 * 6, 16 * 6], "client_bytes": 0}

    def max_pool(e, x):  # 2x2 max by a two-level tree, conv-like layout maps
        def cols(v, k):
            return v[..., k::2]

        a, b = e.local(lambda v: cols(v, 0), x), e.local(lambda v: cols(v, 1), x)
        d = e.sub(a, b)
        m = e.add(b, e.mul_bit(d, e.bit_not(e.msb(d))))
        e.reveal(e.mul_public_real(m, 0.5), "P0")

    check(max_pool, [(3, 8)])


def test_cost_engine_shapes_follow_local_and_products():
    e = CostEngine()
    x = e.input("model", None, (2, 3, 6, 6))
    idx = torch.tensor([2, 0])
    y = e.local(lambda v: torch.index_select(v, 1, idx), x)  # closes over a CPU tensor
    assert tuple(y.shape) == (2, 2, 6, 6)
    z = e.local(lambda v, m: v * m, y, torch.ones(6, dtype=torch.int64))  # public CPU operand
    assert tuple(z.shape) == (2, 2, 6, 6)
    p = e.local(lambda v: F.pad(v, (1, 0, 1, 0)), z)
    assert tuple(p.shape) == (2, 2, 7, 7)
    c = e.conv2d(p, torch.ones(4, 2, 3, 3, dtype=torch.int64), (2, 2), (0, 0), (1, 1), 1)
    assert tuple(c.shape) == (2, 4, 3, 3)
    assert e.total == {"rounds": 1, "bytes_per_party": [8 * 216, 0, 0], "client_bytes": 0}  # input only
    with e.step("s"):
        e.trunc(c, 8)
    assert e.steps["s"] == per_element("trunc", 72)
    assert e.total["rounds"] == 3
    assert tuple(e.reveal(c, "client").shape) == (2, 4, 3, 3)
    assert e.is_secret(c) and not e.is_secret(torch.ones(1))
