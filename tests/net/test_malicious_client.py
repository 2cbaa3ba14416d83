"""A malicious client against the servers: inconsistent shares, out-of-range inputs, fresh weight
shares per session -- in-process (threads and lockstep) and over TLS between real server processes.

The attack (issue: "Security against the client we promised to withstand"): each share component
of the client's input is held by two servers; a client that adds delta to one holder's copy gets
back outputs shifted by products of delta with single share components of the weights. The
servers now compare digests of the two copies before any use and abort the session.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import siguard.runtime.executor
import siguard.runtime.mpc.client as client
import siguard.runtime.mpc.inprocess as inprocess
import siguard.runtime.mpc.rss as rss
from siguard.compiler.plan import Plan
from siguard.core.errors import RuntimeFault
from siguard.runtime.local import run_reference, run_threads
from siguard.runtime.net.client import QueryClient
from siguard.runtime.net.config import load_config
from siguard.runtime.net.processes import Trio, write_loopback_config
from siguard.runtime.net.server import PartyServer
from siguard.runtime.ring import MAX_ABS_REAL

TOL = 2e-3  # two secure runs differ by the truncation errors of both (each ~1e-4 here)
DELTA = 1 << 16  # 1.0 at 16 fractional bits


def _inconsistent_share_input(holder: int, component: int):
    """Client.share_input that adds DELTA to ``holder``'s copy of share component ``component``."""

    input_shares = client.Client.input_shares

    def share_input(self, x):
        msgs = input_shares(self, x)  # fresh arrays: ours to change
        slot = 0 if component == holder else 1  # P_i holds (x_i, x_{i+1})
        assert component in (holder, (holder + 1) % 3)
        msgs[holder][slot] += DELTA
        self.transport.exchange_words(msgs, {})

    return share_input


# ---- in-process ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["threads", "lockstep"])
@pytest.mark.parametrize("holder, component", [(1, 2), (2, 2)], ids=["P1-copy-of-x2", "P2-copy-of-x2"])
def test_inconsistent_client_shares_abort_the_session_in_process(net_plans, digit_inputs, monkeypatch, scheduler,
                                                                  holder, component):
    plan, x = net_plans[1], digit_inputs[:1]
    monkeypatch.setattr(client.Client, "share_input", _inconsistent_share_input(holder, component))
    with pytest.raises(inprocess.PartyFailure) as info:
        run_threads(plan, x, scheduler=scheduler, timeout=20)
    msg = str(info.value)
    assert "inconsistent client input" in msg and f"component x{component}" in msg, msg
    assert "\n" not in msg
    monkeypatch.undo()
    honest = run_threads(plan, x, scheduler=scheduler)
    assert np.abs(honest.output - run_reference(plan, x).output).max() <= TOL


def test_the_attack_works_when_the_check_is_skipped(net_plans, digit_inputs, monkeypatch):
    """Without the check (patched out), the inconsistent copy changes the output: the check is what
    stops the attack, not some other failure."""
    plan, x = net_plans[1], digit_inputs[:1]
    honest = run_threads(plan, x).output
    monkeypatch.setattr(rss.RSSEngine, "_check_consistent", lambda self, shares: None)
    monkeypatch.setattr(client.Client, "share_input", _inconsistent_share_input(1, 2))
    attacked = run_threads(plan, x).output
    assert np.abs(attacked - honest).max() > 100 * TOL


# ---- out-of-range inputs ---------------------------------------------------------------------------
def _offset_share_input(offset: torch.Tensor):
    original = client.Client.share_input

    def share_input(self, x):  # the client skips its range check and adds a huge value
        original(self, torch.as_tensor(x, dtype=torch.int64) + offset)

    return share_input


def _with_domain(plan: Plan, lo: float, hi: float) -> Plan:
    doc = copy.deepcopy(plan.doc)
    doc["inputs"][0]["domain"] = [lo, hi]
    p = copy.copy(plan)
    p.doc = doc
    return p


@pytest.mark.parametrize("bits", [50, 62, 63])
def test_an_out_of_range_input_is_clamped_to_the_public_bound(net_plans, digit_inputs, monkeypatch, bits):
    """A ring value far beyond the input domain (here [0, 16], the digits' pixel range) gives the
    output of the clamped input (pixel = 16), not wrapped or failed-truncation garbage."""
    plan = _with_domain(net_plans[1], 0.0, 16.0)
    x = digit_inputs[:1].astype(np.float64)
    offset = torch.zeros((1, 64), dtype=torch.int64)
    offset[0, 5] = (1 << bits) - 1 if bits == 63 else 1 << bits
    monkeypatch.setattr(client.Client, "share_input", _offset_share_input(offset))
    got = run_threads(plan, x).output
    monkeypatch.undo()
    ring = int((torch.round(torch.tensor(x[0, 5] * 2**16)).to(torch.int64) + offset[0, 5]).item())  # wraps
    clamped = x.copy()
    clamped[0, 5] = min(max(ring, 0), 16 << 16) / 2**16
    assert np.abs(got - run_reference(plan, clamped).output).max() <= TOL
    # without the clamp the same input gives garbage (this is what the clamp prevents)
    monkeypatch.setattr(client.Client, "share_input", _offset_share_input(offset))
    monkeypatch.setattr(siguard.runtime.executor, "client_input", lambda e, v, s, b: e.input("client", v, s))
    raw = run_threads(plan, x).output
    assert np.abs(raw - run_reference(plan, clamped).output).max() > 1e3


def test_the_bound_is_the_plans_domain_else_the_clients_own_limit(net_plans):
    from siguard.runtime.kernels.inputs import client_bounds

    plan = net_plans[1]
    lo_d, hi_d = plan.inputs[0]["domain"]  # the compiler's proven domain (passes.bounds)
    assert client_bounds(plan.inputs[0], plan.frac_bits) == (round(lo_d * 2**16), round(hi_d * 2**16))
    lo, hi = client_bounds({"name": "x"}, plan.frac_bits)  # no domain recorded
    assert hi == -lo == int(MAX_ABS_REAL(plan.frac_bits))  # = 2^(62-2f) real, encoded at f
    assert client_bounds({"domain": [0, 16]}, 16) == (0, 16 << 16)


# ---- fresh weight shares per session ------------------------------------------------------------------
def test_queries_use_fresh_weight_share_components(net_plans, digit_inputs, monkeypatch):
    """Two queries after one weight sharing (one session of run_threads, queries=2) compute on
    different share components of every weight; the zero component stays zero. The last query releases
    the set-up shares as it re-randomises them (a one-shot run holds one weight set, not two): the
    first keeps them all, the last leaves none, and computes on fresh components all the same."""
    seen: dict[int, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {0: [], 1: [], 2: []}
    kept: dict[int, list[tuple[bool, int]]] = {0: [], 1: [], 2: []}
    original = siguard.runtime.executor.Executor.use_weights

    def spy(self, shared, **kw):
        original(self, shared, **kw)
        kept[self.engine.party].append((kw.get("release", False), len(shared)))
        seen[self.engine.party].append({k: (w.a.clone(), w.b.clone(), w.zero) for k, w in self.weights.items()})

    monkeypatch.setattr(siguard.runtime.executor.Executor, "use_weights", spy)
    run_threads(net_plans[1], digit_inputs[:1], queries=2)
    _assert_fresh_components(seen, net_plans[1])
    n = len(net_plans[1].doc["weights"])
    assert all(kept[p] == [(False, n), (True, 0)] for p in range(3)), kept


def _assert_fresh_components(seen, plan, sessions: int = 2) -> None:
    weights = plan.load_weights()
    for party in range(3):
        assert len(seen[party]) == sessions
    for name in seen[0][0]:
        comps = []
        for q in range(sessions):
            slots = [seen[p][q][name] for p in range(3)]
            zero = slots[0][2]
            c = [slots[p][0].expand_as(slots[(p - 1) % 3][1]) for p in range(3)]  # P_p's slot a = x_p
            assert torch.count_nonzero(c[zero]) == 0
            for p in range(3):  # both holders of x_p agree (P_{p-1}'s slot b)
                assert torch.equal(slots[(p - 1) % 3][1].expand_as(c[p]), c[p])
            scale = next(w["scale"] for w in plan.doc["weights"] if w["name"] == name)
            total = (c[0] + c[1] + c[2]).to(torch.float64) / 2**scale
            assert np.abs(total.numpy() - weights[name]).max() <= 2.0**-scale
            comps.append(c)
        for j in range(3):
            if j != seen[0][0][name][2]:
                # fresh uniform words: equal elements happen with probability 2^-64 each
                for q in range(1, sessions):
                    assert not any(torch.equal(comps[r][j], comps[q][j]) for r in range(q)), (name, j, q)


# ---- networked: server processes, an in-process client ------------------------------------------------
@pytest.fixture(scope="module")
def serving(net_plans, net_certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("malicious")
    config = write_loopback_config(work, cert_dir=net_certs)
    trio = Trio(net_plans[1].directory, config, work / "logs", timeout=10)
    with trio:
        trio.wait_ready()
        yield trio, config


def _good_query(serving, plan, x) -> None:
    trio, config = serving
    y = QueryClient(load_config(config), timeout=10).run(x).output
    assert np.abs(y - run_reference(plan, x).output).max() <= TOL
    assert all(p.poll() is None for p in trio.procs.values())


def test_inconsistent_client_shares_abort_a_networked_session(serving, net_plans, digit_inputs, monkeypatch):
    trio, config = serving
    monkeypatch.setattr(client.Client, "share_input", _inconsistent_share_input(1, 2))
    with pytest.raises(RuntimeFault) as info:
        QueryClient(load_config(config), timeout=10).run(digit_inputs[:1])
    msg = str(info.value)
    assert "inconsistent client input" in msg and "component x2" in msg and "\n" not in msg, msg
    monkeypatch.undo()
    _good_query(serving, net_plans[1], digit_inputs[1:2])


def test_out_of_range_networked_input_is_answered_and_the_servers_stay_up(serving, net_plans, digit_inputs,
                                                                           monkeypatch):
    trio, config = serving
    offset = torch.zeros((1, 64), dtype=torch.int64)
    offset[0, 3] = 1 << 62
    monkeypatch.setattr(client.Client, "share_input", _offset_share_input(offset))
    y = QueryClient(load_config(config), timeout=10).run(digit_inputs[:1]).output
    assert y.shape == (1, 10) and np.isfinite(y).all()
    monkeypatch.undo()
    _good_query(serving, net_plans[1], digit_inputs[2:3])


# ---- in-process servers: what a server holds in two sessions -------------------------------------------
def test_two_networked_sessions_use_different_weight_share_components(net_plans, net_certs, digit_inputs, tmp_path,
                                                                       monkeypatch):
    plan = net_plans[1]
    config = load_config(write_loopback_config(tmp_path, cert_dir=net_certs))
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    lock = threading.Lock()
    original = siguard.runtime.executor.Executor.use_weights

    def spy(self, shared, **kw):
        original(self, shared, **kw)
        with lock:
            seen[self.engine.party].append({k: (w.a.clone(), w.b.clone(), w.zero) for k, w in self.weights.items()})

    monkeypatch.setattr(siguard.runtime.executor.Executor, "use_weights", spy)
    servers = [PartyServer(plan, i, config, weights=plan.load_weights() if i == 0 else None, timeout=10,
                           log=lambda line: None) for i in range(3)]
    starters = [threading.Thread(target=s.start, daemon=True) for s in servers]
    for t in starters:
        t.start()
    for t in starters:
        t.join(60)
    try:
        assert all(s.ready for s in servers)
        for k in range(2):  # two sessions on the same running servers
            y = QueryClient(config, timeout=10).run(digit_inputs[k : k + 1]).output
            assert np.abs(y - run_reference(plan, digit_inputs[k : k + 1]).output).max() <= TOL
    finally:
        for s in servers:
            s.stop("test over")
    _assert_fresh_components(seen, plan, sessions=3)  # each server's warm-up rehearsal, then the two queries
