"""TCP with mutual TLS between the parties: connections, frames, heartbeats, the session transport.

Wire format. Every message is one *frame*::

    kind (u8) | header length (u32) | payload length (u64) | header | payload      (little-endian)

``kind`` 0 is a data frame: the header is a :class:`siguard.runtime.mpc.transport.FrameHeader` (session,
step, sender, per-link sequence number, shape) and the payload the int64 words of the message
(8 bytes each, little-endian); the reader checks that the payload length is 8 x prod(shape) and hands
the words on as a numpy array (this module does not import torch: the query client uses it too).
``kind`` 1 is a control frame: no header, a small JSON object with a ``kind`` field (hello,
welcome, join, new_session, abort, error, stats, goodbye, ping). A protocol round sends at most
one data frame per peer (:meth:`siguard.runtime.mpc.transport.Transport.exchange`).

TLS without concurrent use of one TLS object. OpenSSL forbids ``SSL_read`` and ``SSL_write`` on
the same ``SSL`` object from two threads at once, and a party both receives (a reader thread per
connection) and sends (its session threads) on every connection. So each :class:`TLSLink`
drives an :class:`ssl.SSLObject` over memory BIOs: encryption and decryption happen under a
short lock, while the raw socket I/O (``sendall`` by the sender, ``recv`` by the reader) happens
outside it. A frame of up to 64 KiB is one TLS write and one ``sendall``; larger payloads are
encrypted and sent in 1 MiB pieces, so no frame is ever copied whole. TLS 1.3 only, session
tickets off (no resumption, so nothing is written by the reading side after the handshake).

Timeouts and liveness. Sockets stay blocking for sends; the reader polls with a short tick and
checks a deadline (handshakes and hellos) or the link's *liveness*: a connection on which
nothing, not even a heartbeat, arrived for ``liveness`` seconds is declared dead. A
:class:`Heartbeat` thread sends a ping on every link idle for a fraction of that time. A peer
that dies therefore shows up as EOF or reset at once, and a peer that vanishes silently within
``liveness`` seconds. A receiver in a session (:class:`NetTransport`) waits for a round's message
as long as the peer's link is live: the transport timeout counts from the last bytes (data or
heartbeat) received from that peer, so a peer that computes for minutes is waited for, and one
that is silent for the timeout is reported.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from siguard.compiler.plan import PROTOCOL, PROTOCOL_VERSION
from siguard.runtime.mpc.transport import (
    ABORT,
    FrameHeader,
    StepStats,
    Transport,
    TransportAborted,
    TransportError,
    TransportTimeout,
)

from .config import party_name

__all__ = [
    "WIRE_VERSION",
    "LinkError",
    "TLSLink",
    "Mailbox",
    "NetTransport",
    "Heartbeat",
    "dial",
    "accept",
    "hello_message",
    "compare_hello",
    "clean_text",
    "stats_to_json",
    "stats_from_json",
]

WIRE_VERSION = 1
KIND_DATA = 0
KIND_CONTROL = 1
_PREFIX = struct.Struct("<BIQ")
_SMALL = 64 * 1024  # frames up to this size: one TLS write, one sendall
_CHUNK = 1 << 20  # larger payloads: encrypted and sent in pieces of this size
_RECV = 256 * 1024  # raw bytes per recv call
_READ_BLOCK = 64 * 1024  # plaintext bytes per TLS read for small frames
_MAX_HEADER = 1 << 18
_MAX_CONTROL = 1 << 20
_TICK_MS = 250  # milliseconds between deadline and liveness checks while waiting for data
_LITTLE = sys.byteorder == "little"


class LinkError(TransportError):
    """A connection failed: refused, closed, reset, silent, TLS or framing error; names the peer."""


def _ssl_reason(exc: ssl.SSLError) -> str:
    """A readable reason for a TLS failure (who refused what)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({exc.verify_message})"
    reason = (getattr(exc, "reason", None) or "").upper()
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return f"the peer refused our certificate ({reason.lower()})"
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return "a certificate is required but none was presented"
    if "WRONG_VERSION_NUMBER" in reason or "UNSUPPORTED_PROTOCOL" in reason or "VERSION" in reason:
        return f"TLS version mismatch or not a TLS peer ({reason.lower()})"
    return reason.lower() or str(exc)


def _words(header: FrameHeader, payload: bytearray) -> np.ndarray:
    """A data frame's payload as native int64 words of the header's shape (a writable view of ``payload``)."""
    n = 1
    for s in header.shape:
        n *= s
    if len(payload) != 8 * n:
        raise LinkError(f"data frame of shape {header.shape} carries {len(payload)} bytes, expected {8 * n}")
    if n == 0:
        return np.empty(header.shape, dtype=np.int64)
    words = np.frombuffer(payload, dtype="<i8")
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        words = words.astype(np.int64)
    return words.reshape(header.shape)


class TLSLink:
    """One TLS connection to one peer (see the module docstring).

    ``local`` is this party, ``peer`` the party at the other end (None until identified),
    ``address`` "host:port" for messages. Before :meth:`start_reader`, one thread may read
    synchronously with :meth:`read_frame`/:meth:`recv_control`; afterwards the reader thread
    owns receiving and hands frames to callbacks. Sending is thread-safe at any time.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, local: int,
                 peer: int | None, address: str):
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not TCP
            pass
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self.local = local
        self.peer = peer
        self.address = address
        self.max_payload = 1 << 36
        self.liveness: float | None = None
        self.last_recv = self.last_send = time.monotonic()
        self.peer_der: bytes | None = None
        self.closed = threading.Event()  # set once the connection is closed and the reader is done
        self._send_lock = threading.Lock()
        self._ssl_lock = threading.Lock()
        self._plain = bytearray()
        self._ppos = 0
        # persistent scratch buffers: a fresh 256 KiB bytes object per recv would cost an
        # mmap/munmap pair per call
        self._raw_buf = bytearray(_RECV)
        self._raw_view = memoryview(self._raw_buf)
        self._dec_buf = bytearray(_READ_BLOCK)
        self._dec_view = memoryview(self._dec_buf)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._closing = False
        self._reader: threading.Thread | None = None
        self._sock_closed = False

    # ---- naming --------------------------------------------------------------------------------
    @property
    def peer_name(self) -> str:
        return party_name(self.peer) if self.peer is not None else f"the peer at {self.address}"

    def __repr__(self) -> str:
        return f"TLSLink({party_name(self.local)} <-> {self.peer_name})"

    # ---- raw socket -------------------------------------------------------------------------
    def _sendall_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise LinkError(f"connection to {self.peer_name} lost ({exc.strerror or exc})", self.local,
                            self.peer) from None

    def _recv_raw(self, deadline: float | None) -> None:
        """Feed at least one chunk of raw bytes into the TLS object, waiting until ``deadline``
        (None: forever, but never longer than the liveness allows; checked every tick)."""
        while True:
            if self._closing:
                raise LinkError(f"connection to {self.peer_name} closed", self.local, self.peer)
            if not self._poll.poll(_TICK_MS):
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise LinkError(f"no answer from {self.peer_name} within the timeout", self.local, self.peer)
                if self.liveness is not None and now - self.last_recv > self.liveness:
                    raise LinkError(
                        f"{self.peer_name} went silent: nothing received for {self.liveness:g} s (no heartbeat)",
                        self.local, self.peer,
                    )
                continue
            try:
                got = self.sock.recv_into(self._raw_view, _RECV, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise LinkError(f"connection to {self.peer_name} lost ({exc.strerror or exc})", self.local,
                                self.peer) from None
            if not got:
                raise LinkError(f"connection to {self.peer_name} lost (closed by the peer)", self.local, self.peer)
            self.last_recv = time.monotonic()
            with self._ssl_lock:
                self._in.write(self._raw_view[:got])
            return

    # ---- TLS ----------------------------------------------------------------------------------
    def handshake(self, deadline: float) -> None:
        """Run the TLS handshake (raises :class:`LinkError` with a readable reason, after closing the link)."""
        try:
            self._handshake(deadline)
        except LinkError:
            self.close()
            raise

    def _handshake(self, deadline: float) -> None:
        while True:
            err: ssl.SSLError | None = None
            done = False
            with self._ssl_lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    err = exc
                out = self._out.read()
            if out:
                try:
                    self._sendall_raw(out)
                except LinkError:
                    if err is None and not done:
                        raise
            if err is not None:
                raise LinkError(f"TLS handshake with {self.peer_name} failed: {_ssl_reason(err)}", self.local,
                                self.peer)
            if done:
                break
            try:
                self._recv_raw(deadline)
            except LinkError as exc:
                raise LinkError(f"TLS handshake with {self.peer_name} failed: {exc}", self.local, self.peer) from None
        self.peer_der = self._ssl.getpeercert(binary_form=True)

    def _decrypt(self, dest: memoryview, n: int, deadline: float | None) -> int:
        """Up to ``n`` plaintext bytes into ``dest``; returns the count."""
        while True:
            got: int | None = None
            with self._ssl_lock:
                # only try a TLS read when ciphertext is waiting (a failing read raises, which is slow)
                if self._in.pending or self._ssl.pending():
                    try:
                        got = self._ssl.read(n, dest)
                    except ssl.SSLWantReadError:
                        got = None
                    except ssl.SSLZeroReturnError:
                        got = 0
                    except ssl.SSLError as exc:
                        raise LinkError(f"TLS error on the connection to {self.peer_name}: {_ssl_reason(exc)}",
                                        self.local, self.peer) from None
            if got is None:
                self._recv_raw(deadline)
                continue
            if not got:
                raise LinkError(f"connection to {self.peer_name} lost (closed by the peer)", self.local, self.peer)
            return got

    def _fill(self, n: int, deadline: float | None) -> None:
        """Decrypt until at least ``n`` unread plaintext bytes are buffered."""
        plain, view = self._plain, self._dec_view
        while len(plain) - self._ppos < n:
            k = self._decrypt(view, _READ_BLOCK, deadline)
            plain += view[:k]

    def _read_large(self, n: int, deadline: float | None) -> bytearray:
        buf = bytearray(n)
        mv = memoryview(buf)
        k = min(len(self._plain) - self._ppos, n)
        if k:
            mv[:k] = self._plain[self._ppos : self._ppos + k]
            self._ppos += k
        while k < n:
            k += self._decrypt(mv[k:], n - k, deadline)
        return buf

    # ---- frames -------------------------------------------------------------------------------
    def read_frame(self, deadline: float | None = None) -> tuple[int, bytearray, bytearray]:
        """The next frame: (kind, header bytes, payload bytes)."""
        if len(self._plain) - self._ppos < _PREFIX.size:
            self._fill(_PREFIX.size, deadline)
        kind, hlen, plen = _PREFIX.unpack_from(self._plain, self._ppos)
        limit = self.max_payload if kind == KIND_DATA else _MAX_CONTROL
        if kind not in (KIND_DATA, KIND_CONTROL) or hlen > _MAX_HEADER or plen > limit:
            raise LinkError(
                f"malformed or oversized frame from {self.peer_name} (kind {kind}, header {hlen} B, payload {plen} B)",
                self.local, self.peer,
            )
        small = plen <= _SMALL
        need = _PREFIX.size + hlen + (plen if small else 0)
        if len(self._plain) - self._ppos < need:
            self._fill(need, deadline)
        plain = self._plain
        p = self._ppos + _PREFIX.size
        header = plain[p : p + hlen]
        p += hlen
        if small:
            payload = plain[p : p + plen]
            self._ppos = p + plen
        else:
            self._ppos = p
            payload = self._read_large(plen, deadline)
        if self._ppos >= _READ_BLOCK:
            del plain[: self._ppos]
            self._ppos = 0
        return kind, header, payload

    def recv_control(self, deadline: float) -> dict[str, Any]:
        """The next control message (pings skipped) before ``deadline``."""
        while True:
            kind, _, payload = self.read_frame(deadline)
            if kind != KIND_CONTROL:
                raise LinkError(f"{self.peer_name} sent data where a control message was expected", self.local,
                                self.peer)
            msg = _parse_control(payload, self.peer_name)
            if msg["kind"] != "ping":
                return msg

    def _send_plain(self, first: bytes, big: memoryview | None = None, wait: bool = True) -> bool:
        if wait:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=0.2):
            return False
        try:
            if self._closing:
                raise LinkError(f"connection to {self.peer_name} is closed", self.local, self.peer)
            try:
                with self._ssl_lock:
                    self._write_all(first)
                    out = self._out.read()
                if big is not None:
                    for off in range(0, len(big), _CHUNK):
                        self._sendall_raw(out)
                        with self._ssl_lock:
                            self._write_all(big[off : off + _CHUNK])
                            out = self._out.read()
            except ssl.SSLError as exc:
                raise LinkError(f"TLS error on the connection to {self.peer_name}: {_ssl_reason(exc)}", self.local,
                                self.peer) from None
            self._sendall_raw(out)
            self.last_send = time.monotonic()
            return True
        finally:
            self._send_lock.release()

    def _write_all(self, data: Any) -> None:
        view = memoryview(data)
        done = self._ssl.write(view)
        while done < len(view):
            done += self._ssl.write(view[done:])

    def send_words(self, header: FrameHeader, words: np.ndarray) -> int:
        """Send one data frame of int64 ``words`` (a numpy array); returns the framing bytes (prefix + header)
        it added."""
        h = header.encode()
        arr = np.ascontiguousarray(words)
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            arr = arr.astype("<i8")
        payload = memoryview(arr.reshape(-1)).cast("B")
        prefix = _PREFIX.pack(KIND_DATA, len(h), len(payload))
        if len(payload) <= _SMALL:
            self._send_plain(b"".join((prefix, h, payload)))
        else:
            self._send_plain(prefix + h, payload)
        return len(prefix) + len(h)

    def send_control(self, msg: Mapping[str, Any], wait: bool = True) -> bool:
        """Send a control message; with ``wait=False`` give up (False) if the link is busy."""
        data = json.dumps(msg, separators=(",", ":")).encode()
        return self._send_plain(_PREFIX.pack(KIND_CONTROL, 0, len(data)) + data, wait=wait)

    def try_send_control(self, msg: Mapping[str, Any]) -> None:
        """Best effort (used while failing): never raises, never blocks for long."""
        try:
            self.send_control(msg, wait=False)
        except (LinkError, OSError):
            pass

    # ---- reader thread ------------------------------------------------------------------------
    def start_reader(
        self,
        on_data: Callable[[TLSLink, FrameHeader, np.ndarray], None],
        on_control: Callable[[TLSLink, dict[str, Any]], None],
        on_close: Callable[[TLSLink, str], None],
        *,
        liveness: float | None,
    ) -> None:
        """Start the reader thread. Callbacks run on it (``on_data`` gets a data frame's words as a numpy
        array); ``on_close(link, reason)`` runs once
        when the connection fails or the peer closes it (not after a local :meth:`close`)."""
        self.liveness = liveness
        self.last_recv = time.monotonic()
        self._reader = threading.Thread(
            target=self._reader_main, args=(on_data, on_control, on_close), daemon=True,
            name=f"siguard-{party_name(self.local)}-from-{self.peer_name}",
        )
        self._reader.start()

    def _reader_main(self, on_data, on_control, on_close) -> None:
        reason = ""
        try:
            while True:
                kind, header, payload = self.read_frame(None)
                if kind == KIND_CONTROL:
                    msg = _parse_control(payload, self.peer_name)
                    if msg["kind"] != "ping":
                        on_control(self, msg)
                else:
                    hdr = FrameHeader.decode(header)
                    on_data(self, hdr, _words(hdr, payload))
        except LinkError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - a malformed frame or a callback bug ends the link
            reason = f"protocol error on the connection to {self.peer_name}: {type(exc).__name__}: {exc}"
        finally:
            if not self._closing:  # not closed by us: tell the owner first (it may send a last error)
                try:
                    on_close(self, reason)
                except Exception:  # noqa: BLE001 - closing must finish regardless
                    pass
            self._closing = True
            self._shutdown()
            self._close_socket()
            self.closed.set()

    # ---- closing ------------------------------------------------------------------------------
    def _shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def _close_socket(self) -> None:
        if not self._sock_closed:
            self._sock_closed = True
            try:
                self.sock.close()
            except OSError:  # pragma: no cover
                pass

    def close(self) -> None:
        """Close now (wakes the reader and any blocked sender; no ``on_close`` callback)."""
        self._closing = True
        self._shutdown()
        if self._reader is None or not self._reader.is_alive():
            self._close_socket()
            self.closed.set()

    def finish(self, grace: float = 5.0) -> None:
        """Orderly end after the last frame: stop sending, let the peer read everything and
        close its side (up to ``grace`` s), then close."""
        with self._send_lock:
            self._shutdown(socket.SHUT_WR)
        if self._reader is not None:
            self.closed.wait(grace)
        self.close()


def clean_text(value: Any, limit: int = 300) -> str:
    """A peer-supplied string made safe to log or forward: one line, printable characters only
    (control characters, escapes and newlines become "?"), at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _parse_control(payload: bytes | bytearray, who: str) -> dict[str, Any]:
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise LinkError(f"malformed control message from {who}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        raise LinkError(f"malformed control message from {who}")
    return msg


def dial(host: str, port: int, ctx: ssl.SSLContext, *, local: int, peer: int, deadline: float,
         retry: bool = True) -> TLSLink:
    """TCP-connect to ``host:port`` (retrying refused or unreachable until ``deadline`` when
    ``retry``) and run the TLS handshake. Raises :class:`LinkError` "P1 unreachable at ..."."""
    last = "timed out"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LinkError(f"{party_name(peer)} unreachable at {host}:{port} ({last})", local, peer)
        try:
            sock = socket.create_connection((host, port), timeout=min(remaining, 5.0))
            break
        except OSError as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
            if not retry:
                raise LinkError(f"{party_name(peer)} unreachable at {host}:{port} ({last})", local, peer) from None
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
    link = TLSLink(sock, ctx, server_side=False, local=local, peer=peer, address=f"{host}:{port}")
    link.handshake(deadline)
    return link


def accept(sock: socket.socket, addr: Any, ctx: ssl.SSLContext, *, local: int, deadline: float) -> TLSLink:
    """Server side of a new TCP connection: the TLS handshake (the peer is identified later,
    from its certificate)."""
    address = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
    link = TLSLink(sock, ctx, server_side=True, local=local, peer=None, address=address)
    link.max_payload = 0  # no data frames from an unidentified peer (the owner raises the limit)
    link.handshake(deadline)
    return link


class Heartbeat:
    """One thread that pings every registered link idle for ``interval`` seconds."""

    def __init__(self, interval: float):
        self.interval = interval
        self._links: weakref.WeakSet[TLSLink] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hooks: list[Callable[[], None]] = []  # called every interval too (housekeeping)

    def add(self, link: TLSLink) -> None:
        with self._lock:
            self._links.add(link)
        if self._thread is None:
            self.start()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="siguard-heartbeat")
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        ping = {"kind": "ping"}
        while not self._stop.wait(self.interval):
            with self._lock:
                links = list(self._links)
            now = time.monotonic()
            for link in links:
                if link.closed.is_set():
                    continue
                if now - link.last_send >= self.interval:
                    link.try_send_control(ping)
            for hook in self.hooks:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - housekeeping must not kill the heartbeat
                    pass




class Mailbox:
    """The per-peer FIFOs of one session; :meth:`abort` wakes every receiver (first reason wins)."""

    def __init__(self, peers: Iterable[int]):
        self._queues: dict[int, queue.SimpleQueue] = {p: queue.SimpleQueue() for p in peers}
        self.reason: str | None = None
        self._lock = threading.Lock()

    def put(self, peer: int, item: Any) -> None:
        self._queues[peer].put(item)

    def get(self, peer: int, timeout: float) -> Any:
        """The next item from ``peer``; :data:`~siguard.runtime.mpc.transport.ABORT` once aborted; raises
        queue.Empty on timeout."""
        q = self._queues[peer]
        item = q.get(timeout=timeout)
        if item is ABORT:
            q.put(ABORT)  # for any later receive
        return item

    def abort(self, reason: str) -> bool:
        """Abort with ``reason``; True if this call was the first."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
        for q in self._queues.values():
            q.put(ABORT)
        return True


class NetTransport(Transport):
    """Party ``party``'s endpoint for one session: sends over ``links[peer]``, receives from the
    session's :class:`Mailbox` (filled by the links' reader threads with each frame's numpy words).

    Errors name this party, the peer, the session and the step."""

    def __init__(self, party: int, session: str, timeout: float, links: Mapping[int, TLSLink], mailbox: Mailbox):
        super().__init__(party, session, timeout)
        self.links = links
        self.mailbox = mailbox

    def _where(self) -> str:
        return f"session {self.session}, step {self.current_step!r}"

    def _send_words(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:
        me = party_name(self.party)
        if self.mailbox.reason is not None:
            raise TransportAborted(f"{me}: {self.mailbox.reason} ({self._where()})", self.party, peer)
        link = self.links.get(peer)
        if link is None:
            raise TransportError(f"{me}: no connection to {party_name(peer)} ({self._where()})", self.party, peer)
        try:
            return link.send_words(header, words)
        except LinkError as exc:
            raise TransportError(f"{me}: {exc} ({self._where()})", self.party, peer) from None

    def _recv_words(self, peer: int, deadline: float) -> tuple[FrameHeader, np.ndarray]:
        me = party_name(self.party)
        link = self.links.get(peer)
        quiet_since = deadline - self.timeout  # the round's start
        while True:
            if link is not None:  # heartbeats count: the timeout is for a SILENT peer
                quiet_since = max(quiet_since, link.last_recv)
            remaining = quiet_since + self.timeout - time.monotonic()
            try:
                item = self.mailbox.get(peer, min(max(remaining, 0.0), _TICK_MS / 1000 * 4))
                break
            except queue.Empty:
                if remaining <= 0:
                    raise TransportTimeout(
                        f"{me}: no message from {party_name(peer)} within {self.timeout:g} s ({self._where()})",
                        self.party, peer,
                    ) from None
        if item is ABORT:
            raise TransportAborted(f"{me}: {self.mailbox.reason} ({self._where()})", self.party, peer)
        return item


# ---- hello and statistics messages ------------------------------------------------------------
def hello_message(kind: str, role: int, plan_hash: str | None, frac_bits: int | None, **extra: Any) -> dict[str, Any]:
    """What every party states at handshake: wire and protocol versions, plan hash, fractional bits."""
    msg = {
        "kind": kind,
        "party": role,
        "wire": WIRE_VERSION,
        "protocol": PROTOCOL,
        "protocol_version": PROTOCOL_VERSION,
        "plan_hash": plan_hash,
        "frac_bits": frac_bits,
    }
    msg.update(extra)
    return msg


def compare_hello(mine: Mapping[str, Any], theirs: Mapping[str, Any], me: str, them: str) -> str | None:
    """None if the two hellos agree, else the mismatches in one line, naming both values.

    A ``None`` plan hash or fractional-bit count (a client that expects nothing) matches anything."""
    problems = []
    if theirs.get("wire") != mine.get("wire"):
        problems.append(f"wire format mismatch: {me} speaks v{mine.get('wire')}, {them} v{theirs.get('wire')}")
    if (theirs.get("protocol"), theirs.get("protocol_version")) != (mine.get("protocol"), mine.get("protocol_version")):
        problems.append(
            f"protocol mismatch: {me} runs {mine.get('protocol')} v{mine.get('protocol_version')}, "
            f"{them} runs {theirs.get('protocol')} v{theirs.get('protocol_version')}"
        )
    a, b = mine.get("plan_hash"), theirs.get("plan_hash")
    if a is not None and b is not None and a != b:
        problems.append(f"plan hash mismatch: {me} has {a}, {them} has {b}")
    fa, fb = mine.get("frac_bits"), theirs.get("frac_bits")
    if fa is not None and fb is not None and fa != fb:
        problems.append(f"fractional bits mismatch: {me} uses {fa}, {them} uses {fb}")
    return "; ".join(problems) or None


def stats_to_json(stats: Mapping[str, Any]) -> dict[str, list]:
    """Per-step :class:`siguard.runtime.mpc.transport.StepStats` as JSON-able lists (order kept)."""
    return {
        name: [s.rounds, {str(k): v for k, v in s.sent.items()}, {str(k): v for k, v in s.received.items()},
               s.framing_bytes]
        for name, s in stats.items()
    }


def stats_from_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`stats_to_json`."""

    out = {}
    for name, (rounds, sent, received, framing) in doc.items():
        out[name] = StepStats(int(rounds), {int(k): int(v) for k, v in sent.items()},
                              {int(k): int(v) for k, v in received.items()}, int(framing))
    return out
