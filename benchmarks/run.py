"""The benchmark runner: SIGuard secure inference (with and without the guard) next to onnxruntime and CrypTen.

    python benchmarks/run.py [--models mlp cnn resnet18 resnet34 resnet18_224] [--batches 1 8] [--guard off|on|both]
        [--modes threads lockstep processes lan wan] [--repeat 3] [--runs 1] [--guard-batch 32]
        [--crypten-python PATH] [--json benchmarks/results/bench.json] [--md benchmarks/results/bench.md]
    python benchmarks/run.py --readme [--json benchmarks/results/bench.json] [--readme-path README.md]

For every model (digits MLP and CNN trained on scikit-learn's digits; ResNet-18 and ResNet-34 in
their CIFAR-10 form, 10 classes, random weights -- a timing does not depend on weight values;
``resnet18_224``: ResNet-18 in its ImageNet form on 224x224, not in the default set),
batch and guard setting, the plan is compiled once and run in each selected mode:

* ``threads``: three server threads and a client thread in one child process. The servers share
  the weights once, then answer ``1 + --repeat`` queries; the time is the median of the warm
  queries (the weights' sharing, a once-per-start cost, is excluded, as CrypTen's model encryption
  is). Peak RSS is the child's (all three parties and the client: threads cannot be told apart).
* ``lockstep``: the same in one OS thread, the parties switched as greenlets at every wait
  (``siguard run --mode lockstep``): a round costs less than half as much; big products of
  different parties no longer overlap on two cores.
* ``processes``: three ``siguard party`` processes and ``siguard query`` clients over mutual TLS on
  loopback; the same median of warm queries; peak RSS per server process (VmHWM).
* ``lan`` / ``wan``: ``benchmarks/netns.py`` (network namespaces, emulated links; needs root;
  ResNet-18 and the MLP only, batch 1, no guard); skipped with a reason otherwise.

Reported per row: seconds, rounds, MB sent per party, peak RSS, onnxruntime's plaintext time (same
ONNX file, same input), the guard's share of the guarded total (guard = guarded - plain), and a
per-op breakdown (seconds, rounds, bytes per op kind). With ``--crypten-python`` (or the
environment variable ``SIGUARD_CRYPTEN_PYTHON``) pointing at a python that can import CrypTen 0.4.1
(see benchmarks/README.md), ``benchmarks/crypten_bench.py`` times CrypTen on the same ONNX file in
the same run, and the ratios SIGuard/CrypTen for time, bytes and rounds are printed. Results go to
JSON and a Markdown table; ``--readme`` writes that table into README.md between the markers
``<!-- perf-table:begin -->`` and ``<!-- perf-table:end -->`` (and fails if they are missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
PAPER_GUARD = {"guard_s": 1.1, "total_s": 4.39, "share": 1.1 / 4.39}
SHAPES = {"mlp": (64,), "cnn": (1, 8, 8), "resnet18": (3, 32, 32), "resnet34": (3, 32, 32),
          "resnet18_224": (3, 224, 224)}
NETNS_MODELS = ("mlp", "resnet18")
CRYPTEN_ENV = "SIGUARD_CRYPTEN_PYTHON"


# ---- models and plans -----------------------------------------------------------------------------
def build_onnx(name: str, work: Path) -> Path:
    """The model's ONNX file (opset 17, dynamic batch), built once per working directory."""
    import torch

    from tests.models import export, resnet_cifar, train_digits_cnn, train_digits_mlp

    path = work / f"{name}.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    if name == "mlp":
        export(train_digits_mlp(), path, torch.zeros(1, 64), opset=17, dynamic_batch=True)
    elif name == "cnn":
        export(train_digits_cnn(), path, torch.zeros(1, 1, 8, 8), opset=17, dynamic_batch=True)
    elif name in ("resnet18", "resnet34"):
        export(resnet_cifar(int(name[6:])), path, torch.zeros(1, 3, 32, 32), opset=17, dynamic_batch=True)
    elif name == "resnet18_224":
        export(resnet18_imagenet(), path, torch.zeros(1, 3, 224, 224), opset=17, dynamic_batch=True)
    else:
        raise SystemExit(f"unknown model {name} (choose from {', '.join(SHAPES)})")
    return path


def random_defender(k: int):
    """A defender h (k -> 128 -> 64 -> 1) with fixed random weights: the guard's cost does not depend on them."""
    import torch

    from siguard.privacy.defender import DefenderWeights

    g = torch.Generator().manual_seed(0)

    def r(*s, sd=0.1):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sd).numpy()

    return DefenderWeights(W1=r(128, k, sd=0.3), b1=r(128), W2=r(64, 128), b2=r(64), w3=r(1, 64, sd=0.2), b3=r(1))


def compile_plan(onnx_path: Path, batch: int, guard: bool, guard_cfg: dict, work: Path) -> Path:
    from siguard.pipeline import CompileOptions, compile_model, write_plan

    out = work / f"{onnx_path.stem}-b{batch}-{'guard' if guard else 'plain'}"
    if not (out / "plan.json").exists():
        opts = CompileOptions(batch=batch, guard=random_defender(10) if guard else None, guard_config=dict(guard_cfg))
        write_plan(compile_model(onnx_path, opts), out)
    return out


def resnet18_imagenet():
    """ResNet-18 in its ImageNet form (224x224 input): 7x7/2 conv stem with BN and ReLU, 3x3/2 max
    pool, four stages of two basic blocks (64-512 channels), global average pool, fc to 1000.
    Random weights (fixed seed), eval mode."""
    import torch
    from torch import nn

    from tests.models import ResNetCifar

    class ResNet18ImageNet(ResNetCifar):
        def __init__(self) -> None:
            super().__init__((2, 2, 2, 2), num_classes=1000)
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(self.pool(self.layers(x)), 1))

    torch.manual_seed(0)
    return ResNet18ImageNet().eval()


def sample_input(name: str, batch: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, (batch, *SHAPES[name])).astype(np.float32)


# ---- measurements ---------------------------------------------------------------------------------
def _median_row(times: list[float]) -> dict[str, Any]:
    return {"seconds": statistics.median(times), "seconds_all": times}


def _pool(acc: dict[str, Any] | None, res: dict[str, Any]) -> dict[str, Any]:
    """Merge one more child run's result into ``acc``: the warm query times are pooled (median over all
    runs, ``runs`` counts them); rounds, bytes and the breakdown are the latest run's (they do not vary)."""
    if acc is None:
        return {**res, "runs": 1} if "error" not in res else res
    if "error" in acc or "error" in res:  # a failed run is reported, never replaced by a later success
        return acc if "error" in acc else res
    times = acc["seconds_all"] + res["seconds_all"]
    return {**res, **_median_row(times), "runs": acc["runs"] + 1}


def worker_threads(plan_dir: str, x_path: str, repeat: int, out: str, scheduler: str = "threads") -> None:
    """Child-process body of the threads and lockstep modes (see the module docstring); writes JSON to ``out``."""
    import torch

    from siguard.compiler.plan import Plan
    from siguard.runtime.local import run_threads
    from siguard.runtime.stats import op_breakdown

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    plan = Plan.load(plan_dir)
    x = np.load(x_path)
    r = run_threads(plan, x, timeout=3600, queries=1 + repeat, scheduler=scheduler)
    times = r.stats["query_seconds_all"][1:] or r.stats["query_seconds_all"]
    tot = r.stats["totals"]
    row = _median_row(times)
    row.update(rounds=tot["rounds"], bytes_per_party=tot["bytes_per_party"], client_bytes=tot["client_bytes"],
               plan_rounds=plan.totals.get("rounds"), breakdown=op_breakdown(plan, r.stats),
               peak_rss_mb={"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    Path(out).write_text(json.dumps(row))


def measure_threads(plan_dir: Path, x: np.ndarray, repeat: int, work: Path,
                    scheduler: str = "threads") -> dict[str, Any]:
    x_path, out = work / "x.npy", work / f"{scheduler}.json"
    np.save(x_path, x)
    cmd = [sys.executable, __file__, "--worker-threads", str(plan_dir), str(x_path), str(repeat), str(out), scheduler]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.read_text())


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure_processes(plan_dir: Path, x: np.ndarray, repeat: int, work: Path) -> dict[str, Any]:
    """Three server processes, ``1 + repeat`` client queries over TLS on loopback."""
    from siguard.compiler.plan import Plan
    from siguard.runtime.net.certs import make_certs
    from siguard.runtime.net.processes import Trio, child_env, siguard_command, write_loopback_config

    plan = Plan.load(plan_dir)
    pdir = work / "processes"
    pdir.mkdir(parents=True, exist_ok=True)
    make_certs(pdir / "certs", write_config=False, force=True)
    config = write_loopback_config(pdir, cert_dir=pdir / "certs")
    x_path, y_path, s_path = pdir / "x.npz", pdir / "y.npz", pdir / "q.json"
    np.savez(x_path, **{plan.inputs[0]["name"]: x})
    times, info = [], {}
    with Trio(plan_dir, config, pdir / "logs", timeout=3600) as trio:
        trio.wait_ready()
        for _ in range(1 + repeat):
            cmd = [*siguard_command(), "query", "--config", str(config), "--input", str(x_path), "--output",
                   str(y_path), "--timeout", "3600", "--stats-json", str(s_path), "--threads", str(trio.threads),
                   "--plan-hash", plan.plan_hash]
            proc = subprocess.run(cmd, env=child_env(trio.threads), capture_output=True, text=True)
            if proc.returncode != 0:
                return {"error": (proc.stderr.strip().splitlines() or ["query failed"])[-1]}
            info = json.loads(s_path.read_text())
            times.append(float(info["seconds"]))
        rss = [_vm_hwm_mb(trio.pid(i)) for i in range(3)]
    tot = (info.get("stats") or {}).get("totals", {})
    row = _median_row(times[1:] or times)
    row.update(rounds=tot.get("rounds"), bytes_per_party=tot.get("bytes_per_party"),
               client_bytes=tot.get("client_bytes"), peak_rss_mb={"P0": rss[0], "P1": rss[1], "P2": rss[2]})
    return row


def measure_netns(model: str, setting: str, repeat: int, work: Path) -> dict[str, Any]:
    if model not in NETNS_MODELS:
        return {"skipped": f"netns.py runs {' and '.join(NETNS_MODELS)} only"}
    if os.geteuid() != 0:
        return {"skipped": "network namespaces need root"}
    out = work / f"netns-{model}-{setting}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "netns.py"), "--model", model, "--settings", setting,
           "--queries", str(max(1, repeat)), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr.strip().splitlines() or ["netns.py failed"])[-1]}
    doc = json.loads(out.read_text())
    row = next((r for r in doc.get("results", []) if r.get("setting") == setting), None)
    if row is None:
        return {"error": "netns.py wrote no result", "raw": doc}
    return {"seconds": row["query_median_without_first_s"], "seconds_all": row["query_seconds"],
            "rounds": row["rounds"], "bytes_per_party": [m * 1e6 for m in row["mb_per_party"]],
            "client_bytes": row["client_mb"] * 1e6, "emulator": doc.get("emulator"),
            "measured_rtt_ms": row["measured_rtt_ms"], "lower_bound_s": row["lower_bound_s"]}


def measure_ort(onnx_path: Path, x: np.ndarray, repeat: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(max(repeat, 10)):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_crypten(python: str, onnx_path: Path, x_shape: tuple[int, ...], repeat: int) -> dict[str, Any]:
    cmd = [python, str(ROOT / "benchmarks" / "crypten_bench.py"), str(onnx_path), "--shape", *map(str, x_shape),
           "--repeat", str(repeat)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(lines[-1])


def guard_batch_cost(batch: int, guard_cfg: dict, scheduler: str = "threads") -> dict[str, Any]:
    """The guard alone on ``batch`` queries' logits (10 classes) between three parties (``scheduler``)."""
    from siguard.core.config import GuardConfig
    from siguard.passes.guard import guard_bounds
    from siguard.runtime.kernels.guard import secure_guard
    from siguard.runtime.mpc.inprocess import run_threads as run_parties
    from siguard.runtime.ring import encode

    d = random_defender(10)
    ws = [d.W1.T, d.b1, d.W2.T, d.b2, d.w3.T, d.b3]
    z = np.random.default_rng(1).normal(0, 3, (batch, 10))
    cfg = GuardConfig.for_schedule(**guard_cfg)
    cfg = GuardConfig.for_schedule(**{**guard_cfg, **guard_bounds(d, cfg)})  # the bounds the guard pass records
    timing: list[float] = []

    def party(e):
        shared = [e.input("model", encode(w, 16) if e.party == 0 else None, w.shape) for w in ws]
        logits = e.input("P1", encode(z, 16) if e.party == 1 else None, z.shape)
        t0 = time.perf_counter()
        with e.transport.step("guard"):
            out = e.reveal(secure_guard(e, logits, *shared, config=cfg), "P0")
        if e.party == 0:
            timing.append(time.perf_counter() - t0)
        return out

    _, _, stats = run_parties(party, None, timeout=3600, scheduler=scheduler)
    g = stats[0]["guard"]
    return {"batch": batch, "scheduler": scheduler, "seconds": timing[0], "seconds_per_query": timing[0] / batch,
            "rounds": g.rounds,
            "mb_per_party": [stats[p]["guard"].payload_bytes / 1e6 for p in range(3)]}


# ---- reports --------------------------------------------------------------------------------------
def _mb(row: dict[str, Any]) -> float | None:
    b = row.get("bytes_per_party")
    return max(b) / 1e6 if b else None


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs), Python {meta['python']}, "
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, siguard {meta['siguard']}"
        + (f", CrypTen {meta['crypten']} (2 parties, trusted first-party dealer)" if meta.get("crypten") else "")
        + f". Times are medians of {meta['repeat']} warm queries after the weights were shared once"
        + (f" (threads/lockstep: of {meta['repeat']} x {meta['runs']} runs, plain and guarded alternated)"
           if meta.get("runs", 1) > 1 else "") + "; "
        "MB = megabytes sent by the busiest server; CrypTen's rounds are its communicator's count.",
        "",
        "| model | batch | guard | mode | SIGuard (s) | rounds | MB/party | peak RSS (MB) | onnxruntime (ms) "
        "| CrypTen (s) | CrypTen rounds | CrypTen MB/party | time / bytes / rounds vs CrypTen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['guard']} | {r['mode']} | "
                         f"{r.get('error') or r.get('skipped')} |  |  |  |  |  |  |  |  |")
            continue
        ct = r.get("crypten") or {}
        rss = r.get("peak_rss_mb") or {}
        rss_s = "/".join(f"{v:.0f}" for v in rss.values() if v is not None) or "—"
        ct_mb = max(ct["bytes_per_party"]) / 1e6 if ct.get("bytes_per_party") else None
        ratio = r.get("vs_crypten")
        ratio_s = (f"{ratio['time']:.2f} / {ratio['bytes']:.2f} / {ratio['rounds']:.2f}" if ratio else "—")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['guard']} | {r['mode']} | {_fmt(r.get('seconds'))} | "
            f"{_fmt(r.get('rounds'), 'd')} | {_fmt(_mb(r), '.2f')} | {rss_s} | {_fmt(r.get('ort_ms'), '.2f')} | "
            f"{_fmt(ct.get('seconds'))} | {_fmt(ct.get('rounds'), 'd')} | {_fmt(ct_mb, '.1f')} | {ratio_s} |"
        )
    shares = [s for s in doc.get("guard_shares", [])]
    if shares:
        lines += ["", "Guard share = (guarded - plain) / guarded, medians of the warm queries of "
                  f"{shares[0].get('runs', 1)} child run(s) per plan, plain and guarded alternated; the guard step's "
                  "own time inside the last guarded query (its share of that query's steps) beside it.", "",
                  "| model | batch | mode | plain (s) | guarded (s) | guard (s) | guard share | guard step (s) "
                  "| paper |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in shares:
            gs = (f"{s['guard_step_s']:.3f} ({100 * s['guard_step_share']:.1f} %)"
                  if s.get("guard_step_s") is not None else "—")
            lines.append(f"| {s['model']} | {s['batch']} | {s['mode']} | {s['plain_s']:.3f} | {s['guarded_s']:.3f} | "
                         f"{s['guard_s']:.3f} | {100 * s['share']:.1f} % | {gs} | 1.1 s of 4.39 s = 25 % |")
    gb = doc.get("guard_batch")
    if gb and "error" not in gb:
        lines += ["", f"Guard alone at batch {gb['batch']} ({gb.get('scheduler', 'threads')}): {gb['seconds']:.2f} s, "
                      f"{gb['seconds_per_query'] * 1e3:.1f} ms per query, {gb['rounds']} rounds."]
    return "\n".join(lines) + "\n"


def breakdown_markdown(doc: dict[str, Any], top: int = 8) -> str:
    out = []
    for r in doc["rows"]:
        rows = r.get("breakdown")
        if not rows:
            continue
        out += ["", f"Per-op breakdown: {r['model']} batch {r['batch']} guard {r['guard']} ({r['mode']})", "",
                "| op | impl | steps | seconds | share | rounds | MB/party |", "|---|---|---|---|---|---|---|"]
        for a in rows[:top]:
            out.append(f"| {a['op']} | {a['impl']} | {a['steps']} | {a['seconds']:.3f} | {100 * a['share']:.1f} % | "
                       f"{a['rounds']} | {a['bytes'] / 1e6:.2f} |")
    return "\n".join(out) + "\n"


def update_readme(doc: dict[str, Any], readme: Path) -> None:
    """Replace the text between the perf-table markers of ``readme`` with :func:`markdown` of ``doc``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: the markers {BEGIN} and {END} are missing (or out of order); "
                         "add them where the performance table belongs")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = "<!-- generated by `python benchmarks/run.py --readme` from benchmarks/results/bench.json -->\n"
    readme.write_text(head + BEGIN + "\n" + note + markdown(doc) + END + tail)


def _meta(repeat: int, crypten: dict | None, runs: int = 1) -> dict[str, Any]:
    import onnxruntime
    import torch

    try:
        from importlib.metadata import version

        sg = version("siguard")
    except Exception:
        sg = "source"
    from benchmarks.ring_matmul import cpu_model
    from siguard.runtime.linalg import cpu_profile

    ring = cpu_profile()
    return {"machine": f"{platform.system()} {platform.machine()}, {cpu_model()}, torch CPU capability "
                       f"{ring['capability']}, ring products on {ring['backend']}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "ring_gemm": ring,
            "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "siguard": sg,
            "date": time.strftime("%Y-%m-%d"), "repeat": repeat, "runs": runs,
            "crypten": (crypten or {}).get("crypten")}


# ---- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The runner's options (README.md and benchmarks/README.md quote command lines of it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18", "resnet34"], choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--guard", choices=("off", "on", "both"), default="both",
                    help="plans without the guard, with it, or both (default; gives the guard's share)")
    ap.add_argument("--guard-models", nargs="+", default=["resnet34"],
                    help="models that get a guarded plan too (default resnet34)")
    ap.add_argument("--guard-rounds", type=int, default=None)
    ap.add_argument("--guard-steps", type=int, default=None)
    ap.add_argument("--guard-batch", type=int, default=32, help="batch of the guard-alone cost (0 = skip)")
    ap.add_argument("--modes", nargs="+", default=["threads"],
                    choices=("threads", "lockstep", "processes", "lan", "wan"))
    ap.add_argument("--repeat", type=int, default=3, help="warm queries per configuration (median)")
    ap.add_argument("--runs", type=int, default=1,
                    help="threads/lockstep: child runs per configuration, plain and guarded alternated; the "
                         "median is over all runs' warm queries (a child's memory layout and the machine's "
                         "drift move a whole run: alternating runs hit the plain and the guarded plan alike)")
    ap.add_argument("--crypten-python", default=os.environ.get(CRYPTEN_ENV),
                    help=f"python of a CrypTen 0.4.1 environment (default ${CRYPTEN_ENV}; none = no CrypTen column)")
    ap.add_argument("--crypten-models", nargs="+", default=None,
                    help="models to time with CrypTen (default: all selected; CrypTen takes ~10 s per ResNet query)")
    ap.add_argument("--work", default=None, help="keep ONNX files and plans here (default: a temporary directory)")
    ap.add_argument("--json", default=str(RESULTS / "bench.json"))
    ap.add_argument("--md", default=str(RESULTS / "bench.md"))
    ap.add_argument("--readme", action="store_true", help="only write --json's table into README.md and exit")
    ap.add_argument("--readme-path", default=str(ROOT / "README.md"))
    ap.add_argument("--worker-threads", nargs=5, metavar=("PLAN", "X", "REPEAT", "OUT", "SCHEDULER"),
                    help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("error: --runs must be at least 1")

    if args.worker_threads:
        plan, x, repeat, out, scheduler = args.worker_threads
        worker_threads(plan, x, int(repeat), out, scheduler)
        return 0
    if args.readme:
        update_readme(json.loads(Path(args.json).read_text()), Path(args.readme_path))
        print(f"wrote the performance table into {args.readme_path}")
        return 0

    guard_cfg = {k: v for k, v in (("rounds", args.guard_rounds), ("steps", args.guard_steps)) if v is not None}
    rows: list[dict[str, Any]] = []
    crypten_meta = None
    with tempfile.TemporaryDirectory(prefix="siguard-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            onnx_path = build_onnx(model, work)
            for batch in args.batches:
                x = sample_input(model, batch)
                ort_ms = measure_ort(onnx_path, x, args.repeat) * 1e3
                ct = None
                if args.crypten_python and (args.crypten_models is None or model in args.crypten_models):
                    ct = measure_crypten(args.crypten_python, onnx_path, x.shape, args.repeat)
                    crypten_meta = crypten_meta or (ct if "error" not in ct else None)
                    print(f"{model} b{batch} CrypTen: " + (ct.get("error") or
                          f"{ct['seconds']:.3f} s, {ct['rounds']} rounds, {max(ct['bytes_per_party']) / 1e6:.1f} MB"),
                          flush=True)
                guards = {"off": [False], "on": [True], "both": [False, True]}[args.guard]
                if model not in args.guard_models:
                    guards = [g for g in guards if not g] or []
                plans = {guard: compile_plan(onnx_path, batch, guard, guard_cfg, work) for guard in guards}
                local = {}  # (guard, mode) -> pooled result of the alternated local runs
                for mode in (m for m in args.modes if m in ("threads", "lockstep")):
                    for _ in range(args.runs):  # plain, guarded, plain, guarded, ...: drift hits both alike
                        for guard in guards:
                            res = measure_threads(plans[guard], x, args.repeat, work, mode)
                            local[guard, mode] = _pool(local.get((guard, mode)), res)
                for guard in guards:
                    plan_dir = plans[guard]
                    for mode in args.modes:
                        base = {"model": model, "batch": batch, "guard": "on" if guard else "off", "mode": mode}
                        if mode in ("threads", "lockstep"):
                            res = local[guard, mode]
                        elif mode == "processes":
                            res = measure_processes(plan_dir, x, args.repeat, work)
                        elif guard or batch != 1:
                            res = {"skipped": "netns.py runs batch 1 without the guard"}
                        else:
                            res = measure_netns(model, mode, args.repeat, work)
                        row = {**base, **res, "ort_ms": ort_ms}
                        if ct and "error" not in ct and not guard and "seconds" in res and res.get("bytes_per_party"):
                            row["crypten"] = ct
                            row["vs_crypten"] = {"time": res["seconds"] / ct["seconds"],
                                                 "bytes": max(res["bytes_per_party"]) / max(ct["bytes_per_party"]),
                                                 "rounds": res["rounds"] / ct["rounds"]}
                        rows.append(row)
                        _print_row(row)
    shares = []
    for r in rows:
        if r["guard"] != "on" or "seconds" not in r:
            continue
        plain = next((p for p in rows if p["guard"] == "off" and "seconds" in p and
                      (p["model"], p["batch"], p["mode"]) == (r["model"], r["batch"], r["mode"])), None)
        if plain:
            g = r["seconds"] - plain["seconds"]
            # the guard step's own time inside the (last) guarded query, and its share of that query's steps
            step = next((a for a in r.get("breakdown") or [] if a["op"] == "guard"), None)
            shares.append({"model": r["model"], "batch": r["batch"], "mode": r["mode"], "plain_s": plain["seconds"],
                           "guarded_s": r["seconds"], "guard_s": g, "share": g / r["seconds"],
                           "plain_rounds": plain["rounds"], "guarded_rounds": r["rounds"],
                           "runs": r.get("runs", 1), "queries": len(r.get("seconds_all", [])),
                           "guard_step_s": step["seconds"] if step else None,
                           "guard_step_share": step["share"] if step else None})
            print(f"guard share {r['model']} b{r['batch']} {r['mode']}: {g:.3f} s of {r['seconds']:.3f} s = "
                  f"{100 * g / r['seconds']:.1f} % (paper 25 %)"
                  + (f"; the guard step inside the guarded query: {step['seconds']:.3f} s, "
                     f"{100 * step['share']:.1f} % of its steps" if step else ""), flush=True)
    doc = {"meta": _meta(args.repeat, crypten_meta, args.runs), "rows": rows, "guard_shares": shares,
           "paper": PAPER_GUARD}
    if args.guard_batch and args.guard != "off":
        try:
            local = next((m for m in ("lockstep", "threads") if m in args.modes), "threads")
            doc["guard_batch"] = guard_batch_cost(args.guard_batch, guard_cfg, local)
            gb = doc["guard_batch"]
            print(f"guard alone at batch {gb['batch']} ({gb['scheduler']}): {gb['seconds']:.2f} s, "
                  f"{gb['seconds_per_query'] * 1e3:.1f} ms "
                  f"per query, {gb['rounds']} rounds", flush=True)
        except Exception as exc:  # a benchmark reports, it does not stop
            doc["guard_batch"] = {"error": f"{type(exc).__name__}: {exc}"}
    md = markdown(doc) + breakdown_markdown(doc)
    for path, text in ((args.json, json.dumps(doc, indent=1)), (args.md, md)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print()
    print(md)
    print(f"wrote {args.json} and {args.md}")
    return 0


def _print_row(r: dict[str, Any]) -> None:
    head = f"{r['model']:9s} b{r['batch']:<2d} guard {r['guard']:3s} {r['mode']:9s}"
    if "seconds" not in r:
        print(f"{head} {r.get('error') or r.get('skipped')}", flush=True)
        return
    line = f"{head} {r['seconds']:8.3f} s {r.get('rounds') or 0:7d} rounds {_fmt(_mb(r), '9.2f')} MB/party"
    line += f"  ort {r['ort_ms']:8.2f} ms"
    if r.get("vs_crypten"):
        v = r["vs_crypten"]
        line += f"  vs CrypTen: time {v['time']:.2f} bytes {v['bytes']:.2f} rounds {v['rounds']:.2f}"
    print(line, flush=True)
    for a in (r.get("breakdown") or [])[:4]:
        print(f"    {a['op']:12s} {a['impl']:10s} {a['seconds']:8.3f} s {100 * a['share']:5.1f} %  {a['rounds']:6d} "
              f"rounds {a['bytes'] / 1e6:9.2f} MB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
