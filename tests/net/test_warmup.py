"""A server's warm-up (runtime/net/warmup.py): a session rehearsed alone at start-up, so that the first query
runs warm; and the allocator setting that keeps the rehearsal's memory for it (siguard.cli_net)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import siguard.runtime.executor
from siguard.cli_net import keep_freed_memory
from siguard.runtime.executor import Executor
from siguard.runtime.mpc import prg
from siguard.runtime.mpc.prg import setup_keys
from siguard.runtime.mpc.rss import RSSEngine
from siguard.runtime.mpc.transport import InProcessNetwork
from siguard.runtime.net.processes import child_env
from siguard.runtime.net.warmup import WARMUP_SESSION, rehearse_session


def set_up_servers(plan):
    """Each server's long-term keys and set-up weight shares, as a trio's set-up makes them (in process)."""
    net = InProcessNetwork(4, timeout=30)
    out: list = [None] * 3

    def server(i: int) -> None:
        keys = setup_keys(net.transport(i))
        ex = Executor(plan, RSSEngine(i, net.transport(i), keys.session("setup"), plan.frac_bits))
        ex.share_weights(plan.load_weights() if i == 0 else None)
        out[i] = (keys, ex.weights)

    threads = [threading.Thread(target=server, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(out), "set-up failed"
    return out


def check_rehearsal(plan, monkeypatch) -> None:
    """Every server rehearses every step of ``plan`` alone: nothing sent (no link), the set-up shares left as
    they are, randomness drawn only from the warm-up session's streams, and in a thread that has ended."""
    servers = set_up_servers(plan)
    sessions, ran, threads = [], [], []
    original_session, original_run = prg.PartyKeys.session, Executor.run

    def session(self, sid):
        sessions.append(sid)
        return original_session(self, sid)

    def run(self, inputs=None, **kw):
        out = original_run(self, inputs, **kw)
        ran.append((list(self.step_seconds), out))
        threads.append(threading.current_thread())
        return out

    monkeypatch.setattr(prg.PartyKeys, "session", session)
    monkeypatch.setattr(siguard.runtime.executor.Executor, "run", run)
    for i, (keys, weights) in enumerate(servers):
        before = {k: (w.a.clone(), w.b.clone(), w.zero) for k, w in weights.items()}
        seconds = rehearse_session(plan, i, keys, weights)
        assert seconds > 0
        assert {k: (w.a, w.b, w.zero) for k, w in weights.items()}.keys() == before.keys()
        for k, w in weights.items():
            a, b, z = before[k]
            assert torch.equal(w.a, a) and torch.equal(w.b, b) and w.zero == z, k
    assert sessions == [WARMUP_SESSION] * 3
    names = [s.name for s in plan.steps]
    for steps, outputs in ran:
        assert steps == names  # every step, in order
        assert all(v is None for v in outputs.values())  # a server learns no output: the reveal sends only
    assert threads and all(t is not threading.main_thread() and not t.is_alive() for t in threads)


def test_every_server_rehearses_a_whole_session_alone(net_plans, monkeypatch):
    check_rehearsal(net_plans[8], monkeypatch)


def test_the_trio_reports_its_warm_up_and_answers(start_trio, net_plans, digit_inputs, tmp_path):
    from siguard.runtime.local import run_threads
    from siguard.runtime.net.client import QueryClient
    from siguard.runtime.net.config import load_config

    plan = net_plans[1]
    for args, warm in (([], True), (["--no-warmup"], False)):
        trio = start_trio(plan.directory, name="warm" if warm else "cold", timeout=20, args=args)
        trio.wait_ready()
        ready = [line for i in range(3) for line in trio.log(i).splitlines() if ": ready:" in line]
        assert len(ready) == 3, ready
        assert all(bool(re.search(r"warm-up \d+\.\d+ s", line)) is warm for line in ready), ready
        assert not any("warm-up failed" in line for line in ready), ready
        y = QueryClient(load_config(trio.config), timeout=20).run(digit_inputs[:1]).output
        assert np.abs(y - run_threads(plan, digit_inputs[:1]).output).max() <= 2e-3
        trio.stop(grace=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_sets_glibcs_thresholds_unless_the_environment_does():
    assert keep_freed_memory() is True
    code = "from siguard.cli_net import keep_freed_memory as k; print(k())"
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        env = {**child_env(), var: "131072"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "False", out.stderr
