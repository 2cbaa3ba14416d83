"""Where a one-shot ``siguard run`` spends its time, next to a warm query of the same run.

    python benchmarks/oneshot.py [--model resnet34] [--batch 1] [--repeat 3] [--work DIR]
        [--json benchmarks/results/oneshot.json] [--skip-net]

ResNet-34 in its CIFAR form (tests/models.py, random weights: a timing does not depend on their
values) is exported and compiled once (cached in ``--work``). Then, each in a FRESH interpreter (what
a user's one-shot command pays):

* ``one-shot``: the phases of ``siguard run PLAN --input x.npy`` (threads), timed inside the child:
  interpreter start to ``main`` (measured as the child's wall clock at its first line against the
  parent's spawn time), imports (siguard.cli + the runtime), plan load and validation (schema, hash),
  weights load and check, the servers' key set-up and weight sharing, the first query, and the
  whole command's wall time as the parent sees it;
* ``warm``: ``siguard bench``'s number in the same run: the median of the warm queries after one
  warm-up, same plan and input, one key set-up and weight sharing for all of them;
* ``processes``: ``siguard run --mode processes`` as a whole (server start, TLS, set-up, query);
* ``first networked query``: a serving trio started (``servers ready``: until all three logged ready,
  their warm-up included), then the first ``siguard query`` and a second one, each a fresh client
  process; a fresh trio per repeat (``--skip-net`` leaves these out).

Each row is the median of ``--repeat`` fresh runs; the process CPU time (user + sys, all threads) is
shown next to the wall time because this machine is shared (the load average is recorded too): for
the set-up and the queries it is the CPU time of the party threads (time.thread_time around the
executor's weight sharing and each query), summed over the parties. The target (issue 14): one-shot
<= 2 x the warm query. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the child: one-shot phases, timed in a fresh interpreter (argv: plan, x.npy, spawn time)
_PATCH = r"""
import threading, time
import siguard.runtime.executor as _ex
_cpu = {"share": 0.0, "runs": {}}  # thread CPU seconds of every party's weight sharing, and of its n-th query
_lock = threading.Lock()
_share, _run = _ex.Executor.share_weights, _ex.Executor.run
def share_weights(self, w):
    c = time.thread_time()
    try:
        return _share(self, w)
    finally:
        with _lock:
            _cpu["share"] += time.thread_time() - c
def run(self, inputs=None):
    c = time.thread_time()
    try:
        return _run(self, inputs)
    finally:
        n = self.__dict__.setdefault("_bench_runs", 0)
        self._bench_runs = n + 1
        with _lock:
            _cpu["runs"][n] = _cpu["runs"].get(n, 0.0) + time.thread_time() - c
_ex.Executor.share_weights, _ex.Executor.run = share_weights, run
"""

# the child: one-shot phases, timed in a fresh interpreter (argv: plan, x.npy, spawn time)
_CHILD = r"""
import json, os, sys, time
t_main = time.time()
spawn = float(sys.argv[3])
c0 = time.process_time()
phases = {"interpreter start": t_main - spawn}
cpu = {}
def mark(name, t, c):
    phases[name] = time.perf_counter() - t
    cpu[name] = time.process_time() - c
t, c = time.perf_counter(), time.process_time()
import siguard.cli  # what `siguard run` imports before it parses (then: the plan, the input, the runtime)
getattr(siguard.cli, "small_pages", lambda: None)()  # as siguard.cli.main does (absent from trees before it)
from siguard.compiler.plan import Plan
try:
    from siguard.compiler.arrays import load_npy
except ImportError:  # a tree from before the one-shot work (to measure "before" with this script)
    from siguard.pipeline import load_npy
from siguard.runtime.local import run_threads
mark("imports", t, c)
""" + _PATCH + r"""
t, c = time.perf_counter(), time.process_time()
plan = Plan.load(sys.argv[1])
x = load_npy(sys.argv[2])
mark("plan load + validation", t, c)
t, c = time.perf_counter(), time.process_time()
w = plan.load_weights()
mark("weights load + check", t, c)
t, c = time.perf_counter(), time.process_time()
r = run_threads(plan, x, w)
total = time.perf_counter() - t
phases["key set-up + weight sharing"] = total - r.stats["query_seconds"]
phases["query (first, cold)"] = r.stats["query_seconds"]
cpu["key set-up + weight sharing"] = _cpu["share"]  # the servers' threads (key set-up: negligible)
cpu["query (first, cold)"] = _cpu["runs"][0]
json.dump({"phases": phases, "cpu": cpu, "cpu_all": time.process_time() - c0}, sys.stdout)
"""

_WARM = r"""
import json, sys, statistics
import siguard.cli
getattr(siguard.cli, "small_pages", lambda: None)()  # as `siguard bench` (siguard.cli.main) does
from siguard.compiler.plan import Plan
try:
    from siguard.compiler.arrays import load_npy
except ImportError:
    from siguard.pipeline import load_npy
from siguard.runtime.local import run_threads
""" + _PATCH + r"""
plan = Plan.load(sys.argv[1])
r = run_threads(plan, load_npy(sys.argv[2]), queries=1 + int(sys.argv[3]))
warm = r.stats["query_seconds_all"][1:]
cpu = [_cpu["runs"][i] for i in sorted(_cpu["runs"])][1:]
json.dump({"warm": warm, "median": statistics.median(warm), "first": r.stats["query_seconds_all"][0],
           "cpu": cpu, "cpu_median": statistics.median(cpu)}, sys.stdout)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _py(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t


def prepare(work: Path, model: str, batch: int) -> tuple[Path, Path]:
    """Export and compile once (cached); the input is uniform [0, 1) of the plan's input shape."""
    import numpy as np

    plan_dir, x_path = work / f"{model}-b{batch}", work / f"{model}-b{batch}-x.npy"
    if not (plan_dir / "plan.json").exists():
        import torch

        from siguard.pipeline import CompileOptions, compile_model, write_plan
        from tests.models import export, resnet_cifar

        onnx_path = export(resnet_cifar(int(model.removeprefix("resnet"))), work / f"{model}.onnx",
                           torch.zeros(1, 3, 32, 32))
        write_plan(compile_model(onnx_path, CompileOptions(batch=batch)), plan_dir)
    if not x_path.exists():
        np.save(x_path, np.random.default_rng(0).uniform(0, 1, (batch, 3, 32, 32)).astype(np.float32))
    return plan_dir, x_path


def first_networked_queries(plan_dir: Path, x_path: Path, work: Path) -> dict[str, float]:
    from siguard.runtime.net.processes import Trio, siguard_command, write_loopback_config

    net = Path(tempfile.mkdtemp(prefix="net-", dir=work))  # fresh certificates and ports every run
    config = write_loopback_config(net)
    out = {}
    with Trio(plan_dir, config, net / "logs", timeout=60) as trio:
        t = time.perf_counter()
        trio.wait_ready()
        out["servers ready"] = time.perf_counter() - t
        for name in ("first networked query", "second networked query"):
            out[name] = _wall([*siguard_command(), "query", "--config", str(config), "--input", str(x_path),
                               "--output", str(net / "y.npy"), "--timeout", "60"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet34", choices=("resnet18", "resnet34"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="fresh one-shot runs (median) and warm queries")
    ap.add_argument("--work", default=None, help="cache directory for the model and plan (default: a temp dir)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "oneshot.json"))
    ap.add_argument("--skip-net", action="store_true", help="leave out processes mode and the networked queries")
    ap.add_argument("--label", default="", help="a label stored with the result (e.g. before/after)")
    args = ap.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="siguard-oneshot-"))
    work.mkdir(parents=True, exist_ok=True)
    plan_dir, x_path = prepare(work, args.model, args.batch)
    load = [os.getloadavg()[0]]

    shots = [_py(_CHILD, str(plan_dir), str(x_path), repr(time.time())) for _ in range(args.repeat)]
    whole = [_wall([sys.executable, "-m", "siguard.cli", "run", str(plan_dir), "--input", str(x_path)])
             for _ in range(args.repeat)]
    load.append(os.getloadavg()[0])
    warm = _py(_WARM, str(plan_dir), str(x_path), str(args.repeat))
    rows = {name: statistics.median(s["phases"][name] for s in shots) for name in shots[0]["phases"]}
    cpu = {name: statistics.median(s["cpu"][name] for s in shots) for name in shots[0]["cpu"]}
    cpu["warm query (`siguard bench`, median)"] = warm["cpu_median"]
    rows["one-shot `siguard run` (whole command)"] = statistics.median(whole)
    rows["warm query (`siguard bench`, median)"] = warm["median"]
    extra = {}
    if not args.skip_net:
        extra["processes mode (whole command)"] = statistics.median(
            _wall([sys.executable, "-m", "siguard.cli", "run", str(plan_dir), "--input", str(x_path),
                   "--mode", "processes"]) for _ in range(max(1, args.repeat // 2)))
        nets = [first_networked_queries(plan_dir, x_path, work) for _ in range(args.repeat)]
        extra.update({name: statistics.median(n[name] for n in nets) for name in nets[0]})
        rows.update(extra)
    load.append(os.getloadavg()[0])
    ratio = rows["one-shot `siguard run` (whole command)"] / warm["median"]

    print(f"{args.model} batch {args.batch}, median of {args.repeat}; load average {min(load):.1f}-{max(load):.1f} "
          f"on {os.cpu_count()} cores {args.label}")
    print(f"{'phase':44s} {'wall s':>8s} {'CPU s':>8s}")
    for name, v in rows.items():
        c = cpu.get(name)
        print(f"{name:44s} {v:8.3f} {'' if c is None else f'{c:8.3f}':>8s}")
    print(f"one-shot / warm query: {ratio:.2f} (target <= 2)")
    if not args.skip_net:
        print(f"first networked query / warm query: {rows['first networked query'] / warm['median']:.2f} (target <= 2)")

    doc = {"model": args.model, "batch": args.batch, "repeat": args.repeat, "label": args.label,
           "load_average": load, "cores": os.cpu_count(), "phases_seconds": rows, "phases_cpu_seconds": cpu,
           "one_shot_runs": shots, "whole_command_seconds": whole, "warm": warm, "ratio": ratio,
           "networked_runs": nets if not args.skip_net else [],
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text()) if out.exists() else {}
    runs = prev.get("runs", []) if isinstance(prev, dict) else []
    runs.append(doc)
    out.write_text(json.dumps({"runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
