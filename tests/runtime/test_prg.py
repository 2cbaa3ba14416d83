"""The PRF, pairwise keys, zero sharings, key setup, and the absence of non-cryptographic RNGs."""

import ast
import pathlib
import random
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.prg import PartyKeys, WordStream, derive_key, new_key, setup_keys
from siguard.runtime.mpc.transport import InProcessNetwork

RUNTIME = pathlib.Path(__file__).resolve().parents[2] / "runtime"


def three_parties(session="s"):
    """Randomness of P0, P1, P2 with consistent pairwise keys (P_i holds k_i and k_{i+1})."""
    k = [new_key() for _ in range(3)]
    common = new_key()
    return [PartyKeys(i, own=k[i], next_key=k[(i + 1) % 3], common=common).session(session) for i in range(3)]


def test_zero_shares_sum_to_zero():
    rs = three_parties()
    for n in [5, 12, 1, 1000]:
        alphas = [r.zero_share_np(n) for r in rs]
        assert alphas[0].shape == (n,) and alphas[0].dtype == np.int64
        assert not (alphas[0] + alphas[1] + alphas[2]).any()
        assert alphas[0].any() or n == 1
        betas = [r.zero_share_xor_np(n) for r in rs]
        assert not (betas[0] ^ betas[1] ^ betas[2]).any()


def test_pairs_form_a_replicated_sharing():
    rs = three_parties()
    pairs = [r.pair_np(64) for r in rs]
    for i in range(3):  # P_i's second word is P_{i+1}'s first: both are F_{k_{i+1}}
        assert np.array_equal(pairs[i][1], pairs[(i + 1) % 3][0])


def test_mismatched_draws_do_not_cancel():
    rs = three_parties()
    rs[1].key_stream_np(1, 3)  # P1 draws from k1 once more than P0
    alphas = [r.zero_share_np(100) for r in rs]
    total = alphas[0] + alphas[1] + alphas[2]
    assert (total != 0).mean() > 0.9


def test_streams_are_deterministic_and_session_separated():
    key = new_key()
    a = PartyKeys(0, own=key, next_key=key).session("q1")
    b = PartyKeys(0, own=key, next_key=key).session("q1")
    c = PartyKeys(0, own=key, next_key=key).session("q2")
    x, y, z = a.key_stream_np(0, 256), b.key_stream_np(0, 256), c.key_stream_np(0, 256)
    assert np.array_equal(x, y)
    assert not np.array_equal(x, z)
    assert derive_key(key, "k0", "q1") != derive_key(key, "k1", "q1")


def test_stream_does_not_depend_on_draw_sizes():
    """Words [drawn, drawn + n) of the keystream, whatever the buffering."""
    key = new_key()
    one, many = WordStream(key), WordStream(key)
    whole = one.take(3 * WordStream.CHUNK).copy()
    sizes = [1, 7, WordStream.CHUNK - 3, 2, WordStream.CHUNK + 5, 100]
    parts = [many.take(n).copy() for n in sizes]
    got = np.concatenate(parts)
    assert np.array_equal(got, whole[: got.size])
    assert many.drawn == got.size


def test_word_stream_is_aes_128_ctr_from_counter_zero():
    """The words are AES-128-CTR's keystream (counter block 0, 1, ...) read as little-endian int64, computed
    here block by block with AES-ECB on the counter blocks: an oracle that shares no code with the stream."""
    key = new_key()
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    sizes = [3, WordStream.CHUNK - 3, 4000, 1904]  # past a CHUNK
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(sum(sizes) // 2))
    want = np.frombuffer(blocks, dtype="<i8").astype(np.int64)
    s = WordStream(key)
    got = np.concatenate([s.take(n) for n in sizes])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert not np.array_equal(WordStream(new_key()).take(10), want[:10])


def test_party_cannot_draw_a_key_it_lacks():
    rs = three_parties()
    with pytest.raises(ValueError, match="does not hold key k2"):
        rs[0].key_stream_np(2, 1)
    assert rs[0].holds(0) and rs[0].holds(1) and not rs[0].holds(2)


def test_words_look_uniform():
    w = PartyKeys(0).session("u").private_np(200_000)
    bits = np.stack([(w >> k) & 1 for k in range(64)]).mean(axis=1)
    assert np.abs(bits - 0.5).max() < 5 / (2 * 200_000**0.5)


def test_setup_keys_one_round_and_consistent():
    net = InProcessNetwork(4, timeout=10)
    keys = [None] * 3

    def run(i):
        keys[i] = setup_keys(net.transport(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert keys[i].next_key == keys[(i + 1) % 3].own  # P_i holds k_{i+1}, sent by P_{i+1}
        assert keys[i].common == keys[0].common
        assert keys[i].private not in (keys[j].private for j in range(3) if j != i)
        st = net.transport(i).stats["setup"]
        assert st.rounds == 1 and st.payload_bytes == 48
    assert len({k.own for k in keys}) == 3


# ---- no non-cryptographic randomness in protocol code ------------------------------------------
_FORBIDDEN_ATTRS = {
    ("np", "random"),
    ("numpy", "random"),
    ("torch", "rand"),
    ("torch", "randn"),
    ("torch", "randint"),
    ("torch", "randperm"),
    ("torch", "rand_like"),
    ("torch", "randint_like"),
    ("torch", "randn_like"),
    ("torch", "manual_seed"),
    ("torch", "Generator"),
    ("torch", "bernoulli"),
    ("torch", "multinomial"),
    ("torch", "normal"),
}


RUNTIME_MODULES = sorted(p.relative_to(RUNTIME).as_posix() for p in RUNTIME.rglob("*.py"))


def test_the_rng_rule_covers_the_protocol_modules():
    assert {"mpc/prg.py", "mpc/rss.py", "mpc/client.py", "mpc/inprocess.py", "mpc/transport.py",
            "kernels/cost.py", "kernels/guard.py", "kernels/nonlinear.py", "kernels/inputs.py", "net/server.py",
            "net/tls.py", "net/client.py"} <= set(RUNTIME_MODULES)


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_protocol_code_uses_no_numpy_torch_or_stdlib_rng(module):
    tree = ast.parse((RUNTIME / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name not in ("random", "numpy.random") for a in node.names), module
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("random", "numpy.random", "torch.random"), module
            assert not (node.module in ("numpy", "torch") and any(a.name == "random" for a in node.names))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in _FORBIDDEN_ATTRS, f"{module}: {node.value.id}.{node.attr}"
        if isinstance(node, ast.Attribute) and node.attr in ("uniform_", "random_", "normal_", "bernoulli_"):
            pytest.fail(f"{module}: in-place RNG .{node.attr}")


def test_protocols_run_with_every_non_crypto_rng_disabled(monkeypatch):
    x = torch.tensor([5 << 16, -(3 << 16), 0, -1, 2**40, -(2**40)], dtype=torch.int64)
    y = torch.tensor([2 << 16, 7, -1, 1 << 16, -(2 << 16), 3], dtype=torch.int64)

    def boom(*args, **kwargs):
        raise AssertionError("non-cryptographic RNG used")

    for name in ("rand", "randn", "randint", "randperm", "rand_like", "randint_like", "randn_like", "bernoulli"):
        monkeypatch.setattr(torch, name, boom)
    for name in ("rand", "randn", "randint", "random", "default_rng", "seed", "bytes", "permutation", "choice"):
        monkeypatch.setattr(np.random, name, boom)
    for name in ("random", "randint", "getrandbits", "randbytes", "choice"):
        monkeypatch.setattr(random, name, boom)

    def party(e):
        X = e.input("client", None, x.shape)
        Y = e.input("model", y if e.party == 0 else None, y.shape)
        p = e.trunc(e.mul(X, Y), 16)
        m = e.msb(X)
        r = e.mul_bit(X, e.bit_not(m))
        b = e.b2a(e.bit_and(m, e.msb(Y)))
        e.reveal(e.cat([p, r, b], 0), "client")

    def client(c):
        c.share_input(x)
        return c.receive_output((3 * x.numel(),))

    _, out, _ = run_threads(party, client, timeout=20)
    n = x.numel()
    xn, yn = x.numpy(), y.numpy()
    assert (np.abs(out[:n] - ((xn * yn) >> 16)) <= 1).all()
    assert np.array_equal(out[n : 2 * n], np.where(xn >= 0, xn, 0))
    assert np.array_equal(out[2 * n :], ((xn < 0) & (yn < 0)).astype(np.int64))
