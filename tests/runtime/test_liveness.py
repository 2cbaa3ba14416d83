"""Liveness, not patience: a peer that computes longer than the timeout is waited for; a dead or
silent one is reported (at once when its thread ends, after the timeout when it is silent)."""

import time

import pytest
import torch

from siguard.runtime.mpc.inprocess import PartyFailure, run_threads
from siguard.runtime.mpc.transport import InProcessNetwork, TransportTimeout

X = torch.arange(-5, 7, dtype=torch.int64) << 16


def _square_at_p0(slow_party: int | None, seconds: float):
    def party(e):
        x = e.input("model", X if e.party == 0 else None, (X.numel(),))
        if e.party == slow_party:
            time.sleep(seconds)  # "computing": alive, sends nothing
        return e.reveal(e.mul(x, x), "P0")

    return party


@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
def test_a_party_computing_longer_than_the_timeout_is_waited_for(scheduler):
    t0 = time.monotonic()
    results, _, _ = run_threads(_square_at_p0(1, 2.0), timeout=0.5, scheduler=scheduler)
    assert time.monotonic() - t0 >= 2.0
    assert torch.equal(results[0], X * X)  # the plain ring product (no truncation requested)


def test_a_party_that_ends_without_sending_is_reported_at_once():
    def party(e):
        if e.party == 2:
            return None  # "killed": its thread ends, it never takes part in the multiplication
        x = e.input("model", X if e.party == 0 else None, (X.numel(),))
        return e.mul(x, x)

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match="party 2 ended without sending"):
        run_threads(party, timeout=30)
    assert time.monotonic() - t0 < 5  # well within the 30 s timeout


def test_a_party_that_raises_is_reported_at_once():
    def party(e):
        x = e.input("model", X if e.party == 0 else None, (X.numel(),))
        if e.party == 1:
            raise RuntimeError("killed")
        return e.mul(x, x)

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match="P1 failed: RuntimeError: killed"):
        run_threads(party, timeout=30)
    assert time.monotonic() - t0 < 5


def test_a_cycle_of_waits_is_silence_and_times_out():
    """Two live threads that each wait for the other: neither computes, so both are silent."""
    import threading

    net = InProcessNetwork(4, timeout=1.0)
    errors = {}

    def wait_for(me, peer):
        try:
            net.transport(me).exchange({}, {peer: (1,)})
        except Exception as exc:  # noqa: BLE001 - inspected below
            errors[me] = exc

    threads = {p: threading.Thread(target=wait_for, args=(p, 1 - p)) for p in (0, 1)}
    for p, t in threads.items():
        net.attach(p, t)
    t0 = time.monotonic()
    for t in threads.values():
        t.start()
    for t in threads.values():
        t.join(10)
    elapsed = time.monotonic() - t0
    assert isinstance(errors.get(0), TransportTimeout) or isinstance(errors.get(1), TransportTimeout), errors
    assert 1.0 <= elapsed < 5


def test_a_waiting_party_is_live_while_the_party_it_waits_for_computes():
    import threading

    net = InProcessNetwork(4, timeout=30)
    gates = {p: threading.Event() for p in (0, 1)}
    threads = {p: threading.Thread(target=gates[p].wait) for p in (0, 1)}
    for p, t in threads.items():
        net.attach(p, t)
        t.start()
    net.waiting[0] = 1  # party 0 is blocked on party 1, which computes
    assert net.live(1) and net.live(0)
    assert not net.live(2)  # no thread: unknown, so silent
    gates[1].set()
    threads[1].join()
    assert not net.live(1) and not net.live(0)  # it waits for a party that ended
    net.waiting[1] = 0
    gates[0].set()
    threads[0].join()
