"""Every RSSEngine primitive against the plain reference engine, plus run_threads' failure handling."""

import time

import pytest
import torch

from siguard.runtime.kernels.plain import Clear, ClearBits, PlainEngine
from siguard.runtime.mpc.inprocess import PartyFailure, run_threads
from siguard.runtime.mpc.rss import BoolShares, RSSEngine, Shares
from siguard.runtime.mpc.transport import (
    FrameHeader,
    InProcessNetwork,
    TransportAborted,
    TransportError,
    TransportTimeout,
)

EDGES = [0, -1, 1, 2**61, -(2**61), 2**62 - 1, -(2**62), 12345 << 16, -(98765 << 16)]
MSB_EDGES = EDGES + [2**63 - 1, -(2**63), 2**62, -(2**62) - 1]


def rand_words(shape, bound, seed):
    g = torch.Generator().manual_seed(seed)  # test data only; shares come from the engine's PRF
    return torch.randint(-bound, bound, shape, generator=g, dtype=torch.int64)


def with_edges(values, edges=EDGES):
    return torch.cat([values.reshape(-1), torch.tensor(edges, dtype=torch.int64)])


def open_at_p0(e: RSSEngine, v):
    """Open an arithmetic or Boolean secret to P0 (tests only); None at P1, P2."""
    if isinstance(v, Shares):
        return e.reveal(v, "P0")
    assert isinstance(v, BoolShares)
    if e.party == 0:
        got = e.transport.exchange({}, {1: tuple(v.shape)})[1]
        return (v.a ^ v.b ^ got) & 1
    e.transport.exchange({0: v.b} if e.party == 1 else {}, {})
    return None


def compare(program, *inputs, exact=True, owner="model"):
    """Run ``program(engine, *secrets) -> list`` on PlainEngine and on three RSS parties (inputs
    shared by ``owner``, the model owner P0 or the client); return the pairs (plain, secure) of
    cleartext results."""
    plain = PlainEngine()
    expected = program(plain, *[Clear(x) for x in inputs])

    def party(e):
        xs = [e.input(owner, x if e.party == 0 else None, x.shape) for x in inputs]
        return [open_at_p0(e, v) if isinstance(v, (Shares, BoolShares)) else v for v in program(e, *xs)]

    def client(c):
        for x in inputs:
            c.share_input(x)

    results, _, _ = run_threads(party, client if owner == "client" else None, timeout=20)
    pairs = []
    for want, got in zip(expected, results[0], strict=True):
        want = want.v if isinstance(want, (Clear, ClearBits)) else want
        assert got.shape == want.shape
        if exact:
            assert torch.equal(got, want)
        pairs.append((want, got))
    return pairs


# ---- input, reveal ---------------------------------------------------------------------------
def test_client_input_and_reveal_to_client_only():
    x = with_edges(rand_words((50,), 2**62, 1))

    def party(e):
        X = e.input("client", None, x.shape)
        with e.transport.step("reveal"):
            assert e.reveal(X, "client") is None
        return X.a, X.b

    def client(c):
        c.share_input(x)
        return torch.from_numpy(c.receive_output(x.shape))  # (the client's words are numpy)

    shares, out, stats = run_threads(party, client)
    assert torch.equal(out, x)
    assert torch.equal(shares[0][0] + shares[1][0] + shares[2][0], x)  # x0 + x1 + x2
    for i in range(3):  # replicated layout: P_i's slot b is P_{i+1}'s slot a
        assert torch.equal(shares[i][1], shares[(i + 1) % 3][0])
        assert stats[i]["reveal"].received == {}
        assert stats[i]["reveal"].sent == {3: 8 * x.numel()}
    assert stats[3]["main"].received == {i: 8 * x.numel() for i in range(3)}  # the client has no steps
    assert stats[3]["main"].sent == {i: 16 * x.numel() for i in range(3)}


@pytest.mark.parametrize("target", [0, 1, 2])
def test_reveal_to_one_server_only(target):
    x = with_edges(rand_words((20,), 2**62, 2))

    def party(e):
        X = e.input("model", x if e.party == 0 else None, x.shape)
        with e.transport.step("reveal"):
            return e.reveal(X, f"P{target}")

    out, _, stats = run_threads(party)
    for i in range(3):
        if i == target:
            assert torch.equal(out[i], x)
            assert stats[i]["reveal"].received == {(target + 1) % 3: 8 * x.numel()}
        else:
            assert out[i] is None
            assert stats[i]["reveal"].received == {}
        assert stats[i]["reveal"].rounds == 1


@pytest.mark.parametrize("owner", ["model", "P1", "P2"])
def test_server_input_owners(owner):
    x = with_edges(rand_words((3, 4), 2**62, 3))
    o = {"model": 0, "P1": 1, "P2": 2}[owner]

    def party(e):
        return e.reveal(e.input(owner, x if e.party == o else None, x.shape), "P1")

    out, _, _ = run_threads(party)
    assert torch.equal(out[1], x)


def test_input_requires_value_at_owner():
    def party(e):
        e.input("model", None, (2,))

    with pytest.raises(PartyFailure, match="P0 failed.*no value"):
        run_threads(party, timeout=5)


# ---- local operations --------------------------------------------------------------------------
def test_linear_local_operations_exact():
    x, y = with_edges(rand_words((40,), 2**62, 4)), rand_words((49,), 2**62, 5)
    c = rand_words((49,), 2**40, 6)
    w = rand_words((7, 3), 50, 7)

    def program(e, X, Y):
        return [
            e.add(X, Y),
            e.sub(X, Y),
            e.neg(X),
            e.add(X, c),
            e.add(c, X),
            e.sub(X, c),
            e.sub(c, X),
            e.add(X, torch.tensor(5)),
            e.local(lambda v: v.reshape(7, 7).t().contiguous(), X),
            e.local(lambda v: v.reshape(7, 7).sum(dim=0), X),
            e.local(lambda v, m: v.reshape(7, 7) @ m, X, w),
            e.local(lambda u, v: u + 3 * v, X, Y),
            e.cat([X, c, Y], 0),
            e.mul(X, c),
            e.mul(torch.tensor(-3), X),
            e.matmul(e.local(lambda v: v.reshape(7, 7), X), w),
        ]

    compare(program, x, y)


# ---- products ----------------------------------------------------------------------------------
def test_mul_matmul_conv2d_bit_exact():
    x = with_edges(rand_words((40,), 2**63 - 1, 8)).reshape(7, 7)
    y = with_edges(rand_words((40,), 2**63 - 1, 9)).reshape(7, 7)
    img = rand_words((2, 3, 6, 6), 2**63 - 1, 10)
    ker = rand_words((4, 3, 3, 3), 2**63 - 1, 11)
    gker = rand_words((4, 1, 2, 2), 2**63 - 1, 12)
    row = rand_words((1, 7), 2**63 - 1, 13)

    def program(e, X, Y, I, K, G, R):
        return [
            e.mul(X, Y),
            e.mul(X, R),  # broadcasting
            e.matmul(X, Y),
            e.matmul(R, X),
            e.conv2d(I, K, (1, 1), (1, 1), (1, 1), 1),
            e.conv2d(I, K, (2, 2), (0, 0), (1, 1), 1),
            e.conv2d(e.local(lambda v: v[:, :2].repeat(1, 2, 1, 1), I), G, (1, 1), (1, 1), (2, 2), 4),
            e.conv2d(I, ker, (1, 1), (0, 0), (1, 1), 1),  # public kernel: local
            e.mul(e.mul(X, Y), X),
        ]

    compare(program, x, y, img, ker, gker, row)


# ---- truncation --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 16, 32, 62])
def test_trunc_within_one_ulp_below_floor(bits):
    x = with_edges(rand_words((20_000,), 2**61, 14))
    x = torch.cat([x, rand_words((5_000,), 2**20, 15)])

    def program(e, X):
        return [e.trunc(X, bits)]

    ((want, got),) = compare(program, x, exact=False, owner="client")  # all three components random
    err = got - want
    assert set(err.unique().tolist()) <= {0, -1}
    if bits >= 16:  # the dropped fractions are uniform: the -1 happens about half the time
        assert 0.3 < (err == -1).double().mean().item() < 0.7
    ((want, got),) = compare(program, x, exact=True)  # the model owner's input has x2 = 0: exact floor


def test_trunc_zero_bits_is_identity_and_range_checked():
    x = rand_words((5,), 2**40, 16)

    def party(e):
        X = e.input("model", x if e.party == 0 else None, x.shape)
        assert e.trunc(X, 0) is X
        with pytest.raises(ValueError):
            e.trunc(X, 63)
        return e.reveal(e.mul_public_real(X, 0.5), "P0")

    out, _, _ = run_threads(party)
    assert ((out[0] - (x >> 1)).abs() <= 1).all()


# ---- Boolean -----------------------------------------------------------------------------------
def test_msb_exact_on_random_and_edge_values():
    x = with_edges(rand_words((30_000,), 2**63 - 1, 17), MSB_EDGES)
    small = with_edges(rand_words((2_000,), 2**10, 18), MSB_EDGES)

    def program(e, X, S):
        return [e.msb(X), e.msb(S), e.msb(e.local(lambda v: v.reshape(-1, 3), S))]

    compare(program, x, small, owner="client")
    compare(program, x, small, owner="model")


def test_bit_operations_exact():
    x = with_edges(rand_words((3_000,), 2**62, 19))
    y = with_edges(rand_words((3_000,), 2**62, 20))
    pub = (rand_words((x.numel(),), 2, 21) & 1).long()

    def program(e, X, Y):
        a, b = e.msb(X), e.msb(Y)
        return [
            e.bit_not(a),
            e.bit_xor(a, b),
            e.bit_and(a, b),
            e.bit_and(e.bit_not(a), e.bit_not(b)),
            e.bit_cat([a, b], 0),
            e.bit_local(lambda v: v.reshape(-1, 3)[:, 1:], a),
            e.b2a(a),
            e.b2a(e.bit_and(a, b)),
            e.b2a(e.bit_xor(a, pub)) if e.party is not None else e.b2a(ClearBits(a.v ^ pub)),
        ]

    compare(program, x, y)


def test_mul_bit_and_relu_exact():
    x = with_edges(rand_words((5_000,), 2**62, 22))
    y = with_edges(rand_words((5_000,), 2**62, 23))
    m = rand_words((4, 3), 2**40, 24)
    col = rand_words((4, 1), 2**40, 25)

    def program(e, X, Y, M, Col):
        relu = e.mul_bit(X, e.bit_not(e.msb(X)))
        return [
            relu,
            e.mul_bit(Y, e.msb(X)),
            e.mul_bit(torch.tensor(7 << 16), e.msb(X)),  # public x
            e.mul_bit(M, e.msb(Col)),  # b broadcast over x
            e.mul_bit(Col, e.msb(M)),  # x broadcast over b
        ]

    pairs = compare(program, x, y, m, col)
    assert torch.equal(pairs[0][1], torch.where(x >= 0, x, 0))


def test_bits_are_zero_one_words_in_every_share():
    x = with_edges(rand_words((1000,), 2**62, 26))

    def party(e):
        X = e.input("model", x if e.party == 0 else None, x.shape)
        a = e.msb(X)
        b = e.bit_and(a, e.bit_not(a))
        return [(v.a.min().item(), v.a.max().item(), v.b.min().item(), v.b.max().item()) for v in (a, b)]

    out, _, _ = run_threads(party)
    for per_party in out:
        for lo_a, hi_a, lo_b, hi_b in per_party:
            assert 0 <= lo_a <= hi_a <= 1 and 0 <= lo_b <= hi_b <= 1


def test_rss_engine_agrees_with_plain_on_a_small_network():
    """An MLP layer with fixed point: matmul, bias at 2f, trunc, relu, and a max of two."""
    f = 16
    g = torch.Generator().manual_seed(27)
    xr, wr, br = torch.randn(5, 8, generator=g), torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
    enc = lambda t, s: torch.round(t.double() * 2**s).long()  # noqa: E731
    x, w, b = enc(xr, f), enc(wr, f), enc(br, 2 * f)

    def program(e, X, W, B):
        h = e.trunc(e.add(e.matmul(X, W), B), f)
        h = e.mul_bit(h, e.bit_not(e.msb(h)))
        left, right = e.local(lambda v: v[:, :3], h), e.local(lambda v: v[:, 3:], h)
        diff = e.sub(left, right)
        return [h, e.add(right, e.mul_bit(diff, e.bit_not(e.msb(diff))))]

    for want, got in compare(program, x, w, b, exact=False):
        assert (got - want).abs().max().item() <= 2


# ---- run_threads and transport failures --------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_party_exception_is_raised_with_party_id_and_does_not_hang(scheduler):
    def party(e):
        X = e.input("model", torch.ones(4, dtype=torch.int64) if e.party == 0 else None, (4,))
        if e.party == 2:
            raise ZeroDivisionError("boom")
        return e.mul(X, X)

    t0 = time.monotonic()
    with pytest.raises(PartyFailure) as info:
        run_threads(party, timeout=20, scheduler=scheduler)
    assert time.monotonic() - t0 < 5  # the abort woke the waiting parties long before the timeout
    assert info.value.party == 2
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "P2" in str(info.value)


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_client_failure_is_reported(scheduler):
    def party(e):
        return e.input("client", None, (3,))

    def client(c):
        raise ValueError("bad input file")

    with pytest.raises(PartyFailure, match="client failed: ValueError: bad input file"):
        run_threads(party, client, timeout=20, scheduler=scheduler)


def test_missing_peer_times_out_naming_it():
    net = InProcessNetwork(4, timeout=0.2)
    with pytest.raises(TransportTimeout, match="party 0: no message from party 1") as info:
        net.transport(0).exchange({}, {1: (3,)})
    assert info.value.peer == 1


def test_abort_wakes_a_blocked_receiver():
    net = InProcessNetwork(4, timeout=20)
    seen = []

    import threading

    def wait():
        try:
            net.transport(1).exchange({}, {2: (1,)})
        except TransportAborted as exc:
            seen.append(str(exc))

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    net.abort("test abort")
    t.join(timeout=5)
    assert not t.is_alive() and "test abort" in seen[0]
    with pytest.raises(TransportAborted):
        net.transport(0).exchange({1: torch.zeros(1, dtype=torch.int64)}, {})


def test_out_of_step_servers_are_detected():
    net = InProcessNetwork(4, timeout=2)
    with net.transport(0).step("layer1"):
        net.transport(0).exchange({1: torch.zeros(2, dtype=torch.int64)}, {})
    with net.transport(1).step("layer2"), pytest.raises(TransportError, match="belongs to step 'layer1'"):
        net.transport(1).exchange({}, {0: (2,)})


def test_wrong_shape_and_dtype_are_rejected():
    net = InProcessNetwork(4, timeout=2)
    net.transport(0).exchange({1: torch.zeros(2, dtype=torch.int64)}, {})
    with pytest.raises(TransportError, match=r"shape \(2,\), expected \(3,\)"):
        net.transport(1).exchange({}, {0: (3,)})
    with pytest.raises(TypeError):
        net.transport(0).exchange({1: torch.zeros(2)}, {})


def test_frame_header_round_trip():
    h = FrameHeader("session-42", "conv1/relu", 2, 12345, (3, 0, 7))
    assert FrameHeader.decode(h.encode()) == h


def test_payloads_are_copied():
    net = InProcessNetwork(4, timeout=2)
    t = torch.arange(3, dtype=torch.int64)
    net.transport(0).exchange({2: t}, {})
    t += 100
    assert net.transport(2).exchange({}, {0: (3,)})[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3)])
def test_scalar_and_empty_shapes(shape):
    x = torch.full(shape, -(5 << 16), dtype=torch.int64)

    def program(e, X):
        m = e.msb(X)
        return [e.mul(X, X), e.trunc(X, 16), m, e.b2a(m), e.mul_bit(X, e.bit_not(m)), e.bit_and(m, m)]

    for k, (want, got) in enumerate(compare(program, x, exact=False, owner="client")):
        assert ((got - want).abs() <= 1).all() if k == 1 else torch.equal(got, want)
