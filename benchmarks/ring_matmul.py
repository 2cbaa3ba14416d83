"""Micro-benchmark of the exact ring (Z_2^64) matmul and convolution of runtime/linalg.py.

    python benchmarks/ring_matmul.py [--repeat 7] [--threads 2] [--json benchmarks/results/ring_matmul.json]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/ring_matmul.py --json benchmarks/results/ring_matmul_avx2.json

Matmuls M x K x N at the im2col shapes of the issue (64x576x1024, 256x2304x64, 512x4608x16: the
per-image (Cout, K) @ (K, Ho·Wo) products of ResNet layers): float32, float64 and int64 torch.matmul,
and the limb kernel (float64 BLAS on 22/21/21-bit digits) with the weight (Cout x K) prepared once as the
engine prepares it, in the engine's orientation (Ho·Wo, K) @ (K, Cout); then what
:func:`siguard.runtime.linalg.ring_matmul` picks on this machine ("auto"). Convolutions: ResNet's 3x3
convolutions of 64-512 channels at their CIFAR plane sizes (batch 1, padding 1), float32/float64
conv2d, torch's int64 conv2d, :func:`siguard.runtime.linalg.ring_conv2d` with the kernel prepared once
(auto, and each kernel forced), and the secure engine's merge question: the two products a party
computes for a secret x secret product (X_i (Y_i + Y_{i+1}) + X_{i+1} Y_i) as two matmuls or as one
with the inner dimension doubled. Times are the minimum and the median of ``--repeat`` runs after a
warm-up (the machine may be shared: the load average is recorded). The JSON records the CPU model,
torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``, set with ATEN_CPU_CAPABILITY),
the per-CPU probe of runtime/linalg.py and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import linalg  # noqa: E402

MATMULS = [(64, 576, 1024), (256, 2304, 64), (512, 4608, 16)]
# (Cin, Cout, H=W, stride) of ResNet-18/34's 3x3 convolutions on 32x32 inputs (CIFAR form)
CONVS = [(64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (128, 256, 16, 2), (256, 256, 8, 1),
         (256, 512, 8, 2), (512, 512, 4, 1)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timeit(fn, repeat: int) -> dict:
    """Wall time (min, median) and process CPU time (min) of ``repeat`` runs after a warm-up. On a
    machine shared with other jobs, long runs are preempted more often than short ones, so the wall
    minimum favours short kernels; the CPU time (all of this process's threads) is not preempted."""
    fn()
    ts, cs = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return {"min_ms": round(min(ts) * 1e3, 3), "median_ms": round(statistics.median(ts) * 1e3, 3),
            "cpu_min_ms": round(min(cs) * 1e3, 3)}


def forced(kind: str):
    """Run under SIGUARD_RING_GEMM=kind (int64, limbs or auto)."""
    def wrap(fn):
        def run():
            old = os.environ.get(linalg.ENV)
            os.environ[linalg.ENV] = kind
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop(linalg.ENV, None)
                else:
                    os.environ[linalg.ENV] = old
        return run
    return wrap


def rand(*shape: int) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64)


def bench_matmul(m: int, k: int, n: int, repeat: int) -> dict:
    w, x = rand(m, k), rand(k, n)  # the orientation: weight (Cout x K) @ columns (K x Ho·Wo)
    xt = x.t().contiguous()  # the engine's orientation: (Ho·Wo x K) @ (K x Cout), weight prepared
    prepared = linalg.prepare(w.t())
    ref = w @ x
    for kind in ("int64", "limbs"):
        got = forced(kind)(lambda: linalg.ring_matmul(xt, prepared))().t()
        if not torch.equal(got, ref):
            raise SystemExit(f"{kind} matmul {m}x{k}x{n} is not exact")
    wf, xf, wd, xd = w.float(), x.float(), w.double(), x.double()
    row = {
        "shape": f"{m}x{k}x{n}",
        "float32": timeit(lambda: wf @ xf, repeat),
        "float64": timeit(lambda: wd @ xd, repeat),
        "int64": timeit(lambda: w @ x, repeat),
        "limbs_weight_prepared": timeit(forced("limbs")(lambda: linalg.ring_matmul(xt, prepared)), repeat),
        "limbs_nothing_prepared": timeit(forced("limbs")(lambda: linalg.ring_matmul(xt, w.t())), repeat),
        "auto": timeit(forced("auto")(lambda: linalg.ring_matmul(xt, prepared)), repeat),
    }
    return row


def bench_conv(cin: int, cout: int, h: int, stride: int, repeat: int) -> dict:
    x, w = rand(1, cin, h, h), rand(cout, cin, 3, 3)
    st, pad = (stride, stride), (1, 1)
    prepared = linalg.prepare_conv(w)
    ref = F.conv2d(x, w, None, st, pad)
    for kind in ("int64", "limbs"):
        got = forced(kind)(lambda: linalg.ring_conv2d(x, prepared, st, pad, (1, 1), 1, (3, 3)))()
        if not torch.equal(got, ref):
            raise SystemExit(f"{kind} conv {cin}->{cout} is not exact")
    xf, wf, xd, wd = x.float(), w.float(), x.double(), w.double()

    def ring(kind: str, operand):
        return forced(kind)(lambda: linalg.ring_conv2d(x, operand, st, pad, (1, 1), 1, (3, 3)))

    return {
        "conv": f"{cin}->{cout} {h}x{h} s{stride}",
        "float32": timeit(lambda: F.conv2d(xf, wf, None, st, pad), repeat),
        "float64": timeit(lambda: F.conv2d(xd, wd, None, st, pad), repeat),
        "int64_torch_conv": timeit(lambda: F.conv2d(x, w, None, st, pad), repeat),
        "int64_im2col_prepared": timeit(ring("int64", prepared), repeat),
        "limbs_prepared": timeit(ring("limbs", prepared), repeat),
        "auto": timeit(lambda: linalg.ring_conv2d(x, prepared, st, pad, (1, 1), 1, (3, 3))
                       if linalg.conv_prepared(x.shape, w.shape, st, pad, (1, 1), 1)
                       else linalg.ring_conv2d(x, w, st, pad), repeat),
    }


def bench_merge(m: int, k: int, n: int, repeat: int) -> dict:
    """A party's two products of a secret x secret matmul, separately or merged into one GEMM."""
    xa, xb, ya, yb = rand(m, k), rand(m, k), rand(k, n), rand(k, n)

    def two():
        z = linalg.ring_matmul(xa, ya + yb)
        z += linalg.ring_matmul(xb, ya)
        return z

    def one():
        return linalg.ring_matmul(torch.cat([xa, xb], 1), torch.cat([ya + yb, ya], 0))

    row = {"shape": f"{m}x{k}x{n}"}
    for kind in ("int64", "limbs"):
        if not torch.equal(forced(kind)(two)(), forced(kind)(one)()):
            raise SystemExit("merged product differs")
        row[f"{kind}_two"] = timeit(forced(kind)(two), repeat)
        row[f"{kind}_merged"] = timeit(forced(kind)(one), repeat)
    return row


CLOCK = "cpu_min_ms"  # the column the tables print (set by --clock)


def ratio(row: dict, key: str) -> float:
    return row[key][CLOCK] / max(row["float32"][CLOCK], 1e-6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ring_matmul.json"))
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="what the tables print: process CPU time (default; robust to other load) or wall time")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = "cpu_min_ms" if args.clock == "cpu" else "min_ms"
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    profile = dict(forced("auto")(linalg.cpu_profile)())
    profile["probe_now"] = linalg.probe_cpu()  # cpu_profile may come from the cache: this run's own probe
    mm = [bench_matmul(m, k, n, args.repeat) for m, k, n in MATMULS]
    cv = [bench_conv(ci, co, h, s, args.repeat) for ci, co, h, s in CONVS]
    merge = [bench_merge(256, 576, 64, args.repeat), bench_merge(64, 64, 64, args.repeat)]
    out = {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "torch": torch.__version__,
        "threads": args.threads,
        "clock_printed": args.clock,
        "cpus": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "probe": profile,
        "matmul": mm,
        "conv": cv,
        "merge": merge,
    }
    print(f"{out['cpu']}, torch {out['torch']} capability {out['capability']}, {args.threads} threads, "
          f"load {out['load_before']} -> {out['load_after']}")
    print(f"probe: int64 {profile['int64_ms']} ms, float64 {profile['float64_ms']} ms at {profile['probe_shape']} "
          f"-> large products on {profile['measured_choice']}")
    print(f"\nmatmul (ms, min of runs, {args.clock} time; x = times float32)")
    print(f"{'M x K x N':>16} {'f32':>7} {'f64':>7} {'int64':>8} {'limbs(w prep)':>14} {'limbs(none)':>12} {'auto':>8}")
    for r in mm:
        print(f"{r['shape']:>16} {r['float32'][CLOCK]:7.2f} {r['float64'][CLOCK]:7.2f} "
              f"{r['int64'][CLOCK]:8.2f} {r['limbs_weight_prepared'][CLOCK]:8.2f} "
              f"({ratio(r, 'limbs_weight_prepared'):4.0f}x) {r['limbs_nothing_prepared'][CLOCK]:12.2f} "
              f"{r['auto'][CLOCK]:8.2f} ({ratio(r, 'auto'):3.0f}x)")
    print(f"\n3x3 conv, batch 1 (ms, min of runs, {args.clock} time)")
    print(f"{'conv':>20} {'f32':>7} {'f64':>7} {'int64 conv':>10} {'int64 im2col':>12} {'limbs':>8} {'auto':>8}")
    for r in cv:
        print(f"{r['conv']:>20} {r['float32'][CLOCK]:7.2f} {r['float64'][CLOCK]:7.2f} "
              f"{r['int64_torch_conv'][CLOCK]:10.2f} {r['int64_im2col_prepared'][CLOCK]:12.2f} "
              f"{r['limbs_prepared'][CLOCK]:8.2f} {r['auto'][CLOCK]:8.2f} ({ratio(r, 'auto'):3.0f}x)")
    print(f"\nsecret x secret: a party's two products, separate vs merged into one GEMM (ms, min, {args.clock} time)")
    for r in merge:
        print(f"{r['shape']:>16} int64 {r['int64_two'][CLOCK]:.2f} vs {r['int64_merged'][CLOCK]:.2f}; "
              f"limbs {r['limbs_two'][CLOCK]:.2f} vs {r['limbs_merged'][CLOCK]:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
