"""The three servers and the client in one process: as threads, or as greenlets in lockstep.

:func:`run_threads` runs them after the key setup of :func:`siguard.runtime.mpc.prg.setup_keys`: as threads over
an :class:`siguard.runtime.mpc.transport.InProcessNetwork`, or as greenlets in one thread over a
:class:`siguard.runtime.mpc.transport.LockstepNetwork` (``scheduler="lockstep"``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from siguard.core.errors import RuntimeFault

from .client import Client
from .prg import setup_keys
from .rss import RSSEngine
from .transport import CLIENT, InProcessNetwork, LockstepNetwork, StepStats, TransportAborted

__all__ = ["run_threads", "PartyFailure", "SCHEDULERS"]

R = TypeVar("R")
C = TypeVar("C")


class PartyFailure(RuntimeFault):
    """A party's thread failed; ``party`` names it (3 = client) and ``__cause__`` holds the error."""

    def __init__(self, party: int, exc: BaseException):
        who = "the client" if party == CLIENT else f"party P{party}"
        super().__init__(f"{who} failed: {type(exc).__name__}: {exc}")
        self.party = party


def run_threads(
    fn_party: Callable[[RSSEngine], R],
    fn_client: Callable[[Client], C] | None = None,
    *,
    frac_bits: int = 16,
    timeout: float = 30.0,
    session_id: str | None = None,
    scheduler: str = "threads",
) -> tuple[list[R], C | None, list[dict[str, StepStats]]]:
    """Run ``fn_party`` on P0, P1, P2 and ``fn_client`` on the client, all in this process.

    ``scheduler``: ``"threads"`` gives each party its own OS thread (big tensor products of
    different parties overlap on several cores); ``"lockstep"`` runs them as greenlets in this
    thread, switching at every wait (:class:`siguard.runtime.mpc.transport.LockstepNetwork`: a round costs
    less than half as much, which round-bound plans such as the guard feel). The protocol, the
    messages and the statistics are the same.

    The parties run in ``torch.inference_mode`` (faster small ops): tensors they return are inference
    tensors, to be read or cloned, not modified in place outside that mode.

    The servers first agree on keys (:func:`siguard.runtime.mpc.prg.setup_keys`, step "setup"), then derive
    the session's PRF streams. Returns (the three servers' results, the client's result or None,
    the per-step transport statistics of parties 0..3). When a party raises, the network is
    aborted so nobody waits for it, and the first failure (preferring a root cause over the
    aborts it triggered) is raised as :class:`PartyFailure` naming the party.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")
    session = session_id if session_id is not None else secrets.token_hex(8)
    net: InProcessNetwork | LockstepNetwork
    if scheduler == "lockstep":
        net = LockstepNetwork(4, session=session, timeout=timeout)
    else:
        net = InProcessNetwork(4, timeout=timeout, session=session)
    results: list[Any] = [None, None, None]
    client_result: list[Any] = [None]

    def server(i: int) -> None:
        transport = net.transport(i)
        keys = setup_keys(transport)
        results[i] = fn_party(RSSEngine(i, transport, keys.session(session), frac_bits))

    def client() -> None:
        client_result[0] = fn_client(Client(net.transport(CLIENT)))

    bodies: dict[int, Callable[[], None]] = {i: (lambda i=i: server(i)) for i in range(3)}
    if fn_client is not None:
        bodies[CLIENT] = client
    if isinstance(net, LockstepNetwork):
        with torch.inference_mode():  # the parties' greenlets run in this thread (see _run_in_threads)
            failures = net.run(bodies)
    else:
        failures = _run_in_threads(net, bodies)
    stats = [net.transport(p).stats for p in range(4)]
    net.close()
    if failures:
        root = [f for f in failures if not isinstance(f[1], TransportAborted)] or failures
        party, exc = root[0]
        raise PartyFailure(party, exc) from exc
    return results, client_result[0], stats


#: how :func:`run_threads` runs the parties of one process
SCHEDULERS = ("threads", "lockstep")


def _run_in_threads(net: InProcessNetwork, bodies: dict[int, Callable[[], None]]) -> list[tuple[int, BaseException]]:
    """Each body in its own thread; returns the failures (party, exception) in the order they happened,
    aborting the network at the first so nobody waits for a dead party."""
    failures: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def guarded(party: int, body: Callable[[], None]) -> None:
        try:
            # A party runs in inference mode (no autograd, no version counters): every torch op on the small
            # tensors of a round costs less (a view or slice about 0.4 us of 0.8-1.6 us; the guard's
            # instructions -4 % against no_grad). The mode is per OS thread, so the caller's is untouched.
            with torch.inference_mode():
                body()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            with lock:
                failures.append((party, exc))
            net.abort(f"party {party} failed: {type(exc).__name__}: {exc}")

    names = {CLIENT: "siguard-client"}
    threads = [threading.Thread(target=guarded, args=(p, body), name=names.get(p, f"siguard-P{p}"), daemon=True)
               for p, body in bodies.items()]
    for p, t in zip(bodies, threads, strict=True):
        net.attach(p, t)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures
