"""The client's numpy side (issue 14: the query client never imports torch) against the torch path it replaced.

The oracle is the client as it was written on torch -- ``ring.encode`` (torch.round of a float64 tensor),
``WordStream.words`` (the AES-128-CTR keystream as an int64 tensor) and ``Client.share_input`` (tensor
arithmetic, then ``torch.stack``) -- restated here, with the private key derived and the keystream made
straight from hmac and AES: it shares no code with the numpy client under test. The words the client hands
its transport must equal the oracle's bit for bit (the servers take them as they are); the output it
reconstructs and decodes must equal torch's wrap-around sum and division.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from siguard.core.fixedpoint import MAX_ABS_REAL, decode_words, encode_words
from siguard.runtime.mpc.client import Client
from siguard.runtime.mpc.prg import PartyKeys
from siguard.runtime.mpc.transport import CLIENT, Transport


class _Wire(Transport):
    """The client's transport, recording what it sends and answering receives with the given payloads."""

    def __init__(self, replies=None):
        super().__init__(CLIENT, "s")
        self.sent: dict[int, tuple] = {}
        self.replies = dict(replies or {})

    def _send_words(self, peer, header, words):
        self.sent[peer] = (header, words.copy())  # the words a frame carries
        return 0

    def _recv_words(self, peer, deadline):
        payload = self.replies[peer]
        return (self.session, self.current_step, peer, 0, tuple(payload.shape)), payload


def _torch_shares(x: np.ndarray, frac_bits: int, master: bytes, session_id: bytes) -> dict[int, torch.Tensor]:
    """The client's messages as the torch client computed them (see the module docstring)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(torch.float64)
    enc = torch.round(t * float(2**frac_bits)).to(torch.int64)
    key = hmac.new(master, b"siguard-prf/v1" + b"private3" + b"\x00" + session_id, hashlib.sha256).digest()[:16]
    n = enc.numel()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(16 * n))
    words = torch.from_numpy(np.frombuffer(stream, dtype="<i8").astype(np.int64))
    x0, x1 = words[:n].reshape(enc.shape), words[n:].reshape(enc.shape)
    comps = (x0, x1, enc - x0 - x1)
    return {i: torch.stack((comps[i], comps[(i + 1) % 3])) for i in range(3)}


def _inputs(seed: int, frac_bits: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ulp = 2.0**-frac_bits
    limit = MAX_ABS_REAL(frac_bits)
    ties = (np.arange(-40, 40) + 0.5) * ulp  # half-way between two grid points: round half to even
    edges = np.array([0.0, -0.0, ulp, -ulp, 0.49 * ulp, -0.51 * ulp, limit * 0.999, -limit * 0.999, 1e-300])
    return [
        rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32),  # a CIFAR image, as `siguard query` reads it
        rng.normal(0, 1000, (8, 64)),
        np.concatenate([ties, edges]).reshape(1, -1),
        (rng.normal(0, 1, (2, 5)) * 2.0 ** rng.integers(-20, 40, (2, 5))).astype(np.float64),
    ]


@pytest.mark.parametrize("frac_bits", [12, 16, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_input_shares_equal_the_torch_clients_bit_for_bit(seed, frac_bits):
    master = hashlib.sha256(f"client key {seed}".encode()).digest()[:16]
    for k, x in enumerate(_inputs(seed, frac_bits)):
        session_id = f"q{seed}-{k}".encode()
        wire = _Wire()
        client = Client(wire, PartyKeys(CLIENT, private=master).session(session_id))
        client.share_input(encode_words(x, frac_bits))
        want = _torch_shares(x, frac_bits, master, session_id)
        assert sorted(wire.sent) == [0, 1, 2]
        for i in range(3):
            header, words = wire.sent[i]
            assert words.dtype == np.int64 and header.shape == (2, *x.shape) == tuple(want[i].shape)
            assert words.tobytes() == want[i].numpy().tobytes(), (seed, frac_bits, k, i)


def test_the_shares_reconstruct_the_encoded_input_modulo_2_64():
    x = _inputs(5, 16)[2]
    wire = _Wire()
    Client(wire, PartyKeys(CLIENT, private=bytes(16)).session(b"q1")).share_input(encode_words(x, 16))
    s = [wire.sent[i][1] for i in range(3)]
    for i in range(3):  # P_i's second slot is P_{i+1}'s first: one replicated sharing
        assert np.array_equal(s[i][1], s[(i + 1) % 3][0])
    total = torch.from_numpy(s[0][0]) + torch.from_numpy(s[1][0]) + torch.from_numpy(s[2][0])
    assert torch.equal(total, torch.round(torch.from_numpy(x.astype(np.float64)) * 2.0**16).to(torch.int64))


def test_received_output_is_torch_wraparound_sum_and_decode():
    rng = np.random.default_rng(7)
    extremes = np.array([-(2**63), 2**63 - 1, -1, 0, 1, 2**62], dtype=np.int64)
    parts = [np.concatenate([rng.integers(-(2**63), 2**63 - 1, 10, dtype=np.int64, endpoint=True), extremes])
             .reshape(2, 8) for _ in range(3)]
    replies = {i: p.copy() for i, p in enumerate(parts)}  # (every transport delivers numpy words)
    got = Client(_Wire(replies)).receive_output((2, 8))
    tensors = [torch.from_numpy(p) for p in parts]
    want = tensors[0] + tensors[1] + tensors[2]
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and np.array_equal(got, want.numpy())
    for f in (12, 16, 20):
        assert decode_words(got, f).tobytes() == (want.to(torch.float64) / float(2**f)).numpy().tobytes()


def test_encoding_refuses_what_the_torch_encoder_refused():
    for bad, message in [(np.nan, "NaN or infinite"), (-np.inf, "NaN or infinite"), (2.0**46, "too large")]:
        with pytest.raises(ValueError, match=message):
            encode_words(np.array([[0.5, bad]]), 16)
