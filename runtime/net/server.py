"""A compute server of the networked runtime (``siguard party PLAN --id I --config parties.toml``).

Life of a server P_i
--------------------
1. **Mesh.** It listens on its configured address and dials every server with a smaller index
   (P1 dials P0; P2 dials P0 and P1), retrying refused connections until ``timeout``. Every
   connection is TLS 1.3 with certificates on both sides; the peer is the party whose pinned
   certificate it presented (:meth:`siguard.runtime.net.config.PartiesConfig.identify`).
2. **Handshake.** Both ends of every connection send a hello (wire version, protocol name and
   version, plan hash, fractional bits) and compare; any mismatch is fatal on both sides and
   names both values ("plan hash mismatch: P0 has ..., P2 has ...").
3. **Set-up, once per start.** Over the session "setup" the servers agree on long-term pairwise
   PRF keys (:func:`siguard.runtime.mpc.prg.setup_keys`: each server sends its key to its predecessor over
   TLS) and P0, the model owner's server, secret-shares ``weights.npz``; the shares stay in memory.
   Then each server rehearses one session alone (:mod:`siguard.runtime.net.warmup`: nothing sent, no data
   involved), so that the first query finds its memory and kernels warm, and reports ready.
4. **Queries.** A client says hello to P0; P0 assigns the next session id ``q<n>`` and a random
   token, announces both to P1 and P2 over the mesh, and answers with a welcome (plan hash,
   input and output shapes, session id, token). The client joins the session at P1 and P2 with
   the token. Each server then runs the plan for that session in its own thread
   (:class:`siguard.runtime.executor.Executor` over :class:`siguard.runtime.mpc.rss.RSSEngine`, weights shared), so
   several sessions run at once; their frames share the mesh connections and are told apart by
   the session id in every frame header. Only the client receives the revealed output.

Keys per session. Session ``q<n>`` draws its randomness from PRF keys derived from the long-term
keys as HMAC(master, label | session id) (:meth:`siguard.runtime.mpc.prg.PartyKeys.session`). A repeated
session id would replay every mask, so P0 numbers sessions from 1 and P1/P2 refuse an id that is
not larger than the last one announced; the master keys are fresh at every start, so numbers
restarting after a restart are harmless. Clients cannot choose session ids.

Faults. A lost or silent connection to another server, a peer's goodbye, or a handshake
mismatch is *fatal*: every running session is aborted (its client gets an error naming the
peer), the other servers are told why, and :meth:`PartyServer.serve_forever` raises
:class:`siguard.core.errors.RuntimeFault` (the CLI exits 3), because the weight shares of the
trio cannot be rebuilt without the lost peer. A failure inside one session (a client that
disconnects or sends a frame of the wrong shape, a timeout) aborts only that session, at all
three servers, and they keep serving.
"""

from __future__ import annotations

import hmac
import math
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.core.errors import InputError, RuntimeFault
from siguard.runtime.executor import Executor
from siguard.runtime.linalg import cpu_profile
from siguard.runtime.mpc.prg import PartyKeys, setup_keys
from siguard.runtime.mpc.rss import RSSEngine
from siguard.runtime.mpc.transport import FrameHeader

from .config import CLIENT, PartiesConfig, party_name
from .tls import (
    Heartbeat,
    LinkError,
    Mailbox,
    NetTransport,
    TLSLink,
    accept,
    clean_text,
    compare_hello,
    dial,
    hello_message,
    stats_to_json,
)
from .warmup import rehearse_session

__all__ = ["PartyServer", "ServerStopped", "SETUP_SESSION"]

SETUP_SESSION = "setup"
_CLOSED_MEMORY = 4096  # finished session ids remembered (late frames for them are dropped)
_MAX_HANDSHAKES = 16  # TLS handshakes in progress at once (each costs a thread and an ECDHE)


def _session_number(sid: str) -> int | None:
    if 1 < len(sid) <= 20 and sid[0] == "q" and sid[1:].isascii() and sid[1:].isdigit():
        return int(sid[1:])
    return None


class _Session:
    """One session at one server: its mailbox, client connection, transport and state."""

    __slots__ = ("sid", "token", "mailbox", "announced", "client", "transport", "created", "state")

    def __init__(self, sid: str):
        self.sid = sid
        self.token: str | None = None
        self.mailbox = Mailbox((0, 1, 2, CLIENT))
        self.announced = threading.Event()
        self.client: TLSLink | None = None
        self.transport: NetTransport | None = None
        self.created = time.monotonic()
        self.state = "new"  # new -> running -> done | failed


class PartyServer:
    """Compute server ``party`` (0, 1, 2) for ``plan`` (see the module docstring).

    ``weights``: P0's float weights (the model owner's; None on P1, P2). ``timeout``: seconds to
    wait for each round's message, for a client's handshake, and before a silent connection
    counts as dead. ``connect_timeout``: seconds to wait at start for the other servers (default
    the larger of ``timeout`` and 60: servers on different hosts start at different times).
    ``max_sessions``: sessions run at once (more clients wait up to ``timeout``).
    ``step_delay``: seconds to sleep before each plan step (a testing aid: slow inference).
    ``warmup``: rehearse a session before reporting ready (:mod:`siguard.runtime.net.warmup`).
    ``log``: where one-line events go (default: print to stdout, flushed).
    """

    def __init__(
        self,
        plan: Plan,
        party: int,
        config: PartiesConfig,
        *,
        weights: dict[str, np.ndarray] | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        max_sessions: int = 8,
        step_delay: float = 0.0,
        warmup: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        if party not in (0, 1, 2):
            raise InputError(f"--id must be 0, 1 or 2, got {party}")
        if party == 0 and plan.doc["weights"] and weights is None:
            raise InputError("P0 (the model owner's server) needs the weights")
        if timeout <= 0:
            raise InputError(f"timeout must be positive, got {timeout}")
        self.plan = plan
        self.party = party
        self.config = config
        self.name = party_name(party)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout) if connect_timeout is not None else max(self.timeout, 60.0)
        self.step_delay = float(step_delay)
        self.warmup = bool(warmup)
        self._log_fn = log or (lambda line: print(line, flush=True))
        self._server_ctx = config.ssl_context(party, server_side=True)
        self._client_ctx = config.ssl_context(party, server_side=False)
        self._plain_weights = weights if party == 0 else None
        self._hello = hello_message("hello", party, plan.plan_hash, plan.frac_bits)
        numels = [math.prod(spec["shape"]) for spec in plan.inputs] or [0]
        self._max_client_payload = 16 * max(numels) + 1024  # two share slots of the largest input
        self._mesh: dict[int, TLSLink] = {}
        self._dial_errors: dict[int, str] = {}
        self._sessions: dict[str, _Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._announce_lock = threading.Lock()
        self._mesh_ready = threading.Event()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._stopping: str | None = None
        self._next_session = 1  # P0: the next number to assign
        self._last_announced = 0  # P1, P2: the last number P0 announced
        self._slots = threading.BoundedSemaphore(max(1, int(max_sessions)))
        # Denial of service: at most this many TLS handshakes (and first messages) at once, and at most
        # this many connection threads in all; a connection beyond either is closed at once.
        self.max_handshakes = _MAX_HANDSHAKES
        self.max_connections = 4 * max(1, int(max_sessions)) + _MAX_HANDSHAKES
        self._handshakes = threading.BoundedSemaphore(self.max_handshakes)
        self._connections = threading.BoundedSemaphore(self.max_connections)
        self.refused_busy = 0
        # The largest frame a server may send in one round: the busiest step's bytes (the cost model,
        # checked against the transport by the tests) plus margin; frames are checked before allocation.
        costs = [*(s.cost for s in plan.steps), plan.doc["setup"]]
        self._max_peer_payload = max(max(c["bytes_per_party"]) for c in costs) + (1 << 16)
        self._heartbeat = Heartbeat(min(max(self.timeout / 4, 0.2), 5.0))
        self._heartbeat.hooks.append(self._sweep)
        self._listener: socket.socket | None = None
        self.keys: PartyKeys | None = None
        self.weights: dict[str, Any] = {}
        self.setup_stats: dict[str, Any] = {}
        self.mesh_seconds = 0.0  # start until the other two servers were connected and checked
        self.setup_seconds = 0.0  # key agreement and weight sharing
        self.warmup_seconds = 0.0  # the rehearsed session (0 without warm-up)
        self.sessions_done = 0
        self.sessions_failed = 0

    # ---- logging and state --------------------------------------------------------------------
    def _log(self, line: str) -> None:
        try:  # reasons may quote what a peer or client sent: one printable line, bounded
            self._log_fn(clean_text(line, 2000))
        except Exception:  # noqa: BLE001 - a closed stdout must not break the server
            pass

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def fatal(self) -> str | None:
        """The reason this server failed, or None."""
        return self._fatal

    # ---- start --------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, form the mesh with the other two servers, handshake, agree on keys and share
        the weights. Returns when the server is ready for queries; raises RuntimeFault naming
        the peer (or the mismatch) on failure."""
        t0 = time.monotonic()
        self._listen()
        threading.Thread(target=self._accept_loop, name=f"siguard-{self.name}-accept", daemon=True).start()
        deadline = t0 + self.connect_timeout
        for j in range(self.party):
            threading.Thread(target=self._dial_peer, args=(j, deadline), name=f"siguard-{self.name}-dial-P{j}",
                             daemon=True).start()
        while not self._mesh_ready.wait(0.05):
            if self._stop.is_set():
                break
            if time.monotonic() > deadline + 0.5:  # the dialers report first when they time out
                missing = [j for j in range(3) if j != self.party and j not in self._mesh]
                self.fail("; ".join(self._missing(j) for j in missing))
                break
        self._raise_if_stopped()
        t1 = time.monotonic()
        self._setup()
        cpu_profile()  # the ring kernel's per-CPU choice (probe or cache) now, not in the first session
        self._raise_if_stopped()
        self.mesh_seconds, self.setup_seconds = t1 - t0, time.monotonic() - t1
        warm = ""
        if self.warmup:
            try:
                self.warmup_seconds = rehearse_session(self.plan, self.party, self.keys, self.weights)
                warm = f", warm-up {self.warmup_seconds:.2f} s (a session rehearsed alone)"
            except Exception as exc:  # noqa: BLE001 - only the first query's speed is at stake
                warm = f", warm-up failed ({type(exc).__name__}: {exc}): the first query runs cold"
            self._raise_if_stopped()
        self._ready.set()
        self._log(
            f"{self.name}: ready: plan {self.plan.plan_hash[:16]}, listening on {self.config[self.party].address}, "
            f"mesh {self.mesh_seconds:.2f} s, set-up {self.setup_seconds:.2f} s (keys and weight sharing){warm}"
        )

    def _missing(self, j: int) -> str:
        entry = self.config[j]
        if j < self.party:
            return self._dial_errors.get(j) or f"{entry.name} unreachable at {entry.address} (timed out)"
        here = self.config[self.party].address
        return f"{entry.name} did not connect within {self.connect_timeout:g} s (it should dial {here})"

    def _raise_if_stopped(self) -> None:
        if self._fatal is not None:
            raise RuntimeFault(self._fatal)
        if self._stopping is not None:
            raise ServerStopped(self._stopping)

    def _listen(self) -> None:
        entry = self.config[self.party]
        host = entry.bind or entry.host
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, entry.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            raise RuntimeFault(f"{self.name}: cannot listen on {host}:{entry.port}: {exc.strerror or exc}") from None
        sock.settimeout(0.25)
        self._listener = sock

    # ---- mesh ---------------------------------------------------------------------------------
    def _dial_peer(self, j: int, deadline: float) -> None:
        entry = self.config[j]
        try:
            link = dial(entry.host, entry.port, self._client_ctx, local=self.party, peer=j, deadline=deadline)
        except LinkError as exc:  # unreachable until the deadline, or a TLS failure: fatal either way
            self._dial_errors[j] = str(exc)
            self.fail(str(exc))
            return
        if self.config.identify(link.peer_der) != j:
            link.close()
            self.fail(f"{entry.name} at {entry.address} presented a certificate that is not {entry.name}'s "
                      "(refused: not the certificate in parties.toml)")
            return
        link.max_payload = self._max_peer_payload
        try:
            link.send_control(self._hello)
            theirs = link.recv_control(deadline)
        except LinkError as exc:
            link.close()
            self.fail(f"handshake with {entry.name} failed: {exc}")
            return
        self._check_peer_hello(link, j, theirs)

    def _accept_peer(self, link: TLSLink, j: int, deadline: float) -> None:
        try:
            theirs = link.recv_control(deadline)
            link.send_control(self._hello)
        except LinkError as exc:
            link.close()
            self._log(f"{self.name}: handshake with {party_name(j)} failed: {exc}")
            return
        self._check_peer_hello(link, j, theirs)

    def _check_peer_hello(self, link: TLSLink, j: int, theirs: dict[str, Any]) -> None:
        them = party_name(j)
        if theirs.get("kind") != "hello" or theirs.get("party") != j:
            link.close()
            self.fail(f"handshake with {them} failed: unexpected message {theirs.get('kind')!r}")
            return
        mismatch = compare_hello(self._hello, theirs, self.name, them)
        if mismatch:
            link.close()
            self.fail(f"handshake with {them} failed: {mismatch}")
            return
        with self._lock:
            if self._stop.is_set() or j in self._mesh:
                link.close()
                return
            self._mesh[j] = link
            link.start_reader(self._on_mesh_data, self._on_mesh_control, self._on_mesh_close, liveness=self.timeout)
            self._heartbeat.add(link)
            if len(self._mesh) == 2:
                self._mesh_ready.set()
        self._log(f"{self.name}: {them} connected (handshake ok)")

    def _on_mesh_data(self, link: TLSLink, header: FrameHeader, words: np.ndarray) -> None:
        if header.sender != link.peer:
            raise LinkError(f"frame on {link.peer_name}'s connection claims sender {header.sender}")
        s = self._session(header.session)
        if s is not None:
            s.mailbox.put(link.peer, (header, words))

    def _on_mesh_control(self, link: TLSLink, msg: dict[str, Any]) -> None:
        kind, j = msg["kind"], link.peer
        assert j is not None
        if kind == "new_session" and j == 0 and self.party != 0:
            sid = str(msg.get("session"))
            n = _session_number(sid)
            if n is None or n <= self._last_announced:
                raise LinkError(f"P0 announced session {sid!r} after q{self._last_announced}: "
                                "a repeated session id would replay masks")
            self._last_announced = n
            s = self._session(sid)
            if s is not None:
                s.token = str(msg.get("token"))
                s.announced.set()
        elif kind == "abort":
            s = self._session(str(msg.get("session")), create=False)
            if s is not None:
                self._abort_session(s, f"{party_name(j)} aborted the session: {clean_text(msg.get('reason'))}",
                                    notify_peers=False)
        elif kind == "goodbye":
            if msg.get("orderly"):
                self.stop(f"{party_name(j)} shut down")
            else:
                self.fail(f"{party_name(j)} stopped: {clean_text(msg.get('reason'))}")
        else:
            raise LinkError(f"unexpected control message {kind!r} from {party_name(j)}")

    def _on_mesh_close(self, link: TLSLink, reason: str) -> None:
        self.fail(reason or f"connection to {link.peer_name} lost")

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        s = self._session(SETUP_SESSION)
        assert s is not None
        links = dict(self._mesh)
        transport = NetTransport(self.party, SETUP_SESSION, self.timeout, links, s.mailbox)
        s.transport, s.state = transport, "running"
        try:
            keys = setup_keys(transport)
            engine = RSSEngine(self.party, transport, keys.session(SETUP_SESSION), self.plan.frac_bits)
            ex = Executor(self.plan, engine)
            ex.share_weights(self._plain_weights)
        except Exception as exc:  # noqa: BLE001 - reported as the fatal reason
            self.fail(f"set-up failed: {s.mailbox.reason or exc}")
            return
        finally:
            s.state = "done"
            self._close_session(s)
        self.keys = keys
        self.weights = ex.weights
        self._plain_weights = None
        self.setup_stats = transport.stats

    # ---- sessions -----------------------------------------------------------------------------
    def _session(self, sid: str, create: bool = True) -> _Session | None:
        with self._lock:
            if sid in self._closed:
                return None
            s = self._sessions.get(sid)
            if s is None and create and not self._stop.is_set():
                s = self._sessions[sid] = _Session(sid)
            return s

    def _close_session(self, s: _Session) -> None:
        with self._lock:
            self._sessions.pop(s.sid, None)
            self._closed[s.sid] = None
            while len(self._closed) > _CLOSED_MEMORY:
                self._closed.popitem(last=False)

    def _sweep(self) -> None:
        """Forget sessions announced (or addressed by stray frames) but never joined."""
        limit = time.monotonic() - 2 * self.timeout
        with self._lock:
            stale = [s for s in self._sessions.values() if s.state == "new" and s.created < limit]
        for s in stale:
            s.mailbox.abort("never joined")
            self._close_session(s)

    def _abort_session(self, s: _Session, reason: str, notify_peers: bool) -> None:
        """Abort ``s`` here (waking its receivers), tell the client and, if ``notify_peers``,
        the other servers. Idempotent."""
        if not s.mailbox.abort(reason):
            return
        with self._lock:
            if s.state == "new" and s.announced.is_set():
                # a query P0 announced that never ran here (its client did not join, or P0 aborted it):
                # it failed at P0, so it counts as failed here too and the three servers agree
                s.state = "failed"
                self.sessions_failed += 1
                self._log(f"{self.name}: session {s.sid} failed: {reason}")
        if notify_peers:
            for link in list(self._mesh.values()):
                link.try_send_control({"kind": "abort", "session": s.sid, "reason": reason})
        client = s.client
        if client is not None:
            client.try_send_control({"kind": "error", "session": s.sid, "message": f"{self.name}: {reason}"})
            threading.Thread(target=client.finish, args=(2.0,), daemon=True).start()

    def _handle_client(self, link: TLSLink, msg: dict[str, Any], deadline: float) -> None:
        """A client connection after TLS: hello (P0) or join (P1, P2), then the session."""
        link.peer = CLIENT
        expected = "hello" if self.party == 0 else "join"
        if msg.get("kind") != expected:
            self._refuse_client(link, f"expected a {expected!r} message at {self.name}, got "
                                      f"{clean_text(repr(msg.get('kind')), 40)}")
            return
        mismatch = compare_hello(self._hello, msg, self.name, "the client")
        if mismatch:
            self._refuse_client(link, f"handshake failed: {mismatch}")
            return
        if not self._ready.wait(max(deadline - time.monotonic(), 0)):
            self._refuse_client(link, f"{self.name} is not ready (the servers are still starting)")
            return
        if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
            self._refuse_client(link, f"{self.name} is busy ({self.timeout:g} s without a free session slot)")
            return
        try:
            if self.party == 0:
                s = self._new_session(link)
            else:
                s = self._join_session(link, msg, deadline)
            if s is not None:
                self._run_session(s, link)
        finally:
            self._slots.release()

    def _welcome(self, sid: str, token: str | None) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "session": sid,
            "inputs": [{"name": s["name"], "shape": list(s["shape"]), "domain": s.get("domain"),
                        "domain_source": s.get("domain_source")}
                       for s in self.plan.inputs],
            "outputs": [{"name": s["name"], "shape": list(s["shape"])} for s in self.plan.outputs],
            "timeout": self.timeout,
        }
        if token is not None:
            extra["token"] = token
        return hello_message("welcome", self.party, self.plan.plan_hash, self.plan.frac_bits, **extra)

    def _new_session(self, link: TLSLink) -> _Session | None:
        token = secrets.token_hex(16)
        try:
            # numbering and announcing under one lock: P1 and P2 must see the numbers in order
            with self._announce_lock:
                n = self._next_session
                self._next_session += 1
                sid = f"q{n}"
                s = self._session(sid)
                if s is None:
                    self._refuse_client(link, f"{self.name} is shutting down")
                    return None
                s.token = token
                s.announced.set()
                for peer in list(self._mesh.values()):
                    peer.send_control({"kind": "new_session", "session": sid, "token": token})
            link.send_control(self._welcome(sid, token))
        except LinkError as exc:
            self._abort_session(s, f"could not start the session: {exc}", notify_peers=True)
            self._close_session(s)
            link.close()
            return None
        return s

    def _join_session(self, link: TLSLink, msg: dict[str, Any], deadline: float) -> _Session | None:
        sid = str(msg.get("session"))
        if _session_number(sid) is None:
            self._refuse_client(link, f"no session {clean_text(repr(sid), 40)}")
            return None
        s = self._session(sid)
        if s is None:
            self._refuse_client(link, f"session {sid} is over")
            return None
        if not s.announced.wait(max(deadline - time.monotonic(), 0)):
            self._refuse_client(link, f"P0 never announced session {sid} to {self.name}")
            return None
        token = msg.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, s.token or ""):
            self._refuse_client(link, f"wrong token for session {sid}")
            return None
        with self._lock:
            if s.client is not None or s.state != "new":
                self._refuse_client(link, f"session {sid} already has a client")
                return None
            s.client = link
        try:
            link.send_control(self._welcome(sid, None))
        except LinkError as exc:
            self._abort_session(s, f"client disconnected ({exc})", notify_peers=True)
            self._close_session(s)
            return None
        return s

    def _refuse_client(self, link: TLSLink, reason: str) -> None:
        self._log(f"{self.name}: refused a client from {link.address}: {reason}")
        link.try_send_control({"kind": "error", "message": f"{self.name}: {reason}"})
        link.finish(1.0)

    def _run_session(self, s: _Session, link: TLSLink) -> None:
        link.max_payload = self._max_client_payload
        s.client = link
        links: dict[int, TLSLink] = dict(self._mesh)
        links[CLIENT] = link
        transport = NetTransport(self.party, s.sid, self.timeout, links, s.mailbox)
        s.transport, s.state = transport, "running"
        link.start_reader(
            lambda lk, h, t: self._on_client_data(s, lk, h, t),
            lambda lk, m: self._on_client_control(s, lk, m),
            lambda lk, r: self._on_client_close(s, lk, r),
            liveness=self.timeout,
        )
        self._heartbeat.add(link)
        self._log(f"{self.name}: session {s.sid} started")
        t0 = time.monotonic()
        try:
            if self.keys is None:
                raise RuntimeFault(f"{self.name} has no keys (set-up did not finish)")
            engine = RSSEngine(self.party, transport, self.keys.session(s.sid), self.plan.frac_bits)
            ex = Executor(self.plan, engine, progress=self._progress if self.step_delay > 0 else None)
            ex.use_weights(self.weights)  # fresh components for this session (0 rounds)
            ex.run(None)
            s.state = "done"
            link.send_control({
                "kind": "stats", "party": self.party, "session": s.sid,
                "steps": stats_to_json(transport.stats), "setup": stats_to_json(self.setup_stats),
            })
            link.finish(2.0)
            self.sessions_done += 1
            self._log(f"{self.name}: session {s.sid} done in {time.monotonic() - t0:.3f} s")
        except Exception as exc:  # noqa: BLE001 - the session fails, the server goes on
            with self._lock:
                s.state = "failed"
                self.sessions_failed += 1
            self._abort_session(s, str(exc), notify_peers=True)
            self._log(f"{self.name}: session {s.sid} failed: {s.mailbox.reason}")
        finally:
            self._close_session(s)

    def _progress(self, i: int, n: int, step: dict[str, Any]) -> None:
        time.sleep(self.step_delay)

    def _on_client_data(self, s: _Session, link: TLSLink, header: FrameHeader, words: np.ndarray) -> None:
        if header.sender != CLIENT or header.session != s.sid:
            raise LinkError(f"the client sent a frame for session {header.session!r} as party {header.sender}")
        s.mailbox.put(CLIENT, (header, words))

    def _on_client_control(self, s: _Session, link: TLSLink, msg: dict[str, Any]) -> None:
        if msg["kind"] == "abort":
            self._abort_session(s, f"the client cancelled the query: {clean_text(msg.get('reason'))}",
                                notify_peers=True)

    def _on_client_close(self, s: _Session, link: TLSLink, reason: str) -> None:
        if s.state in ("new", "running"):
            self._abort_session(s, reason or "connection to the client lost", notify_peers=True)

    # ---- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                time.sleep(0.05)  # e.g. out of file descriptors: try again
                continue
            if not self._connections.acquire(blocking=False):
                self.refused_busy += 1
                if self.refused_busy in (1, 10, 100) or self.refused_busy % 1000 == 0:
                    self._log(f"{self.name}: refused a connection from {addr[0]}: {self.max_connections} connections "
                              f"open ({self.refused_busy} refused so far)")
                sock.close()
                continue
            threading.Thread(target=self._handle_incoming, args=(sock, addr), daemon=True,
                             name=f"siguard-{self.name}-conn").start()

    def _handle_incoming(self, sock: socket.socket, addr: Any) -> None:
        try:
            self._handle_connection(sock, addr)
        finally:
            self._connections.release()

    def _handle_connection(self, sock: socket.socket, addr: Any) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._handshakes.acquire(blocking=False):
            self.refused_busy += 1
            self._log(f"{self.name}: refused a connection from {addr[0]}:{addr[1]}: "
                      f"{self.max_handshakes} handshakes in progress")
            sock.close()
            return
        try:
            link = accept(sock, addr, self._server_ctx, local=self.party, deadline=deadline)
        except LinkError as exc:
            self._log(f"{self.name}: refused a connection from {addr[0]}:{addr[1]}: {exc}")
            return
        finally:
            self._handshakes.release()
        who = self.config.identify(link.peer_der)
        if who is None and self.config.is_revoked(link.peer_der):
            self._log(f"{self.name}: refused a connection from {link.address}: its certificate is revoked")
            link.close()
            return
        try:
            if who is None:
                self._log(f"{self.name}: refused a connection from {link.address}: its certificate is not one of "
                          f"{self.config.path.name}'s")
                link.close()
            elif who == CLIENT:
                link.max_payload = self._max_client_payload
                self._handle_client(link, link.recv_control(deadline), deadline)
            elif who > self.party and not self._mesh_ready.is_set() and who not in self._mesh:
                link.peer = who
                link.max_payload = self._max_peer_payload
                self._accept_peer(link, who, deadline)
            else:
                reason = f"unexpected connection with {party_name(who)}'s certificate from {link.address}"
                self._log(f"{self.name}: refused an {reason}")
                link.try_send_control({"kind": "error", "message": f"{self.name}: refused an {reason}"})
                link.finish(1.0)
        except LinkError as exc:
            self._log(f"{self.name}: connection from {link.address} failed: {exc}")
            link.close()

    # ---- stopping -----------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Fatal: abort everything, tell the peers and clients, stop (idempotent)."""
        with self._lock:
            if self._fatal is not None or self._stopping is not None:
                return
            running = [s for s in self._sessions.values() if s.state == "running" and s.transport is not None]
            where = "".join(
                f" during session {s.sid} step {s.transport.current_step!r}" for s in running[:2] if s.transport
            )
            self._fatal = f"{self.name}: {reason}{where}"
        self._log(f"{self._fatal}; stopping")
        self._teardown(self._fatal, orderly=False)

    def stop(self, reason: str = "shutdown") -> None:
        """Orderly stop (signal, or a peer that shut down): abort sessions, say goodbye, close."""
        with self._lock:
            if self._fatal is not None or self._stopping is not None:
                return
            self._stopping = reason
        self._log(f"{self.name}: stopping ({reason})")
        self._teardown(f"{self.name} is shutting down ({reason})", orderly=True)

    def _teardown(self, reason: str, orderly: bool) -> None:
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            self._abort_session(s, reason, notify_peers=False)
        for link in list(self._mesh.values()):
            link.try_send_control({"kind": "goodbye", "orderly": orderly, "reason": reason})
            link.close()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:  # pragma: no cover
                pass
        self._heartbeat.stop()

    def serve_forever(self) -> None:
        """Block until stopped; raise :class:`RuntimeFault` with the reason after a fatal error."""
        while not self._stop.wait(0.25):
            pass
        time.sleep(0.2)  # let the goodbyes and client errors leave
        if self._fatal is not None:
            raise RuntimeFault(self._fatal)


class ServerStopped(Exception):
    """Raised by :meth:`PartyServer.start` when the server was stopped (a signal) while starting."""
