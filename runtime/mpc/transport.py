"""Message passing between the parties: one round = one :meth:`Transport.exchange_words` call.

Parties are numbered 0, 1, 2 (compute servers P0, P1, P2) and 3 (the client). In one round a
party sends at most one int64 array to each peer and receives at most one from each peer; a
protocol that has two things for the same peer in one round concatenates them. Every server
calls :meth:`Transport.exchange_words` (or :meth:`Transport.exchange`) once per protocol round,
even with nothing to send or receive, so the three servers count the same rounds.

Payloads are int64 words: :meth:`Transport.exchange_words` takes and returns numpy arrays (what the
protocols compute on, :mod:`siguard.runtime.mpc.rss`, and what the networked query client sends),
:meth:`Transport.exchange` is the same round on torch tensors. A transport implements
``_send_words``/``_recv_words``: numpy arrays on the in-process links and in the TLS frames. This module
does not import torch (the torch face imports it when called): the query client, which imports it, never
loads torch.

Frames carry a :class:`FrameHeader` (session, step, sender, per-link sequence number) ahead of
the payload, so a networked transport can frame messages identically and every side can detect a
desynchronised peer. Payload bytes (8 per int64 element) and framing bytes are counted
separately, per named step (:meth:`Transport.step`).

:class:`InProcessNetwork` runs all parties as threads of one process with one
``queue.SimpleQueue`` per directed link (C-implemented, about half the per-round cost of
``queue.Queue``). A receive waits as long as its peer is *live*, and at most the timeout for a
*silent* one: party threads are registered with :meth:`InProcessNetwork.attach`; a peer whose
thread runs and is not blocked in a receive is computing (live, however long it takes); a peer
blocked in a receive is live if the party it waits for is (a cycle of waits is silence); a peer
with no registered thread, or one whose thread ended without sending, is silent.
:meth:`InProcessNetwork.abort` (called the moment a party thread raises) wakes every blocked
receiver with :class:`TransportAborted`, so a dead thread never hangs the others.

:class:`LockstepNetwork` runs all parties in ONE OS thread as greenlets: a party that waits for a
message it does not have yet switches to a scheduler, which resumes the next party. No thread
hand-off, no lock, no GIL contention: a bare round costs about 30 us instead of about 70 us
(``benchmarks/round_cost.py``), which is what round-bound plans (the guard's ~38k rounds) pay.
A state where every live party waits is a deadlock and is reported at once (no timeout needed).
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CLIENT",
    "SERVERS",
    "TransportError",
    "TransportTimeout",
    "TransportAborted",
    "FrameHeader",
    "StepStats",
    "Transport",
    "InProcessNetwork",
    "InProcessTransport",
    "LockstepNetwork",
    "LockstepTransport",
]

CLIENT = 3
SERVERS = (0, 1, 2)
DEFAULT_STEP = "main"


class TransportError(RuntimeError):
    """A communication failure, naming the party that saw it and the peer involved."""

    def __init__(self, message: str, party: int | None = None, peer: int | None = None):
        super().__init__(message)
        self.party = party
        self.peer = peer


class TransportTimeout(TransportError):
    """A peer's message did not arrive before the deadline."""


class TransportAborted(TransportError):
    """The network was aborted (a party failed or the run was cancelled) while waiting."""


_HEADER_FIXED = struct.Struct("<BIQB")  # sender, len(step) | len(session) << 16, seq, ndim
_NP_INT64 = np.dtype(np.int64)
_new_header = tuple.__new__  # builds a FrameHeader without NamedTuple's keyword-handling __new__


class FrameHeader(NamedTuple):
    """What precedes every payload on the wire.

    ``seq`` numbers the frames of one directed link (sender -> receiver) from 0; the receiver
    checks it, and checks that two servers agree on ``step``. (A NamedTuple: it is built twice
    per message, so it must be cheap.)
    """

    session: str
    step: str
    sender: int
    seq: int
    shape: tuple[int, ...]

    def encode(self) -> bytes:
        """Binary form: fixed fields, shape (uint64 each), session, step (UTF-8)."""
        session, step = self.session.encode(), self.step.encode()
        if len(session) > 0xFFFF or len(step) > 0xFFFF:
            raise ValueError("session and step names are limited to 65535 bytes")
        fixed = _HEADER_FIXED.pack(self.sender, len(step) | len(session) << 16, self.seq, len(self.shape))
        return fixed + struct.pack(f"<{len(self.shape)}Q", *self.shape) + session + step

    @classmethod
    def decode(cls, data: bytes) -> FrameHeader:
        sender, lengths, seq, ndim = _HEADER_FIXED.unpack_from(data)
        off = _HEADER_FIXED.size
        shape = struct.unpack_from(f"<{ndim}Q", data, off)
        off += 8 * ndim
        n_step, n_session = lengths & 0xFFFF, lengths >> 16
        if len(data) != off + n_session + n_step:  # a header is exactly its declared fields
            raise ValueError(f"frame header of {len(data)} bytes declares {off + n_session + n_step}")
        session = data[off : off + n_session].decode()
        step = data[off + n_session : off + n_session + n_step].decode()
        return cls(session, step, sender, seq, tuple(shape))


@dataclass
class StepStats:
    """Communication of one party in one step.

    ``sent``/``received``: payload bytes per peer (8 per int64 element); ``framing_bytes``: header
    bytes on top of the payload (0 in process); ``rounds``: number of exchange calls.
    """

    rounds: int = 0
    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    framing_bytes: int = 0

    @property
    def payload_bytes(self) -> int:
        """Total payload bytes sent."""
        return sum(self.sent.values())

    def merge(self, other: StepStats) -> None:
        self.rounds += other.rounds
        self.framing_bytes += other.framing_bytes
        for peer, n in other.sent.items():
            self.sent[peer] = self.sent.get(peer, 0) + n
        for peer, n in other.received.items():
            self.received[peer] = self.received.get(peer, 0) + n

    def copy(self) -> StepStats:
        return StepStats(self.rounds, dict(self.sent), dict(self.received), self.framing_bytes)


class Transport(ABC):
    """One party's endpoint. Subclasses implement :meth:`_send_words` and :meth:`_recv_words`."""

    party: int
    session: str
    timeout: float

    def __init__(self, party: int, session: str = "", timeout: float = 30.0):
        self.party = party
        self.session = session
        self.timeout = timeout  # seconds to wait for each round's messages
        self._steps: list[str] = []
        self._stats: dict[str, StepStats] = {}
        self._sent_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}

    # ---- steps and statistics ---------------------------------------------------------------
    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Attribute the rounds and bytes of the enclosed exchanges to ``name`` (innermost wins)."""
        self._steps.append(name)
        try:
            yield
        finally:
            self._steps.pop()

    @property
    def current_step(self) -> str:
        return self._steps[-1] if self._steps else DEFAULT_STEP

    @property
    def stats(self) -> dict[str, StepStats]:
        """Per step: rounds, payload bytes per peer, framing bytes (a copy)."""
        return {name: s.copy() for name, s in self._stats.items()}

    def total(self, exclude: Sequence[str] = ()) -> StepStats:
        """All steps summed, except those named in ``exclude`` (e.g. "setup")."""
        out = StepStats()
        for name, s in self._stats.items():
            if name not in exclude:
                out.merge(s)
        return out

    def reset_stats(self, keep_prefix: str | None = None) -> None:
        """Forget the counters (of every step, or of the steps whose name does not start with
        ``keep_prefix``, e.g. "setup" to keep the once-per-start costs)."""
        if keep_prefix is None:
            self._stats.clear()
            return
        for name in [n for n in self._stats if not n.startswith(keep_prefix)]:
            del self._stats[name]

    # ---- one round --------------------------------------------------------------------------
    def exchange(self, send: Mapping[int, Any], recv: Mapping[int, tuple[int, ...]]) -> dict[int, Any]:
        """One round: send ``send[peer]`` to each peer, then receive a tensor of shape
        ``recv[peer]`` from each peer. Raises :class:`TransportError` naming the peer on timeout,
        abort, or a frame that does not match (wrong shape, sequence or step).

        The torch face of :meth:`exchange_words` (the same round: the tensors travel as their words)."""
        import torch  # (already loaded wherever tensors are exchanged; the client never calls this)

        words = {}
        for peer, tensor in send.items():
            if tensor.dtype is not torch.int64:
                raise TypeError(f"party {self.party}: payloads are int64 tensors, got {tensor.dtype}")
            words[peer] = tensor.numpy()
        return {peer: torch.from_numpy(a) for peer, a in self.exchange_words(words, recv).items()}

    def exchange_words(
        self, send: Mapping[int, np.ndarray], recv: Mapping[int, tuple[int, ...]]
    ) -> dict[int, np.ndarray]:
        """:meth:`exchange` on numpy int64 arrays: every round, also each :meth:`exchange`, is one call of
        this (or of :meth:`exchange_owned`). The protocols compute on numpy words
        (:mod:`siguard.runtime.mpc.rss`), so they skip the conversions to torch and back (about 3 us per
        message). The received arrays are the caller's."""
        return self._exchange(send, recv, False)

    def exchange_owned(
        self, send: Mapping[int, np.ndarray], recv: Mapping[int, tuple[int, ...]]
    ) -> dict[int, np.ndarray]:
        """:meth:`exchange_words` for a caller that hands the send arrays over: it never reads or writes them
        again (e.g. a concatenation made for this round), so a link may pass them on without a copy."""
        return self._exchange(send, recv, True)

    def _exchange(
        self, send: Mapping[int, np.ndarray], recv: Mapping[int, tuple[int, ...]], owned: bool
    ) -> dict[int, np.ndarray]:
        steps = self._steps
        step = steps[-1] if steps else DEFAULT_STEP
        st = self._stats.get(step)
        if st is None:
            st = self._stats[step] = StepStats()
        st.rounds += 1
        party = self.party
        if send:
            sent, sent_seq, session = st.sent, self._sent_seq, self.session
            send_words = self._send_owned if owned else self._send_words
            for peer, words in send.items():
                if peer == party:
                    raise ValueError(f"party {party} cannot send to itself")
                if words.dtype is not _NP_INT64 and words.dtype != _NP_INT64:
                    raise TypeError(f"party {party}: payloads are int64 words, got {words.dtype}")
                seq = sent_seq.get(peer, 0)
                sent_seq[peer] = seq + 1
                header = _new_header(FrameHeader, (session, step, party, seq, words.shape))
                st.framing_bytes += send_words(peer, header, words)
                sent[peer] = sent.get(peer, 0) + 8 * words.size
        if not recv:
            return {}
        out: dict[int, np.ndarray] = {}
        received, recv_seq, session = st.received, self._recv_seq, self.session
        deadline = time.monotonic() + self.timeout
        for peer, shape in recv.items():
            seq = recv_seq.get(peer, 0)
            recv_seq[peer] = seq + 1
            header, words = self._recv_words(peer, deadline)
            if header[3] != seq or header[1] != step or header[2] != peer or header[4] != shape or header[0] != session:
                self._check_frame(peer, header, seq, step, tuple(shape))
            received[peer] = received.get(peer, 0) + 8 * words.size
            out[peer] = words
        return out

    def _check_frame(self, peer: int, header: FrameHeader, seq: int, step: str, shape: tuple) -> None:
        """Raise the error that describes a mismatching frame (steps may differ with the client)."""
        where = f"party {self.party}, step {step!r}: frame from party {peer}"
        if header.sender != peer or header.session != self.session:
            raise TransportError(f"{where} has sender {header.sender}, session {header.session!r}", self.party, peer)
        if header.seq != seq:
            raise TransportError(f"{where} has sequence number {header.seq}, expected {seq}", self.party, peer)
        if peer in SERVERS and self.party in SERVERS and header.step != step:
            raise TransportError(f"{where} belongs to step {header.step!r} (peers out of step)", self.party, peer)
        if header.shape != shape:
            raise TransportError(f"{where} has shape {header.shape}, expected {shape}", self.party, peer)

    @abstractmethod
    def _send_words(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        """Queue one frame to ``peer`` without blocking (the sender may reuse ``words`` after the round: a link
        that keeps them must copy); return the framing bytes it added."""

    def _send_owned(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        """:meth:`_send_words` for words the sender hands over (:meth:`exchange_owned`): a link that keeps
        them may skip the copy."""
        return self._send_words(peer, header, words)

    @abstractmethod
    def _recv_words(self, peer: int, deadline: float) -> tuple[FrameHeader, np.ndarray]:
        """The next frame from ``peer`` as numpy words, waiting until ``deadline`` (time.monotonic())."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the in-process transport has none."""


#: put on a link's queue when the network is aborted (every receive on that link then fails)
ABORT = object()


class InProcessNetwork:
    """All parties in one process (threads), one FIFO per directed link.

    ``transport(i)`` returns party i's endpoint. ``abort(reason)`` makes every blocked and every
    later receive raise :class:`TransportAborted`; ``close()`` aborts with "network closed".
    """

    #: seconds between liveness checks while a receive waits
    tick = 0.5

    def __init__(self, n_parties: int = 4, timeout: float = 30.0, session: str = ""):
        self.n_parties = n_parties
        self.timeout = timeout  # seconds to wait for a SILENT peer (a live one is waited for)
        self.session = session
        self._links = {(s, d): queue.SimpleQueue() for s in range(n_parties) for d in range(n_parties) if s != d}
        self._transports: dict[int, InProcessTransport] = {}
        self._lock = threading.Lock()
        self.abort_reason: str | None = None
        self.threads: dict[int, threading.Thread] = {}  # party -> the thread running it
        self.waiting: dict[int, int] = {}  # party -> the peer it has been blocked on for a tick or more

    def attach(self, party: int, thread: threading.Thread) -> None:
        """Declare that ``thread`` runs ``party``: its peers then wait for it as long as it is live."""
        self.threads[party] = thread

    def live(self, party: int) -> bool:
        """Whether ``party`` is computing, or waits (transitively) for a party that is.

        A party with no attached thread, a finished thread, or a cycle of waits is not live."""
        seen = set()
        while party not in seen:
            seen.add(party)
            thread = self.threads.get(party)
            if thread is None or (thread.ident is not None and not thread.is_alive()):
                return False  # unknown, or ended (a thread not started yet counts as live)
            peer = self.waiting.get(party)
            if peer is None:
                return True  # running: computing, however long
            party = peer
        return False

    def transport(self, party: int) -> InProcessTransport:
        if not 0 <= party < self.n_parties:
            raise ValueError(f"no party {party} in a network of {self.n_parties}")
        with self._lock:
            if party not in self._transports:
                self._transports[party] = InProcessTransport(self, party)
            return self._transports[party]

    def abort(self, reason: str) -> None:
        """Wake every receiver with :class:`TransportAborted` (idempotent; the first reason wins)."""
        with self._lock:
            if self.abort_reason is not None:
                return
            self.abort_reason = reason
        for link in self._links.values():
            link.put(ABORT)

    def close(self) -> None:
        self.abort("network closed")


class InProcessTransport(Transport):
    """Party ``party``'s endpoint on an :class:`InProcessNetwork`. Payloads are copied on send (numpy words
    on the links), so neither side can alias the other's."""

    def __init__(self, network: InProcessNetwork, party: int):
        super().__init__(party, network.session, network.timeout)
        self.network = network
        # this party's ends of the links, looked up once (a round is a few microseconds of Python)
        self._put = {d: q.put for (s, d), q in network._links.items() if s == party}
        self._get = {s: q.get for (s, d), q in network._links.items() if d == party}

    def _send_words(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        # The copy: the sender may reuse its words after the round; the receiver owns its copy. It is
        # made by numpy, which keeps the GIL: torch's clone releases it, and a party thread that lets
        # go of the GIL in the middle of a round waits for another party's Python to give it back.
        return self._send_owned(peer, header, np.array(words, order="C", copy=True))

    def _send_owned(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        if self.network.abort_reason is not None:
            raise TransportAborted(
                f"party {self.party}: cannot send to party {peer}: {self.network.abort_reason}", self.party, peer
            )
        self._put[peer]((header, words))
        return 0

    def _recv_words(self, peer: int, deadline: float) -> tuple[FrameHeader, np.ndarray]:
        network = self.network
        get = self._get[peer]
        tick = network.tick
        try:
            item = get(timeout=min(max(deadline - time.monotonic(), 0.0), tick))
        except queue.Empty:
            item = self._wait_live(peer, deadline - self.timeout)
        if item is ABORT:
            network._links[(peer, self.party)].put(ABORT)  # leave it for any later receive on this link
            raise TransportAborted(
                f"party {self.party}: aborted while waiting for party {peer}: {network.abort_reason}",
                self.party,
                peer,
            )
        return item

    def _wait_live(self, peer: int, quiet_since: float) -> tuple[FrameHeader, np.ndarray] | object:
        """Keep waiting for ``peer`` while it is live; raise once it was silent for the timeout
        (or at once when its thread ended without sending)."""
        network, get, party = self.network, self._get[peer], self.party
        network.waiting[party] = peer
        try:
            while True:
                now = time.monotonic()
                thread = network.threads.get(peer)
                if thread is not None and thread.ident is not None and not thread.is_alive():
                    try:
                        return get(block=False)  # sent just before it ended
                    except queue.Empty:
                        raise TransportError(
                            f"party {party}: party {peer} ended without sending its message "
                            f"(step {self.current_step!r})", party, peer,
                        ) from None
                if network.live(peer):
                    quiet_since = now
                remaining = quiet_since + self.timeout - now
                if remaining <= 0:
                    raise TransportTimeout(
                        f"party {party}: no message from party {peer} within {self.timeout} s "
                        f"(step {self.current_step!r})",
                        party,
                        peer,
                    )
                try:
                    return get(timeout=min(remaining, network.tick))
                except queue.Empty:
                    continue
        finally:
            network.waiting.pop(party, None)


class LockstepNetwork:
    """All parties in one OS thread, as greenlets switched at every wait (see the module docstring).

    :meth:`run` takes one body per party, runs them to completion and returns the failures
    ``(party, exception)`` in the order they happened. When a body raises, the network is aborted:
    every other party raises :class:`TransportAborted` at its next send or wait. When every live
    party waits and nobody can send, each raises :class:`TransportError` naming whom it waits for.
    """

    def __init__(self, n_parties: int = 4, session: str = "", timeout: float = 30.0):
        self.n_parties = n_parties
        self.session = session
        self.timeout = timeout  # kept for the Transport interface: a wait never blocks the OS thread
        self._links = {(s, d): deque() for s in range(n_parties) for d in range(n_parties) if s != d}
        self._transports: dict[int, LockstepTransport] = {}
        self._scheduler = None  # the greenlet running run()
        self.sent = 0  # frames queued so far: the scheduler's progress measure
        self.waiting: dict[int, int] = {}  # party -> the peer it waits for
        self.abort_reason: str | None = None
        self.deadlocked: str | None = None

    def transport(self, party: int) -> LockstepTransport:
        if not 0 <= party < self.n_parties:
            raise ValueError(f"no party {party} in a network of {self.n_parties}")
        if party not in self._transports:
            self._transports[party] = LockstepTransport(self, party)
        return self._transports[party]

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason

    def close(self) -> None:
        self.abort("network closed")

    def run(self, bodies: Mapping[int, Callable[[], None]]) -> list[tuple[int, BaseException]]:
        import greenlet

        self._scheduler = greenlet.getcurrent()
        live = {p: greenlet.greenlet(body, parent=self._scheduler) for p, body in bodies.items()}
        failures: list[tuple[int, BaseException]] = []
        while live:
            before, finished = self.sent, False
            for party, g in list(live.items()):
                try:
                    g.switch()
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    failures.append((party, exc))
                    self.abort(f"party {party} failed: {type(exc).__name__}: {exc}")
                if g.dead:
                    del live[party]
                    self.waiting.pop(party, None)
                    finished = True
            if live and self.sent == before and not finished and self.abort_reason is None:
                who = ", ".join(f"party {p} waits for party {q}" for p, q in sorted(self.waiting.items()))
                self.deadlocked = f"no party can proceed ({who})"
                self.abort(self.deadlocked)
        return failures


class LockstepTransport(Transport):
    """Party ``party``'s endpoint on a :class:`LockstepNetwork`. Payloads are copied on send (numpy words
    on the links), except those handed over by :meth:`exchange_owned`."""

    def __init__(self, network: LockstepNetwork, party: int):
        super().__init__(party, network.session, network.timeout)
        self.network = network
        self._out = {d: q for (s, d), q in network._links.items() if s == party}
        self._in = {s: q for (s, d), q in network._links.items() if d == party}

    def _aborted(self, peer: int, doing: str) -> TransportError:
        net = self.network
        if net.deadlocked is not None:
            return TransportError(f"party {self.party}: deadlock while {doing} party {peer} "
                                  f"(step {self.current_step!r}): {net.deadlocked}", self.party, peer)
        return TransportAborted(f"party {self.party}: aborted while {doing} party {peer}: {net.abort_reason}",
                                self.party, peer)

    def _send_words(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        return self._send_owned(peer, header, words.copy())  # (a C-ordered copy)

    def _send_owned(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        net = self.network
        if net.abort_reason is not None:
            raise self._aborted(peer, "sending to")
        self._out[peer].append((header, words))
        net.sent += 1
        return 0

    def _recv_words(self, peer: int, deadline: float) -> tuple[FrameHeader, np.ndarray]:
        link = self._in[peer]
        net = self.network
        if not link:
            net.waiting[self.party] = peer
            while not link:
                if net.abort_reason is not None:
                    raise self._aborted(peer, "waiting for")
                net._scheduler.switch()
            del net.waiting[self.party]
        return link.popleft()
