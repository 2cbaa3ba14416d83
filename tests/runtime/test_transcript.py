"""Control flow never depends on secret data: two different secrets give the same transcript.

The transcript of a party is every message it receives, in order: the step, the sending peer and the shape
(what a party sends is what its peers receive, so the four transcripts cover both directions). The nonlinear
functions (comparisons, exp, reciprocal, softmax, max) run on two inputs that differ everywhere (other signs,
magnitudes and maxima); the transcripts of all four parties must be equal, while the words received differ
(the secrets did change what travelled).
"""

import numpy as np
import torch

from siguard.runtime.kernels import nonlinear as nl
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.ring import encode
from tests.runtime.test_security import record_views

FRAC = 16


def _run(x: np.ndarray):
    xr = encode(x, FRAC)

    def party(e):
        s = e.input("model", xr if e.party == 0 else None, xr.shape)
        outs = [nl.relu(e, s), nl.reduce_max(e, s, -1), nl.exp(e, s, "limit8"), nl.softmax(e, s, -1),
                nl.reciprocal(e, nl.relu(e, s), "newton3", lo=0.5, hi=8.0), nl.clip(e, s, -1.0, 1.0)]
        return [e.reveal(y, "P0") for y in outs]

    run_threads(party, None, timeout=120, session_id="transcript")


def _transcript(views) -> dict[int, list]:
    return {p: [(step, peer, tuple(t.shape)) for step, peer, t in v] for p, v in views.items()}


def test_two_secrets_give_the_same_transcript(monkeypatch):
    views = record_views(monkeypatch)
    rng = np.random.default_rng(0)
    _run(rng.uniform(-4, 4, (3, 6)))
    first, first_words = _transcript(views), {p: [t for _, _, t in v] for p, v in views.items()}
    for p in range(4):
        views[p].clear()
    _run(-rng.uniform(0.5, 6, (3, 6)))  # other signs, magnitudes and maxima
    assert all(first[p] for p in range(3))
    second = _transcript(views)
    for p in range(4):
        assert second[p] == first[p], f"party {p}: the transcript depends on the secret"
    words = {p: [t for _, _, t in v] for p, v in views.items()}
    differ = sum(not torch.equal(a, b) for p in range(3) for a, b in zip(words[p], first_words[p], strict=True))
    assert differ > len(first_words[0]) // 2  # the secret did change the words (the comparison is not vacuous)
