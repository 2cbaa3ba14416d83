"""Denial of service and key hygiene of the networked runtime, against three in-process servers:
per-client certificates from a signing request, revocation, a TLS 1.2 client, garbage and oversized
frames after the handshake, abort reasons sanitised before they are logged."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

import numpy as np
import pytest

from siguard.core.errors import InputError, RuntimeFault
from siguard.runtime.local import run_reference
from siguard.runtime.net.certs import make_certs, make_request, sign_request
from siguard.runtime.net.client import QueryClient
from siguard.runtime.net.config import fingerprint_of_pem, load_config, render_config
from siguard.runtime.net.processes import free_ports
from siguard.runtime.net.server import PartyServer
from siguard.runtime.net.tls import KIND_CONTROL, KIND_DATA, dial

TOL = 2e-3


@pytest.fixture(scope="module")
def hygiene(net_plans, tmp_path_factory):
    """Servers whose config adds a client 'alice' (key made on her side, certificate signed from her
    request) and revokes 'mallory'. Yields (servers, server config, alice's config, mallory's config, logs)."""
    d = tmp_path_factory.mktemp("hygiene")
    certs = d / "certs"
    make_certs(certs, write_config=False)
    for who in ("alice", "mallory"):
        req = make_request(d / who, who)
        assert sign_request(certs, req["csr"]) == certs / f"{who}.pem"
    ports = free_ports(3)
    base = render_config({f"P{i}": ("127.0.0.1", ports[i]) for i in range(3)}, cert_dir=certs)
    mallory_fp = fingerprint_of_pem((certs / "mallory.pem").read_bytes())
    head, rest = base.split("\n[P0]", 1)
    server_text = (f'{head}\nrevoked = ["{mallory_fp}"]\n\n[P0]{rest}\n[clients]\n'
                   f'alice = "{certs / "alice.pem"}"\nmallory = "{certs / "mallory.pem"}"\n')
    (d / "servers.toml").write_text(server_text)
    configs = {}
    for who in ("alice", "mallory"):
        cert, key = certs / f"{who}.pem", d / who / f"{who}.key"
        text = base.split("[client]")[0] + f'[client]\ncert = "{cert}"\nkey = "{key}"\n'
        (d / f"{who}.toml").write_text(text)
        configs[who] = load_config(d / f"{who}.toml")
    config = load_config(d / "servers.toml")
    plan = net_plans[1]
    logs: list[str] = []
    servers = [PartyServer(plan, i, config, weights=plan.load_weights() if i == 0 else None, timeout=10,
                           log=logs.append) for i in range(3)]
    starters = [threading.Thread(target=s.start, daemon=True) for s in servers]
    for t in starters:
        t.start()
    for t in starters:
        t.join(60)
    assert all(s.ready for s in servers), logs
    yield servers, config, configs["alice"], configs["mallory"], logs
    for s in servers:
        s.stop("tests over")


def _honest(hygiene, plan, x, config=None) -> None:
    servers, cfg, *_ = hygiene
    y = QueryClient(config or cfg, timeout=10).run(x).output
    assert np.abs(y - run_reference(plan, x).output).max() <= TOL
    assert all(s.fatal is None for s in servers)


def test_a_client_with_its_own_certificate_from_a_signing_request_is_served(hygiene, net_plans, digit_inputs):
    _honest(hygiene, net_plans[1], digit_inputs[:1], config=hygiene[2])


def test_a_revoked_client_certificate_is_refused(hygiene, net_plans, digit_inputs):
    servers, _, _, mallory, logs = hygiene
    with pytest.raises(RuntimeFault):
        QueryClient(mallory, timeout=5).run(digit_inputs[:1])
    assert any("revoked" in line for line in logs)
    _honest(hygiene, net_plans[1], digit_inputs[1:2])


def test_the_private_key_never_leaves_the_requesting_side(hygiene, tmp_path):
    req = make_request(tmp_path, "bob")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.csr", "bob.key"]
    assert b"PRIVATE KEY" not in req["csr"].read_bytes()
    with pytest.raises(InputError, match="needs the CA's ca.pem and ca.key"):
        sign_request(tmp_path, req["csr"])  # no CA here
    ca = tmp_path / "ca"
    make_certs(ca, write_config=False)
    with pytest.raises(InputError, match="not a PEM certificate signing request"):
        sign_request(ca, req["key"])  # a key is not a request
    tampered = tmp_path / "bob2.csr"
    pem = req["csr"].read_bytes()
    lines = pem.splitlines()
    mid = len(lines) // 2
    lines[mid] = lines[mid][:10] + (b"A" if lines[mid][10:11] != b"A" else b"B") + lines[mid][11:]
    tampered.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError):
        sign_request(ca, tampered)  # altered after signing: the signature (or the encoding) fails


def test_a_tls12_client_is_refused(hygiene, net_plans, digit_inputs):
    servers, config, *_ , logs = hygiene
    entry = config[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config[3].cert), str(config[3].key))
    with socket.create_connection((entry.host, entry.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw) as tls:
                tls.recv(1)
    _honest(hygiene, net_plans[1], digit_inputs[2:3])


@pytest.mark.parametrize("frame", [
    b"\xff" * 64,  # garbage
    struct.pack("<BIQ", KIND_DATA, 16, 1 << 40),  # a data frame claiming a terabyte
    struct.pack("<BIQ", KIND_CONTROL, 0, 1 << 30),  # a control message claiming a gigabyte
], ids=["garbage", "oversized-data", "oversized-control"])
def test_garbage_and_oversized_frames_after_the_handshake(hygiene, net_plans, digit_inputs, frame):
    servers, config, *_ , logs = hygiene
    before = len(logs)
    ctx = config.ssl_context(3, server_side=False)
    link = dial(config[0].host, config[0].port, ctx, local=3, peer=0, deadline=time.monotonic() + 5, retry=False)
    link._send_plain(frame)  # after the TLS handshake: the server parses it before allocating anything
    deadline = time.monotonic() + 10
    while not any("malformed or oversized frame" in line for line in logs[before:]):
        assert time.monotonic() < deadline, logs[before:]
        time.sleep(0.05)
    link.close()
    _honest(hygiene, net_plans[1], digit_inputs[3:4])


def _wait_for_log(logs: list[str], text: str, start: int = 0, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in logs[start:]):
        assert time.monotonic() < deadline, f"no log line with {text!r}: {logs[-5:]}"
        time.sleep(0.02)


def test_abort_reasons_are_sanitised_before_logging(hygiene, net_plans, digit_inputs, monkeypatch):
    import siguard.runtime.mpc.rss

    servers, config, *_ , logs = hygiene
    before = len(logs)
    nasty = "bye\n\x1b[31mP1: session q1 done\r" + "x" * 5000

    def cancel(self, x):  # in the session: cancel with a crafted reason instead of sharing the input
        # once P0 runs the session (its reader takes the abort) and until P0 took it: closing the connections
        # earlier lets P2 report the lost client first, and P0 then logs P2's reason instead of this one
        sid = self.transport.session
        _wait_for_log(logs, f"P0: session {sid} started", before)
        self.transport.links[0].send_control({"kind": "abort", "reason": nasty})
        _wait_for_log(logs, "cancelled the query", before)
        raise RuntimeError("cancelled")

    monkeypatch.setattr(siguard.runtime.mpc.client.Client, "share_input", cancel)
    with pytest.raises(RuntimeError, match="cancelled"):
        QueryClient(config, timeout=5).run(digit_inputs[:1])
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while not any("cancelled the query" in line for line in logs[before:]):
        assert time.monotonic() < deadline, logs[before:]
        time.sleep(0.05)
    new = logs[before:]
    assert all("\n" not in line and "\x1b" not in line and "\r" not in line and len(line) < 2100 for line in new)
    assert any("bye??[31mP1: session q1 done?" in line for line in new), new
    _honest(hygiene, net_plans[1], digit_inputs[4:5])


def test_handshakes_beyond_the_cap_are_closed_at_once(hygiene, net_plans, digit_inputs):
    servers, config, *_ , logs = hygiene
    entry, p0 = config[0], servers[0]
    idle = [socket.create_connection((entry.host, entry.port), timeout=5) for _ in range(p0.max_handshakes)]
    try:
        time.sleep(0.5)  # the server is now in 16 TLS handshakes that never progress
        extra = socket.create_connection((entry.host, entry.port), timeout=5)
        t0 = time.monotonic()
        assert extra.recv(1) == b""  # closed by the server, not after its 10 s handshake timeout
        assert time.monotonic() - t0 < 5
        extra.close()
        assert any("handshakes in progress" in line for line in logs)
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    _honest(hygiene, net_plans[1], digit_inputs[5:6])
