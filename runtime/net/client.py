"""The query client of the networked runtime (``siguard query --config parties.toml --input X.npy``).

One query: connect to P0, P1, P2 at once (TLS with the client certificate; each server must
present the certificate pinned for it in ``parties.toml``), say hello to P0 and get the session
id, token and the plan's public input/output shapes back, check the input against them, join the
session at P1 and P2, compare the three servers' plan hash, protocol version and fractional bits
(with each other and with ``plan_hash`` if configured), secret-share the input
(:meth:`siguard.runtime.mpc.client.Client.share_input`: 16 bytes per element to each server, from the OS CSPRNG
via a fresh private PRF key) and reconstruct the revealed output. The client learns nothing but
the output (and public information: shapes, the plan hash, rounds and bytes per step).

The client's process never imports torch (about a second of start-up, as long as a warm query): the
input's encoding (:func:`siguard.core.fixedpoint.encode_words`), its shares, the frames and the
output's reconstruction and decoding are numpy, bit for bit what the servers' tensors hold.

Failures raise :class:`siguard.core.errors.RuntimeFault` naming the server involved ("P1 unreachable
at 10.0.0.2:7401 (Connection refused)", "connection to P2 lost (closed by the peer)", or the error
a server reported); a bad input raises :class:`siguard.core.errors.InputError` after telling P0 to
drop the session, before any share is sent.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siguard.core.errors import InputError, RuntimeFault
from siguard.core.fixedpoint import decode_words, encode_words
from siguard.runtime.mpc.client import Client
from siguard.runtime.mpc.transport import TransportError
from siguard.runtime.runs import check_inputs
from siguard.runtime.stats import summarize

from .config import CLIENT, PartiesConfig, party_name
from .tls import (
    Heartbeat,
    LinkError,
    Mailbox,
    NetTransport,
    TLSLink,
    compare_hello,
    dial,
    hello_message,
    stats_from_json,
)

__all__ = ["QueryResult", "QueryClient", "query"]


@dataclass
class QueryResult:
    """Decoded outputs (float64 by output name), wall time, session id, plan hash and statistics
    (the :func:`siguard.runtime.stats.summarize` form, empty if a server did not send its counters)."""

    outputs: dict[str, np.ndarray]
    seconds: float
    session: str
    plan_hash: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        return next(iter(self.outputs.values()))


class _Specs:
    """The public part of the plan the client needs for :func:`siguard.runtime.runs.check_inputs`."""

    def __init__(self, inputs: list[dict[str, Any]], frac_bits: int):
        self.inputs = [{"name": s["name"], "shape": [int(d) for d in s["shape"]], "domain": s.get("domain"),
                        "domain_source": s.get("domain_source")}
                       for s in inputs]
        self.frac_bits = int(frac_bits)


class QueryClient:
    """Runs queries against the trio of ``config``.

    ``timeout``: seconds for connecting and the handshake, and after which a silent server
    counts as dead. ``query_timeout``: how long a round may wait for a SILENT server (counted from the
    last bytes it sent, heartbeats included: a server that computes is waited for). ``expected_hash``: the
    plan hash to insist on (default: ``plan_hash`` from the configuration, else only the servers' agreement is checked).
    """

    def __init__(self, config: PartiesConfig, *, timeout: float = 30.0, query_timeout: float = 3600.0,
                 expected_hash: str | None = None):
        self.config = config
        self.timeout = float(timeout)
        self.query_timeout = float(query_timeout)
        self.expected_hash = expected_hash if expected_hash is not None else config.plan_hash

    # ---- public -------------------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray] | np.ndarray, *, check: bool = True) -> QueryResult:
        """One query. ``check=False`` skips the local input check (tests use it to show that
        the servers reject a malformed input on their own)."""
        t0 = time.monotonic()
        ctx = self.config.ssl_context(CLIENT, server_side=False)
        links = self._connect(ctx, t0 + self.timeout)
        heartbeat = Heartbeat(min(max(self.timeout / 4, 0.2), 5.0))
        try:
            return self._query(links, inputs, check, t0, heartbeat)
        finally:
            heartbeat.stop()
            for link in links.values():
                link.close()

    # ---- steps --------------------------------------------------------------------------------
    def _connect(self, ctx, deadline: float) -> dict[int, TLSLink]:
        links: dict[int, TLSLink] = {}
        errors: dict[int, str] = {}

        def one(j: int) -> None:
            entry = self.config[j]
            try:
                link = dial(entry.host, entry.port, ctx, local=CLIENT, peer=j, deadline=deadline)
            except LinkError as exc:
                errors[j] = str(exc)
                return
            if self.config.identify(link.peer_der) != j:
                link.close()
                errors[j] = (f"{entry.name} at {entry.address} presented a certificate that is not {entry.name}'s "
                             "(refused: not the certificate in parties.toml)")
                return
            links[j] = link

        threads = [threading.Thread(target=one, args=(j,), daemon=True) for j in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for link in links.values():
                link.close()
            raise RuntimeFault(f"query failed: {errors[min(errors)]}")
        return links

    def _welcome(self, link: TLSLink, deadline: float) -> dict[str, Any]:
        try:
            msg = link.recv_control(deadline)
        except LinkError as exc:
            raise RuntimeFault(f"query failed: handshake with {link.peer_name}: {exc}") from None
        if msg.get("kind") == "error":
            raise RuntimeFault(f"query refused: {msg.get('message')}")
        if msg.get("kind") != "welcome" or msg.get("party") != link.peer:
            raise RuntimeFault(f"query failed: {link.peer_name} answered {msg.get('kind')!r} instead of a welcome")
        return msg

    def _query(self, links: dict[int, TLSLink], inputs: Any, check: bool, t0: float,
               heartbeat: Heartbeat) -> QueryResult:
        deadline = t0 + self.timeout
        me = hello_message("hello", CLIENT, self.expected_hash, None)
        try:
            links[0].send_control(me)
        except LinkError as exc:
            raise RuntimeFault(f"query failed: {exc}") from None
        w0 = self._welcome(links[0], deadline)
        mismatch = compare_hello(me, w0, "the client", "P0")
        if mismatch:
            raise RuntimeFault(f"handshake failed: {mismatch}")
        sid, token, frac = str(w0["session"]), w0.get("token"), int(w0["frac_bits"])
        try:
            xs = check_inputs(_Specs(w0["inputs"], frac), inputs) if check else _raw_inputs(w0["inputs"], inputs)
        except InputError as exc:
            links[0].try_send_control({"kind": "abort", "reason": f"bad input: {exc}"})
            raise
        for j in (1, 2):
            try:
                links[j].send_control(hello_message("join", CLIENT, self.expected_hash, None, session=sid, token=token))
            except LinkError as exc:
                links[0].try_send_control({"kind": "abort", "reason": str(exc)})
                raise RuntimeFault(f"query failed: {exc}") from None
        welcomes = {0: w0}
        for j in (1, 2):
            try:
                welcomes[j] = self._welcome(links[j], deadline)
            except RuntimeFault:
                links[0].try_send_control({"kind": "abort", "reason": f"{party_name(j)} refused the client"})
                raise
        for j in (1, 2):
            mismatch = compare_hello(w0, welcomes[j], "P0", party_name(j))
            if mismatch:
                for link in links.values():
                    link.try_send_control({"kind": "abort", "reason": f"handshake failed: {mismatch}"})
                raise RuntimeFault(f"handshake failed: {mismatch}")

        mailbox = Mailbox((0, 1, 2))
        stats_msgs: dict[int, dict[str, Any]] = {}
        all_stats = threading.Event()
        finished = threading.Event()

        def on_data(link: TLSLink, header, tensor) -> None:
            if header.sender != link.peer:
                raise LinkError(f"frame on {link.peer_name}'s connection claims sender {header.sender}")
            mailbox.put(link.peer, (header, tensor))

        def on_control(link: TLSLink, msg: dict[str, Any]) -> None:
            if msg["kind"] == "error":
                mailbox.abort(f"{msg.get('message')}")
            elif msg["kind"] == "stats":
                stats_msgs[link.peer] = msg
                if len(stats_msgs) == 3:
                    all_stats.set()

        def on_close(link: TLSLink, reason: str) -> None:
            # a server closes after its last message (the statistics): only an earlier close is a failure
            if not finished.is_set() and link.peer not in stats_msgs:
                mailbox.abort(reason)

        largest = max((math.prod(spec["shape"]) for spec in w0["outputs"]), default=0)
        for link in links.values():
            link.max_payload = 8 * largest + 1024  # a server sends the client nothing but output shares
            link.start_reader(on_data, on_control, on_close, liveness=self.timeout)
            heartbeat.add(link)
        transport = NetTransport(CLIENT, sid, self.query_timeout, dict(links), mailbox)
        client = Client(transport)
        out_specs = w0["outputs"]
        try:
            for spec in w0["inputs"]:
                with transport.step(f"input:{spec['name']}"):
                    client.share_input(encode_words(xs[spec["name"]], frac))
            revealed = {}
            for spec in out_specs:
                with transport.step(f"reveal:{spec['name']}"):
                    revealed[spec["name"]] = client.receive_output(spec["shape"])
        except TransportError as exc:
            reason = mailbox.reason or str(exc)
            for link in links.values():
                link.try_send_control({"kind": "abort", "reason": "the client gave up"})
            raise RuntimeFault(f"query {sid} failed: {reason}") from None
        seconds = time.monotonic() - t0
        all_stats.wait(min(5.0, self.timeout))
        finished.set()
        outputs = {name: decode_words(v, frac) for name, v in revealed.items()}
        return QueryResult(outputs, seconds, sid, str(w0["plan_hash"]), _summary(stats_msgs, transport))


def _raw_inputs(specs: list[dict[str, Any]], inputs: Any) -> dict[str, np.ndarray]:
    """Inputs without checks (float64), for tests of the servers' own checks."""
    if not isinstance(inputs, dict):
        inputs = {specs[0]["name"]: inputs}
    return {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}


def _summary(stats_msgs: dict[int, dict[str, Any]], transport: NetTransport) -> dict[str, Any]:
    if len(stats_msgs) != 3:
        return {}

    per_party = []
    for j in range(3):
        steps = dict(stats_from_json(stats_msgs[j].get("setup", {})))
        steps.update(stats_from_json(stats_msgs[j]["steps"]))
        per_party.append(steps)
    per_party.append(transport.stats)
    return summarize(per_party, list(per_party[0]))


def query(config: PartiesConfig, inputs: dict[str, np.ndarray] | np.ndarray, **kwargs: Any) -> QueryResult:
    """One query with a fresh :class:`QueryClient` (keyword arguments as its constructor)."""
    return QueryClient(config, **kwargs).run(inputs)
