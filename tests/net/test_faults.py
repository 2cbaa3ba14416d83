"""The networked runtime with real processes on loopback: equality with threads mode, and faults.

Every server here is a ``siguard party`` process and every ``siguard query`` a process too
(except where a test needs to misbehave as a client, which it does in-process).
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.core.errors import RuntimeFault
from siguard.runtime.local import run_threads
from siguard.runtime.net.client import QueryClient
from siguard.runtime.net.config import load_config
from siguard.runtime.net.processes import Trio, child_env, run_processes, siguard_command, write_loopback_config

TOL = 2e-3  # two secure runs differ by the truncation errors of both (each ~1e-4 here)


def _query_cli(config, x_path, out_path, *extra, timeout=10.0):
    cmd = [*siguard_command(), "query", "--config", str(config), "--input", str(x_path), "--output", str(out_path),
           "--timeout", str(timeout), "--threads", "1", *extra]
    return subprocess.run(cmd, env=child_env(1), capture_output=True, text=True, timeout=120)


def _one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _all_up(trio: Trio) -> bool:
    return all(p.poll() is None for p in trio.procs.values())


# ---- processes mode ------------------------------------------------------------------------------
def test_processes_mode_equals_threads_mode(net_plans, digit_inputs):
    plan = net_plans[8]
    x = digit_inputs[:8]
    threads = run_threads(plan, x)
    procs = run_processes(plan.directory, x, timeout=30)
    assert procs.output.shape == threads.output.shape == (8, 10)
    assert np.abs(procs.output - threads.output).max() <= TOL
    assert (procs.output.argmax(1) == threads.output.argmax(1)).all()
    # the same protocol: identical rounds and payload bytes per party, per step and in total
    for key in ("totals", "setup"):
        for field in ("rounds", "bytes_per_party", "client_bytes"):
            assert procs.stats[key][field] == threads.stats[key][field], (key, field)
    by_name = {s["name"]: s for s in threads.stats["steps"]}
    for s in procs.stats["steps"]:
        assert s["rounds"] == by_name[s["name"]]["rounds"] and s["bytes_per_party"] == by_name[s["name"]][
            "bytes_per_party"], s["name"]
    # only the client received the output
    reveal = [s for s in procs.stats["steps"] if s["name"].startswith("reveal:")]
    assert reveal and all(s["received_per_party"][:3] == [0, 0, 0] for s in reveal)


@pytest.mark.slow
def test_run_command_in_processes_mode(net_plans, digit_inputs, tmp_path):
    plan = net_plans[1]
    x = digit_inputs[:1]
    np.save(tmp_path / "x.npy", x)
    cmd = [*siguard_command(), "run", str(plan.directory), "--input", str(tmp_path / "x.npy"), "--output",
           str(tmp_path / "y.npy"), "--mode", "processes", "--stats", "--timeout", "30"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "processes: output" in proc.stdout and "TOTAL per query" in proc.stdout
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - run_threads(plan, x).output).max() <= TOL


# ---- one trio serving several tests ----------------------------------------------------------------
@pytest.fixture(scope="module")
def serving(net_plans, net_certs, tmp_path_factory):
    """A running trio for the batch-1 plan (each step slowed by 20 ms so that a query lasts a
    little while); yields (trio, config path, work dir)."""
    work = tmp_path_factory.mktemp("serving")
    config = write_loopback_config(work, cert_dir=net_certs)
    trio = Trio(net_plans[1].directory, config, work / "logs", timeout=10, args=["--step-delay", "0.02"])
    with trio:
        trio.wait_ready()
        yield trio, config, work


def _good_query(serving, plan, x, tmp_path=None) -> None:
    """A well-behaved query (in-process client); checks the result and that the trio is still up."""
    trio, config, _ = serving
    y = QueryClient(load_config(config), timeout=10).run(x).output
    assert np.abs(y - run_threads(plan, x).output).max() <= TOL
    assert _all_up(trio)


def test_query_command_answers(serving, net_plans, digit_inputs, tmp_path):
    trio, config, _ = serving
    np.save(tmp_path / "x.npy", digit_inputs[:1])
    proc = _query_cli(config, tmp_path / "x.npy", tmp_path / "y.npz", "--stats-json", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("query q")
    with np.load(tmp_path / "y.npz") as z:
        y = z[z.files[0]]
    assert np.abs(y - run_threads(net_plans[1], digit_inputs[:1]).output).max() <= TOL
    info = json.loads((tmp_path / "s.json").read_text())
    assert info["plan_hash"] == net_plans[1].plan_hash
    assert info["stats"]["totals"]["rounds"] == net_plans[1].totals["rounds"]


def test_the_query_command_never_imports_torch(serving, net_plans, digit_inputs, tmp_path):
    """Issue 14: a `siguard query` process -- read and check the input, share it, mutual TLS, reconstruct and
    decode the output, write it, print the statistics -- runs on numpy alone (importing torch would cost about a
    second, as long as a warm query). Checked on the real command with `python -X importtime`, which names every
    module the process imports, whatever the path that imports it."""
    trio, config, _ = serving
    np.save(tmp_path / "x.npy", digit_inputs[:1])
    python, *cli = siguard_command()
    cmd = [python, "-X", "importtime", *cli, "query", "--config", str(config), "--input", str(tmp_path / "x.npy"),
           "--output", str(tmp_path / "y.npy"), "--timeout", "10", "--stats"]
    proc = subprocess.run(cmd, env=child_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = [ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert {"numpy", "siguard.runtime.net.client", "siguard.runtime.mpc.prg"} <= set(imported)  # the scan sees them
    assert [m for m in imported if m.split(".")[0] == "torch"] == []
    assert "rounds" in proc.stdout  # the statistics were printed
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - run_threads(net_plans[1], digit_inputs[:1]).output).max() <= TOL


def test_wrong_client_certificate_is_refused(serving, net_plans, digit_inputs, tmp_path):
    from siguard.runtime.net.certs import make_certs

    trio, config, _ = serving
    other = tmp_path / "other"
    make_certs(other, write_config=False)
    text = config.read_text()
    cfg = load_config(config)
    bad = text.replace(f'cert = "{cfg[3].cert}"', f'cert = "{other}/client.pem"').replace(
        f'key = "{cfg[3].key}"', f'key = "{other}/client/client.key"')
    assert bad != text
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(RuntimeFault, match="refused our certificate|certificate") as info:
        QueryClient(load_config(tmp_path / "bad.toml"), timeout=5).run(digit_inputs[:1])
    assert "\n" not in str(info.value)
    _wait_for(lambda: "certificate verify failed" in trio.log(0), 5, "P0 to log the refusal")
    _good_query(serving, net_plans[1], digit_inputs[1:2], tmp_path)


def test_another_partys_certificate_is_refused_for_a_client(serving, net_plans, digit_inputs, tmp_path):
    from siguard.runtime.net.tls import dial, hello_message

    trio, config, _ = serving
    cfg = load_config(config)
    # someone holding P1's (valid, CA-signed) certificate asks P0 for a session: pinning says it is
    # P1, the trio is formed, so P0 refuses
    link = dial("127.0.0.1", cfg[0].port, cfg.ssl_context(1, False), local=1, peer=0,
                deadline=time.monotonic() + 5)
    link.send_control(hello_message("hello", 3, None, None))
    reply = link.recv_control(time.monotonic() + 5)
    link.close()
    assert reply["kind"] == "error" and "unexpected connection with P1's certificate" in reply["message"]
    _good_query(serving, net_plans[1], digit_inputs[2:3], tmp_path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((3, 64), np.float32), r"has shape \(3, 64\); the plan expects \(1, 64\)"),
        (np.array([["a"] * 64]), "dtype"),
        (np.full((1, 64), np.nan, np.float32), "NaN"),
    ],
    ids=["shape", "dtype", "nan"],
)
def test_bad_input_gets_a_clear_error_and_servers_stay_up(serving, net_plans, digit_inputs, tmp_path, bad, message):
    trio, config, _ = serving
    np.save(tmp_path / "bad.npy", bad)
    proc = _query_cli(config, tmp_path / "bad.npy", tmp_path / "out.npy")
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert line.startswith("siguard: error: input") and re.search(message, line), line
    assert not (tmp_path / "out.npy").exists()
    _good_query(serving, net_plans[1], digit_inputs[3:4], tmp_path)


def test_malformed_shares_are_rejected_by_the_servers(serving, net_plans, digit_inputs, tmp_path):
    trio, config, _ = serving
    client = QueryClient(load_config(config), timeout=5)
    for bad in (np.zeros((1, 63)), np.zeros((3, 64))):  # smaller, and larger than the plan's input
        with pytest.raises(RuntimeFault, match=r"shape|oversized") as info:
            client.run(bad, check=False)
        assert "\n" not in str(info.value)
    assert _all_up(trio)
    _good_query(serving, net_plans[1], digit_inputs[4:5], tmp_path)


def test_client_disconnecting_mid_query_leaves_the_servers_serving(serving, net_plans, digit_inputs, tmp_path,
                                                                    monkeypatch):
    import siguard.runtime.mpc.client

    trio, config, _ = serving
    before = [trio.log(i).count("failed") for i in range(3)]

    def vanish(self, shape):  # the client sent its input, then goes away instead of waiting
        for link in self.transport.links.values():
            link.close()
        raise RuntimeError("client vanished")

    monkeypatch.setattr(siguard.runtime.mpc.client.Client, "receive_output", vanish)
    with pytest.raises(RuntimeError, match="client vanished"):
        QueryClient(load_config(config), timeout=5).run(digit_inputs[:1])
    monkeypatch.undo()
    _wait_for(lambda: all(trio.log(i).count("failed") > before[i] for i in range(3)), 10,
              "the servers to abort the session")
    assert "connection to client lost" in trio.log(0) or "aborted the session" in trio.log(0)
    _good_query(serving, net_plans[1], digit_inputs[5:6], tmp_path)


def test_concurrent_sessions_on_the_serving_trio(serving, net_plans, digit_inputs):
    import threading

    trio, config, _ = serving
    cfg = load_config(config)
    results: dict = {}

    def one(k):
        try:
            results[k] = QueryClient(cfg, timeout=30).run(digit_inputs[10 + k : 11 + k])
        except Exception as exc:  # noqa: BLE001 - reported below
            results[k] = exc

    # several hellos at once: P0 must still announce the session numbers to P1, P2 in order
    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {k: r for k, r in results.items() if isinstance(r, Exception)}
    assert not failed, (failed, [trio.log(i)[-2000:] for i in range(3)])
    assert len({r.session for r in results.values()}) == 6
    ref = run_threads(net_plans[1], digit_inputs[10:11]).output
    assert np.abs(results[0].output - ref).max() <= TOL


# ---- a server dies ---------------------------------------------------------------------------------
def test_sigkill_of_a_server_mid_inference_stops_everyone_with_a_clear_message(start_trio, net_plans, digit_inputs,
                                                                               tmp_path):
    plan = net_plans[1]
    trio = start_trio(plan.directory, timeout=10, args=["--step-delay", "0.4"])  # a query lasts ~4 s
    trio.wait_ready()
    np.save(tmp_path / "x.npy", digit_inputs[:1])
    client = subprocess.Popen(
        [*siguard_command(), "query", "--config", trio.config, "--input", str(tmp_path / "x.npy"), "--output",
         str(tmp_path / "y.npy"), "--timeout", "10"],
        env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: all(f"P{i}: session q1 started" in trio.log(i) for i in range(3)), 60, "the session")
        time.sleep(1.0)  # a few steps into the inference
        assert client.poll() is None
        trio.kill(1, signal.SIGKILL)
        t0 = time.monotonic()
        codes = {i: trio.wait(i, 30) for i in (0, 2)}
        _, err = client.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if client.poll() is None:
            client.kill()
    assert elapsed < 30
    assert codes == {0: 3, 2: 3}
    for i in (0, 2):
        line = trio.last_error(i)
        assert line.startswith(f"siguard: error: P{i}: ") and "connection to P1 lost" in line, line
        assert "session q1" in line, line
    assert client.returncode == 3
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "P1" in lines[0] and "query q1 failed" in lines[0], err
    assert not (tmp_path / "y.npy").exists()


def test_a_server_computing_longer_than_the_timeout_is_waited_for(start_trio, net_plans, digit_inputs, tmp_path):
    """Liveness, not patience: P1 sleeps 1.3 s before every step (alive, heartbeating, silent on the
    session) with --timeout 1 everywhere; the query completes, with the right answer."""
    plan = net_plans[1]
    trio = start_trio(plan.directory, timeout=1, threads=1, party_args={1: ["--step-delay", "1.3"]})
    trio.wait_ready()
    np.save(tmp_path / "x.npy", digit_inputs[:1])
    t0 = time.monotonic()
    proc = _query_cli(trio.config, tmp_path / "x.npy", tmp_path / "y.npy", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stderr, trio.log(0)[-1000:], trio.log(1)[-1000:])
    assert elapsed > 1.3  # at least one step's delay: the peers waited longer than --timeout
    assert np.abs(np.load(tmp_path / "y.npy") - run_threads(plan, digit_inputs[:1]).output).max() <= TOL
    assert _all_up(trio)


def test_the_three_servers_count_the_same_failed_sessions(start_trio, net_plans, digit_inputs, tmp_path):
    """A query refused for its input after P0 announced the session fails at P0 and is never joined at P1,
    P2: all three count it as failed (P0 said "2 failed" where P1 and P2 said 0)."""
    plan = net_plans[1]
    trio = start_trio(plan.directory, timeout=5, threads=1)
    trio.wait_ready()
    from siguard.core.errors import InputError

    client = QueryClient(load_config(trio.config), timeout=5)
    for _ in range(2):
        with pytest.raises(InputError, match="shape"):
            client.run(digit_inputs[:3])  # batch 3 for a batch-1 plan: refused after P0's welcome
    assert np.abs(client.run(digit_inputs[:1]).output - run_threads(plan, digit_inputs[:1]).output).max() <= TOL
    _wait_for(lambda: all(trio.log(i).count("session q2 failed") == 1 for i in range(3)), 20,
              "every server to close the refused sessions")
    trio.stop()
    for i in range(3):
        assert f"P{i}: stopped (1 queries served, 2 failed)" in trio.log(i), trio.log(i)[-1500:]


def test_a_frozen_server_is_detected_by_heartbeats(start_trio, net_plans):
    trio = start_trio(net_plans[1].directory, timeout=3)
    trio.wait_ready()
    trio.kill(1, signal.SIGSTOP)  # alive, connections open, but silent
    try:
        t0 = time.monotonic()
        codes = {i: trio.wait(i, 30) for i in (0, 2)}
        elapsed = time.monotonic() - t0
    finally:
        trio.kill(1, signal.SIGKILL)
    assert codes == {0: 3, 2: 3}
    assert elapsed < 15
    for i in (0, 2):
        assert "P1 went silent" in trio.last_error(i) or "connection to P1" in trio.last_error(i), trio.last_error(i)


def test_unreachable_peers_are_named(start_trio, net_plans, digit_inputs, tmp_path):
    plan = net_plans[1]
    # single servers, so that no start-up skew between processes matters
    p2 = start_trio(plan.directory, timeout=3, connect_timeout=3, parties=[2])  # dials P0 and P1: refused
    p0 = start_trio(plan.directory, timeout=3, connect_timeout=3, parties=[0])  # waits for P1 and P2
    assert p2.wait(2, 60) == 3
    assert re.search(r"P2: P[01] unreachable at 127\.0\.0\.1:\d+ \(Connection refused\)", p2.last_error(2))
    assert p0.wait(0, 60) == 3
    line = p0.last_error(0)
    assert "P1 did not connect within 3 s" in line and "P2 did not connect within 3 s" in line, line
    # a client with no servers
    cfg = load_config(p2.config)
    t0 = time.monotonic()
    with pytest.raises(RuntimeFault, match=f"P0 unreachable at 127.0.0.1:{cfg[0].port}"):
        QueryClient(cfg, timeout=2).run(digit_inputs[:1])
    assert time.monotonic() - t0 < 10


# ---- tampered plans --------------------------------------------------------------------------------
def test_tampered_plan_on_one_server_fails_the_handshake(start_trio, net_plans, tmp_path):
    plan = net_plans[1]
    doc = copy.deepcopy(plan.doc)
    doc["created_by"] = "edited after compilation"  # a public field (warnings now go to owner.json)
    tampered = Plan(doc).save(tmp_path / "tampered")  # a consistent hash: it loads, but it differs
    other = Plan.load(tampered).plan_hash
    assert other != plan.plan_hash
    plans = [plan.directory, plan.directory, tampered]
    # P0 and P1 first (their handshake succeeds), then the tampered P2 dials both
    pair = start_trio(plans, timeout=10, connect_timeout=30, parties=[0, 1])
    _wait_for(lambda: "P1 connected (handshake ok)" in pair.log(0), 60, "P0 and P1 to connect")
    late = start_trio(plans, timeout=10, connect_timeout=30, parties=[2], config=pair.config)
    t0 = time.monotonic()
    codes = {i: (pair if i < 2 else late).wait(i, 60) for i in range(3)}
    assert time.monotonic() - t0 < 60
    assert codes == {0: 3, 1: 3, 2: 3}
    # each names both hashes: from its own handshake with P2, or from a peer's goodbye relaying it
    lines = [pair.last_error(0), pair.last_error(1), late.last_error(2)]
    for line in lines:
        assert "plan hash mismatch" in line and plan.plan_hash in line and f"P2 has {other}" in line, line
    assert any(f"handshake with P2 failed: plan hash mismatch: P{i} has {plan.plan_hash}, P2 has {other}" in lines[i]
               for i in (0, 1)), lines


def test_plan_edited_without_rehash_is_refused_at_load(start_trio, net_plans, tmp_path):
    plan = net_plans[1]
    doc = copy.deepcopy(plan.to_dict())
    doc["frac_bits"] = 12
    bad = tmp_path / "edited"
    bad.mkdir()
    (bad / "plan.json").write_text(json.dumps(doc))
    trio = start_trio([plan.directory, plan.directory, bad], timeout=3, connect_timeout=6)
    assert trio.wait(2, 60) == 2
    assert "plan hash mismatch (recorded" in trio.last_error(2)
    codes = {i: trio.wait(i, 60) for i in (0, 1)}
    assert codes == {0: 3, 1: 3}
    assert "P2 did not connect" in trio.last_error(0)


def test_config_and_input_file_errors_are_one_line(tmp_path, net_plans):
    (tmp_path / "p.toml").write_text("ca = 1\n")
    proc = subprocess.run([*siguard_command(), "query", "--config", str(tmp_path / "p.toml"), "--input", "x.npy"],
                          env=child_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs 'ca'" in _one_line_error(proc)
    proc = subprocess.run([*siguard_command(), "party", str(net_plans[1].directory), "--id", "0", "--config",
                           str(tmp_path / "missing.toml")], env=child_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "does not exist" in _one_line_error(proc)
