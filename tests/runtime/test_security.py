"""Statistical checks of what each server sees (docs/protocols.md §8).

* every share component of fresh sharings (client input, mul, trunc, b2a outputs, msb bits) is
  uniform for fixed secrets;
* the words a server receives have the same distribution for two different secrets;
* no received message equals a plaintext intermediate;
* only the client receives the revealed output.
"""

import threading

import pytest
import torch
from scipy import stats

from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.transport import InProcessTransport
from siguard.runtime.ring import rshift_logical

N = 100_000
ALPHA = 1e-6  # per test; there are a few hundred of them


def encode(v, f=16):
    return int(round(v * 2**f))


def assert_uniform_words(w: torch.Tensor, what: str):
    """Low and high byte chi-square, and every bit's frequency within 5 sigma of 1/2."""
    w = w.reshape(-1)
    n = w.numel()
    for name, byte in (("low", w & 0xFF), ("high", rshift_logical(w, 56))):
        counts = torch.bincount(byte, minlength=256).double().numpy()
        p = stats.chisquare(counts).pvalue
        assert p > ALPHA, f"{what}: {name} byte not uniform (p={p:.2g})"
    bits = torch.stack([(w >> k) & 1 for k in range(64)]).double().mean(dim=1)
    worst = (bits - 0.5).abs().max().item()
    assert worst < 5 / (2 * n**0.5), f"{what}: a bit frequency is off by {worst:.4f}"


def assert_uniform_bits(b: torch.Tensor, what: str):
    b = b.reshape(-1)
    assert set(b.unique().tolist()) <= {0, 1}
    assert abs(b.double().mean().item() - 0.5) < 5 / (2 * b.numel() ** 0.5), what


def components(shares):
    """x0, x1, x2 from the three parties' (a, b) slots (P_i's slot a is x_i)."""
    return [shares[i][0] for i in range(3)]


@pytest.mark.parametrize("secret", [0, -1, 2**40, -(2**63)])
def test_client_input_components_are_uniform(secret):
    x = torch.full((N,), secret, dtype=torch.int64)

    def party(e):
        X = e.input("client", None, x.shape)
        return X.a, X.b

    def client(c):
        c.share_input(x)

    shares, _, _ = run_threads(party, client)
    comps = components(shares)
    assert torch.equal(comps[0] + comps[1] + comps[2], x)
    for j, comp in enumerate(comps):
        assert_uniform_words(comp, f"x{j} of {secret}")


@pytest.mark.parametrize("secret", [0, -1, encode(3.25)])
def test_protocol_outputs_are_uniform(secret):
    """Outputs of mul, trunc and b2a are fresh sharings; msb's Boolean components are fair coins.
    Inputs come from the model owner (x2 = 0), the least random sharing there is."""
    x = torch.full((N,), secret, dtype=torch.int64)

    def party(e):
        X = e.input("model", x if e.party == 0 else None, x.shape)
        one = e.input("model", torch.ones_like(x) if e.party == 0 else None, x.shape)
        outs = {"mul": e.mul(X, one), "trunc": e.trunc(X, 16)}
        bit = e.msb(X)
        outs["b2a"] = e.b2a(bit)
        return {k: (v.a, v.b) for k, v in outs.items()}, (bit.a, bit.b)

    res, _, _ = run_threads(party)
    for name in ("mul", "trunc", "b2a"):
        for j, comp in enumerate(components([r[0][name] for r in res])):
            assert_uniform_words(comp, f"{name} component {j} of {secret}")
    for j, comp in enumerate(components([r[1] for r in res])):
        assert_uniform_bits(comp, f"msb component {j} of {secret}")


# ---- views ---------------------------------------------------------------------------------------
def record_views(monkeypatch):
    """Patch the in-process transport so every received message is logged per party, in order (every round,
    ``exchange``, ``exchange_words`` and ``exchange_owned`` alike, is one ``_exchange`` call)."""
    views = {p: [] for p in range(4)}
    lock = threading.Lock()
    original = InProcessTransport._exchange

    def _exchange(self, send, recv, owned):
        got = original(self, send, recv, owned)
        with lock:
            for peer in sorted(got):
                views[self.party].append((self.current_step, peer, torch.from_numpy(got[peer].copy())))
        return got

    monkeypatch.setattr(InProcessTransport, "_exchange", _exchange)
    return views


def test_the_recorded_views_hold_every_received_word(monkeypatch):
    """The views of these tests see every round, merged ones too (``parallel`` and ``fork`` send through
    ``exchange_owned``): the recorded words add up to what each party's transport counted as received."""
    views = record_views(monkeypatch)
    n = 64

    def party(e):
        X = e.input("P1", torch.arange(n, dtype=torch.int64) if e.party == 1 else None, (n,))
        with e.transport.step("compute"):
            bit, t = e.parallel((e.msb, X), (e.trunc, e.mul(X, X), 16))
            e.fork(lambda: e.b2a(bit), lambda: e.mul(t, X))
        return None

    _, _, comm = run_threads(party)
    monkeypatch.undo()
    for p in range(3):
        counted = sum(sum(st.received.values()) for st in comm[p].values())
        recorded = sum(8 * msg.numel() for _, _, msg in views[p])
        assert recorded == counted > 0, f"P{p}: recorded {recorded} B, received {counted} B"


def pipeline(n):
    """Client inputs x, y; a product with truncation, ReLU, an AND of two signs, B2A; output to
    the client only."""

    def party(e):
        X, Y = e.input("client", None, (n,)), e.input("client", None, (n,))
        with e.transport.step("compute"):
            p = e.trunc(e.mul(X, Y), 16)
            m = e.msb(X)
            r = e.mul_bit(X, e.bit_not(m))
            b = e.b2a(e.bit_and(m, e.msb(Y)))
            out = e.cat([p, r, b], 0)
        with e.transport.step("reveal"):
            e.reveal(out, "client")

    def client(x, y):
        def run(c):
            c.share_input(x)
            c.share_input(y)
            return torch.from_numpy(c.receive_output((3 * n,)))  # (the client's words are numpy)

        return run

    return party, client


def server_views(monkeypatch, x, y):
    views = record_views(monkeypatch)
    party, client = pipeline(x.numel())
    _, out, _ = run_threads(party, client(x, y))
    monkeypatch.undo()
    return views, out


def same_distribution(u: torch.Tensor, v: torch.Tensor) -> float:
    """The smaller p-value of two-sample tests on the words' top 53 bits (KS) and low byte (chi2)."""
    u, v = u.reshape(-1), v.reshape(-1)
    if set(torch.cat([u, v]).unique().tolist()) <= {0, 1}:  # bit-share messages
        table = [[int((u == k).sum()), int((v == k).sum())] for k in (0, 1)]
        return stats.chi2_contingency(table).pvalue if min(map(min, table)) > 0 else 1.0
    ks = stats.ks_2samp(rshift_logical(u, 11).double().numpy(), rshift_logical(v, 11).double().numpy()).pvalue
    cu, cv = torch.bincount(u & 0xFF, minlength=256), torch.bincount(v & 0xFF, minlength=256)
    keep = (cu + cv) > 0
    chi = stats.chi2_contingency(torch.stack([cu[keep], cv[keep]]).numpy()).pvalue
    return min(ks, chi)


def view_rows(view, n):
    """A party's received words as rows of n per-element words, in order of arrival."""
    rows = []
    for step, _, msg in view:
        if step == "setup":  # the key exchange
            continue
        if msg.numel() == 4 and n != 4:  # the input consistency check: a digest of what the receiver holds
            continue
        assert msg.numel() % n == 0
        rows.extend(msg.reshape(-1, n))
    return torch.stack(rows)


def pairwise_features(rows):
    """For every pair of rows (j < k): the 16-cell histogram of (sign bit, low bit) of row j's word
    against that of row k's word, element by element."""
    feats = 2 * rshift_logical(rows, 63) + (rows & 1)  # (R, n) in 0..3
    hists = {}
    for j in range(len(rows) - 1):
        codes = 4 * feats[j] + feats[j + 1 :] + 16 * torch.arange(len(rows) - j - 1).unsqueeze(1)
        counts = torch.bincount(codes.reshape(-1), minlength=16 * (len(rows) - j - 1)).reshape(-1, 16)
        for d, row in enumerate(counts):
            hists[(j, j + 1 + d)] = row
    return hists


def homogeneous(u: torch.Tensor, v: torch.Tensor) -> float:
    keep = (u + v) > 0
    if keep.sum() < 2:
        return 1.0
    return stats.chi2_contingency(torch.stack([u[keep], v[keep]]).numpy()).pvalue


def test_server_views_do_not_depend_on_the_secrets(monkeypatch):
    """Each received message (marginally) and each pair of received words of the same element
    (jointly: sign and low bits) have the same distribution under two different secrets."""
    n = 20_000
    # Wide products (x*y = +-2^61) so that a leak of order |x|/2^64, such as an unmasked wrap bit
    # in the truncation, shows up; the signs differ so every comparison result differs too.
    secrets_a = (2**40, 2**21)
    secrets_b = (-(2**40) + 12345, 2**21)
    runs = []
    for xa, ya in (secrets_a, secrets_b):
        x, y = torch.full((n,), xa, dtype=torch.int64), torch.full((n,), ya, dtype=torch.int64)
        runs.append(server_views(monkeypatch, x, y)[0])
    for party in range(3):
        view_a, view_b = runs[0][party], runs[1][party]
        assert len(view_a) == len(view_b) > 10
        for k, ((step, peer, msg_a), (_, _, msg_b)) in enumerate(zip(view_a, view_b, strict=True)):
            assert msg_a.shape == msg_b.shape
            p = same_distribution(msg_a, msg_b)
            assert p > ALPHA, f"P{party} message {k} from {peer} in {step!r} depends on the secret (p={p:.2g})"
        hists_a = pairwise_features(view_rows(view_a, n))
        hists_b = pairwise_features(view_rows(view_b, n))
        for (j, k), h in hists_a.items():
            p = homogeneous(h, hists_b[(j, k)])
            assert p > ALPHA / 10, f"P{party}: received words {j} and {k} jointly depend on the secret (p={p:.2g})"


def test_no_received_message_is_a_plaintext_intermediate(monkeypatch):
    n = 4_000
    g = torch.Generator().manual_seed(7)  # test data only
    x = torch.randint(-(2**40), 2**40, (n,), generator=g, dtype=torch.int64)
    y = torch.randint(-(2**40), 2**40, (n,), generator=g, dtype=torch.int64)
    views, out = server_views(monkeypatch, x, y)
    sx, sy = x < 0, y < 0
    relu = torch.where(sx, 0, x)
    intermediates = {
        "x": x,
        "y": y,
        "x*y": x * y,
        "trunc": (x * y) >> 16,
        "msb x": sx.long(),
        "msb y": sy.long(),
        "not msb x": (~sx).long(),
        "and": (sx & sy).long(),
        "relu": relu,
        "x - 2 x msb": x - 2 * x * sx.long(),
    }
    assert torch.equal(out[n : 2 * n], relu)
    for party in range(3):
        for step, peer, msg in views[party]:
            flat = msg.reshape(-1)
            for name, value in intermediates.items():
                for start in range(0, flat.numel() - n + 1, n):  # also inside concatenated messages
                    chunk = flat[start : start + n]
                    assert not torch.equal(chunk, value), f"P{party} received {name} from {peer} in {step}"
                    wide = value.abs() > 1  # elementwise matches of 0/1 values are expected by chance
                    if wide.any():
                        same = (chunk[wide] == value[wide]).double().mean().item()
                        assert same < 0.01, f"P{party} got {same:.1%} of {name} from {peer} in {step}"
                        assert (chunk[wide] == -value[wide]).double().mean().item() < 0.01


def test_only_the_client_receives_the_output(monkeypatch):
    n = 100
    x = torch.arange(n, dtype=torch.int64) << 16
    views, out = server_views(monkeypatch, x, x)
    assert torch.equal(out[:n], (x * x) >> 16) or ((out[:n] - ((x * x) >> 16)).abs() <= 1).all()
    for party in range(3):
        assert [m for m in views[party] if m[0] == "reveal"] == []
    reveal_msgs = [m for m in views[3] if m[1] in (0, 1, 2) and m[2].numel() == 3 * n]
    assert len(reveal_msgs) == 3
