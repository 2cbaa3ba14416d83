"""Certificates, parties.toml, TLS links and framing (in-process, real sockets on loopback)."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from siguard.core.errors import InputError
from siguard.runtime.mpc.transport import FrameHeader, TransportAborted, TransportTimeout
from siguard.runtime.net.certs import make_certs
from siguard.runtime.net.config import load_config, render_config
from siguard.runtime.net.processes import child_env, siguard_command
from siguard.runtime.net.tls import LinkError, Mailbox, NetTransport, accept, compare_hello, dial, hello_message


def _config(tmp_path, cert_dir, ports=(7400, 7401, 7402)):
    path = tmp_path / "parties.toml"
    path.write_text(render_config({f"P{i}": ("127.0.0.1", ports[i]) for i in range(3)}, cert_dir=cert_dir))
    return load_config(path)


def _pair(server_cfg, client_cfg, server_party=0, client_party=1, deadline=5.0):
    """A connected (server-side link, client-side link) over loopback, or the exceptions."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    result: dict = {}

    def serve():
        sock, addr = listener.accept()
        try:
            result["server"] = accept(sock, addr, server_cfg.ssl_context(server_party, True), local=server_party,
                                      deadline=time.monotonic() + deadline)
        except LinkError as exc:
            result["server_error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        result["client"] = dial("127.0.0.1", port, client_cfg.ssl_context(client_party, False), local=client_party,
                                peer=server_party, deadline=time.monotonic() + deadline)
    except LinkError as exc:
        result["client_error"] = exc
    t.join()
    listener.close()
    return result


def test_certs_command_writes_a_ca_party_certificates_and_config(tmp_path):
    out = tmp_path / "certs"
    cmd = [*siguard_command(), "certs", "--out", str(out), "--host", "P1=10.77.0.12"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    for name in ("ca", "P0", "P1", "P2", "client"):
        assert (out / f"{name}.pem").exists()
    for name in ("P0", "P1", "P2", "client"):  # each party's key in that party's own directory, and only there
        assert stat.S_IMODE((out / name / f"{name}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o700
        assert sorted(p.name for p in (out / name).iterdir()) == [f"{name}.key"]
        assert not (out / f"{name}.key").exists()
    cfg = load_config(out / "parties.toml")
    assert cfg[1].host == "10.77.0.12" and cfg[1].port == 7401
    assert len({cfg[i].fingerprint for i in range(4)}) == 4
    # running it again must not overwrite anything
    again = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "exists; pass --force" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_configuration_and_the_processes_parent_do_not_import_torch():
    """Reading parties.toml, making certificates and the parent of `run --mode processes` (which only starts the
    servers and the client, each importing torch itself) stay free of torch: a second ~1 s import of torch on a
    2-core machine would compete with the servers starting. The client's party number restated in the
    configuration module agrees with the transport's."""
    import sys

    from siguard.runtime.mpc import transport
    from siguard.runtime.net import config

    assert config.CLIENT == transport.CLIENT
    code = ("import sys, siguard.cli, siguard.runtime.net.processes, siguard.runtime.runs; "
            "siguard.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.split("[client]")[0], r"missing section \[client\]"),
        (lambda t: t.replace("[P2]", "[P3]"), "unknown entries P3"),
        (lambda t: t.replace("port = 7401", "port = 99999"), "port must be an integer"),
        (lambda t: t.replace('cert = "P1.pem"', 'cert = "nope.pem"'), "does not exist"),
        (lambda t: t.replace('cert = "P2.pem"', 'cert = "P1.pem"'), "use the same certificate"),
        (lambda t: t + "\n[extra]\n", "unknown entries"),
        (lambda t: t.replace("[P0]", "[P0"), "not valid TOML"),
    ],
)
def test_bad_configurations_get_one_clear_line(tmp_path, net_certs, edit, message):
    text = render_config({f"P{i}": ("127.0.0.1", 7400 + i) for i in range(3)}, cert_dir=net_certs)
    text = text.replace(str(net_certs) + "/", "")
    shutil.copytree(net_certs, tmp_path, dirs_exist_ok=True)  # keys are in per-party directories
    path = tmp_path / "parties.toml"
    path.write_text(edit(text))
    with pytest.raises(InputError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_link_carries_tensors_of_every_size_both_ways_at_once(tmp_path, net_certs):
    cfg = _config(tmp_path, net_certs)
    links = _pair(cfg, cfg)
    server, client = links["server"], links["client"]
    assert cfg.identify(server.peer_der) == 1 and cfg.identify(client.peer_der) == 0
    server.peer, server.max_payload = 1, 1 << 30  # identified: data frames allowed from now on
    boxes = {0: Mailbox((1,)), 1: Mailbox((0,))}
    controls: list = []
    server.start_reader(lambda lk, h, t: boxes[0].put(1, (h, t)), lambda lk, m: controls.append(m),
                        lambda lk, r: None, liveness=10)
    client.start_reader(lambda lk, h, t: boxes[1].put(0, (h, t)), lambda lk, m: controls.append(m),
                        lambda lk, r: None, liveness=10)
    a = NetTransport(0, "s1", 10, {1: server}, boxes[0])
    b = NetTransport(1, "s1", 10, {0: client}, boxes[1])
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (3,), (2, 5), (1 << 16,), (3, 700, 500)]  # up to 8.4 MB: chunked sends
    tensors = [torch.randint(-(2**63), 2**63 - 1, s, dtype=torch.int64, generator=gen) for s in shapes]
    got: dict = {}

    def side(t, peer, key):
        out = []
        for x in tensors:
            out.append(t.exchange({peer: x}, {peer: tuple(x.shape)})[peer])
        got[key] = out

    threads = [threading.Thread(target=side, args=(a, 1, "a")), threading.Thread(target=side, args=(b, 0, "b"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for key in "ab":
        for x, y in zip(tensors, got[key], strict=True):
            assert y.shape == x.shape and torch.equal(x, y)
    st = a.stats["main"]
    assert st.rounds == len(shapes) and st.sent[1] == sum(8 * x.numel() for x in tensors) and st.framing_bytes > 0
    client.send_control({"kind": "note", "n": 1})
    deadline = time.monotonic() + 5
    while not controls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert controls == [{"kind": "note", "n": 1}]
    server.close()
    client.close()


def test_data_from_an_unidentified_peer_is_refused(tmp_path, net_certs):
    cfg = _config(tmp_path, net_certs)
    links = _pair(cfg, cfg)
    links["client"].send_words(FrameHeader("s", "x", 1, 0, (4,)), np.zeros(4, dtype=np.int64))
    with pytest.raises(LinkError, match="oversized frame"):
        links["server"].read_frame(time.monotonic() + 5)
    links["server"].close()
    links["client"].close()


def test_receive_times_out_and_abort_wakes_the_receiver(tmp_path, net_certs):
    cfg = _config(tmp_path, net_certs)
    links = _pair(cfg, cfg)
    box = Mailbox((1,))
    t = NetTransport(0, "s", 0.3, {1: links["server"]}, box)
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout, match="no message from P1 within 0.3 s"):
        t.exchange({}, {1: (1,)})
    assert time.monotonic() - t0 < 2
    t.timeout = 30
    threading.Timer(0.2, box.abort, args=("connection to P1 lost (test)",)).start()
    with pytest.raises(TransportAborted, match="connection to P1 lost"):
        t.exchange({}, {1: (1,)})
    links["server"].close()
    links["client"].close()


def test_peer_close_is_reported_naming_the_peer(tmp_path, net_certs):
    cfg = _config(tmp_path, net_certs)
    links = _pair(cfg, cfg)
    server, client = links["server"], links["client"]
    server.peer = 1
    reasons: list[str] = []
    server.start_reader(lambda *a: None, lambda *a: None, lambda lk, r: reasons.append(r), liveness=10)
    client.close()
    assert server.closed.wait(5)
    assert reasons and "connection to P1 lost" in reasons[0]


def test_certificate_from_another_ca_is_refused(tmp_path, net_certs):
    (tmp_path / "good").mkdir()
    good = _config(tmp_path / "good", net_certs)
    other_dir = tmp_path / "other"
    make_certs(other_dir, write_config=False)
    # trusts the right CA but presents certificates from another CA
    text = render_config({f"P{i}": ("127.0.0.1", 7400 + i) for i in range(3)}, cert_dir=other_dir)
    text = text.replace(f'ca = "{other_dir}/ca.pem"', f'ca = "{net_certs}/ca.pem"')
    (tmp_path / "bad.toml").write_text(text)
    bad = load_config(tmp_path / "bad.toml")
    # a client (P1's role) with a foreign certificate: the server refuses it
    res = _pair(good, bad)
    assert "certificate verify failed" in str(res["server_error"])
    if "client" in res:  # TLS 1.3: the client learns of the refusal on its first read
        with pytest.raises(LinkError, match="the peer refused our certificate"):
            res["client"].recv_control(time.monotonic() + 5)
    else:
        assert "refused our certificate" in str(res["client_error"])
    # a server with a foreign certificate: the client refuses it
    res = _pair(bad, good)
    assert "certificate verify failed" in str(res["client_error"])


def test_pinning_tells_the_parties_apart(tmp_path, net_certs):
    cfg = _config(tmp_path, net_certs)
    res = _pair(cfg, cfg, server_party=0, client_party=3)
    assert cfg.identify(res["server"].peer_der) == 3  # the client's certificate identifies the client
    assert cfg.identify(b"not a certificate") is None
    res["server"].close()
    res["client"].close()


def test_hello_mismatch_names_both_values():
    mine = hello_message("hello", 0, "a" * 64, 16)
    theirs = hello_message("hello", 2, "b" * 64, 12)
    msg = compare_hello(mine, theirs, "P0", "P2")
    assert f"plan hash mismatch: P0 has {'a' * 64}, P2 has {'b' * 64}" in msg
    assert "fractional bits mismatch: P0 uses 16, P2 uses 12" in msg
    assert compare_hello(mine, dict(mine), "P0", "P1") is None
    assert compare_hello(hello_message("hello", 3, None, None), mine, "the client", "P0") is None
