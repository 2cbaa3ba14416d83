"""Load: one running trio answers 50 sequential queries and 4 concurrent clients, memory stays flat.

Prints (run with ``-s``) and writes ``load.json`` next to the trio's logs: per-query latency, the
servers' resident memory after 10 and after 50 queries, and their peak resident memory (VmHWM).
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import numpy as np
import pytest

from siguard.runtime.local import run_reference
from siguard.runtime.net.client import QueryClient
from siguard.runtime.net.config import load_config

TOL = 2e-3


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
def test_trio_answers_50_sequential_queries_and_4_concurrent_clients_with_flat_memory(
    start_trio, net_plans, digit_inputs
):
    plan = net_plans[1]
    trio = start_trio(plan.directory, name="load", timeout=30, threads=1)
    trio.wait_ready()
    cfg = load_config(trio.config)
    xs = digit_inputs[:70]
    refs = [run_reference(plan, xs[k : k + 1]).output for k in range(len(xs))]
    labels = [r.argmax(1)[0] for r in refs]
    pids = [trio.pid(i) for i in range(3)]

    client = QueryClient(cfg, timeout=30)
    latencies, sessions = [], set()
    rss_10: list[int] = []
    for k in range(50):
        t0 = time.perf_counter()
        res = client.run(xs[k : k + 1])
        latencies.append(time.perf_counter() - t0)
        sessions.add(res.session)
        assert np.abs(res.output - refs[k]).max() <= TOL, k
        assert res.output.argmax(1)[0] == labels[k]
        if k == 9:
            rss_10 = [_status_kb(p, "VmRSS") for p in pids]
    rss_50 = [_status_kb(p, "VmRSS") for p in pids]
    assert len(sessions) == 50

    # 4 clients at once, 5 queries each, on different inputs
    errors: list[BaseException] = []
    got: dict[int, list] = {}

    def worker(w: int) -> None:
        c = QueryClient(cfg, timeout=30)
        out = []
        try:
            for j in range(5):
                k = 50 + 5 * w + j
                out.append((k, c.run(xs[k : k + 1])))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        got[w] = out

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_seconds = time.perf_counter() - t0
    assert not errors, errors
    for w in range(4):
        assert len(got[w]) == 5
        for k, res in got[w]:
            assert np.abs(res.output - refs[k]).max() <= TOL, k
            sessions.add(res.session)
    assert len(sessions) == 70  # every query had its own session id
    assert all(trio.procs[i].poll() is None for i in range(3))
    rss_end = [_status_kb(p, "VmRSS") for p in pids]
    peak = [_status_kb(p, "VmHWM") for p in pids]

    report = {
        "queries_sequential": 50,
        "latency_median_s": statistics.median(latencies),
        "latency_p90_s": sorted(latencies)[44],
        "concurrent_clients": 4,
        "concurrent_queries": 20,
        "concurrent_seconds": concurrent_seconds,
        "rss_after_10_MB": [r / 1024 for r in rss_10],
        "rss_after_50_MB": [r / 1024 for r in rss_50],
        "rss_after_concurrent_MB": [r / 1024 for r in rss_end],
        "peak_rss_MB": [p / 1024 for p in peak],
    }
    (trio.log_dir / "load.json").write_text(json.dumps(report, indent=1))
    print("\nload test:", json.dumps(report))
    # flat memory: 40 more queries add (almost) nothing to any server's resident set
    for before, after in zip(rss_10, rss_50, strict=True):
        assert after - before < 20 * 1024, (rss_10, rss_50)
    for before, after in zip(rss_50, rss_end, strict=True):
        assert after - before < 40 * 1024, (rss_50, rss_end)
