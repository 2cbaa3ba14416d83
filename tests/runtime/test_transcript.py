"""Control flow never depends on secret data: two different secrets give the same transcript.

The transcript of a party is every round it takes part in: the step, and for each peer the shape of what
it sends and what it receives, in order. The nonlinear functions (comparisons, exp, reciprocal, softmax,
max) run on two inputs that differ everywhere (other signs, magnitudes and maxima); the transcripts of all
four parties must be equal, while the words received differ (the secrets did change what travelled).
"""

import threading

import numpy as np
import torch

from siguard.runtime.kernels import nonlinear as nl
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.transport import InProcessTransport
from siguard.runtime.ring import encode

FRAC = 16


def _record(monkeypatch):
    transcripts = {p: [] for p in range(4)}
    words = {p: [] for p in range(4)}
    lock = threading.Lock()
    original = InProcessTransport.exchange

    def exchange(self, send, recv):
        got = original(self, send, recv)
        with lock:
            sent = tuple((p, tuple(t.shape)) for p, t in sorted(send.items()))
            expected = tuple((p, tuple(s)) for p, s in sorted(recv.items()))
            transcripts[self.party].append((self.current_step, sent, expected))
            words[self.party].extend(got[p].clone() for p in sorted(got))
        return got

    monkeypatch.setattr(InProcessTransport, "exchange", exchange)
    return transcripts, words


def _run(x: np.ndarray):
    xr = encode(x, FRAC)

    def party(e):
        s = e.input("model", xr if e.party == 0 else None, xr.shape)
        outs = [nl.relu(e, s), nl.reduce_max(e, s, -1), nl.exp(e, s, "limit8"), nl.softmax(e, s, -1),
                nl.reciprocal(e, nl.relu(e, s), "newton3", lo=0.5, hi=8.0), nl.clip(e, s, -1.0, 1.0)]
        return [e.reveal(y, "P0") for y in outs]

    run_threads(party, None, timeout=120, session_id="transcript")


def test_two_secrets_give_the_same_transcript(monkeypatch):
    transcripts, words = _record(monkeypatch)
    rng = np.random.default_rng(0)
    _run(rng.uniform(-4, 4, (3, 6)))
    first = {p: list(t) for p, t in transcripts.items()}
    first_words = {p: list(w) for p, w in words.items()}
    for p in range(4):
        transcripts[p].clear()
        words[p].clear()
    _run(-rng.uniform(0.5, 6, (3, 6)))  # other signs, magnitudes and maxima
    assert all(first[p] for p in range(3))
    for p in range(4):
        assert transcripts[p] == first[p], f"party {p}: the transcript depends on the secret"
    differ = sum(not torch.equal(a, b) for p in range(3) for a, b in zip(words[p], first_words[p], strict=True))
    assert differ > len(first_words[0]) // 2  # the secret did change the words (the comparison is not vacuous)
