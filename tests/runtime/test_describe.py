"""Implementation descriptions carry round counts measured, not written: describe() against the transport."""

import re

import pytest
import torch

from siguard.runtime.kernels import nonlinear as nl
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.transport import StepStats

CASES = [
    ("relu", "exact", {}),
    ("exp", "limit8", {}),
    ("reciprocal", "newton3", {}),
    ("sigmoid", "chebyshev16", {}),
    ("softmax", "max_exp_recip", {"axis": -1}),
    ("clip", "exact", {"min": -2.0, "max": 3.0}),
]


def _secure_rounds(op: str, impl: str, attrs: dict) -> int:
    """Rounds the in-process transport counts for the implementation on a (2, 10) secret (every party agrees)."""
    fn = nl.get_implementation(op, impl)
    x = torch.zeros((2, 10), dtype=torch.int64)

    def party(e):
        xs = e.input("model", x if e.party == 0 else None, x.shape)
        with e.transport.step("op"):
            fn(e, xs, **attrs)

    _, _, stats = run_threads(party, None, timeout=60)
    rounds = {stats[p].get("op", StepStats()).rounds for p in range(3)}
    assert len(rounds) == 1, rounds
    return rounds.pop()


@pytest.mark.parametrize("op,impl,attrs", CASES, ids=[f"{op}-{impl}" for op, impl, _ in CASES])
def test_described_rounds_are_what_the_secure_run_takes(op, impl, attrs):
    text = nl.describe(op, impl, (2, 10), **attrs)
    assert text.startswith(nl.DESCRIPTIONS[op][impl])
    stated = int(re.search(r"; (\d+) rounds on a \(2, 10\) secret$", text).group(1))
    assert stated == _secure_rounds(op, impl, attrs) > 0


def test_no_description_states_a_round_count_by_hand():
    for op, impls in nl.DESCRIPTIONS.items():
        for impl, text in impls.items():
            assert not re.search(r"\d+ rounds|/iteration", text), (op, impl, text)
