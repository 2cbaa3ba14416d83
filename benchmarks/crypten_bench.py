"""Time CrypTen 0.4.1 on an ONNX model: run by the CrypTen virtual environment's python, not SIGuard's.

    /work/crypten-venv/bin/python benchmarks/crypten_bench.py MODEL.onnx --shape 1 3 32 32 [--repeat 3]
        [--parties 2] [--provider TFP|TTP] [--out result.json]

Two parties (CrypTen's default, with its default trusted-first-party provider "TFP"; ``--provider TTP``
takes triples from a trusted third-party process instead), launched as
processes by ``crypten.mpc.context.run_multiprocess`` over gloo on localhost, one torch thread
each. The model is converted with ``crypten.nn.from_onnx`` and encrypted once (not timed, like
SIGuard's weight sharing); each query then encrypts a fixed uniform input from party 0, runs the
encrypted forward pass and opens the output. Reported, per query (median of ``--repeat`` after one
warm-up): wall seconds, rounds and bytes sent per party from CrypTen's communicator statistics
(``cfg.communicator.verbose``), and, as ``setup`` and ``cold``, the rounds and bytes of the model's
conversion and encryption and of the first (warm-up) query: CrypTen shares each parameter tensor
separately, so the set-up alone takes hundreds of rounds, which a count over the whole run includes.
The result is printed as one JSON line (and written to ``--out``).

Compatibility shims, applied in this script only (never in SIGuard): CrypTen 0.4.1 imports
``torch.onnx._internal.registration`` (removed from recent torch), which ``from_onnx`` never uses,
so a stand-in module is registered before ``import crypten``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types


def _shim_torch_onnx() -> None:
    import torch  # noqa: F401

    for name in ("torch.onnx._internal.registration", "torch.onnx.symbolic_helper"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.registry = None
            sys.modules[name] = mod


def _query(model, x, comm) -> tuple[float, dict]:
    import crypten

    comm.get().reset_communication_stats()
    t0 = time.perf_counter()
    x_enc = crypten.cryptensor(x, src=0)
    y = model(x_enc).get_plain_text()
    seconds = time.perf_counter() - t0
    stats = dict(comm.get().get_communication_stats())
    return seconds, {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]), "shape": list(y.shape)}


def _party(args, out_path: str) -> None:
    import crypten
    import crypten.communicator as comm
    import torch
    from crypten.config import cfg

    torch.set_num_threads(1)
    cfg.communicator.verbose = True
    cfg.mpc.provider = args.provider
    comm.get().reset_communication_stats()
    with open(args.model, "rb") as f:
        model = crypten.nn.from_onnx(f)
    model.encrypt(src=0)
    model.eval()
    stats = dict(comm.get().get_communication_stats())
    setup = {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(tuple(args.shape), generator=gen)
    runs = []
    with torch.no_grad():
        _, cold = _query(model, x, comm)  # warm-up
        for _ in range(args.repeat):
            runs.append(_query(model, x, comm))
    rank = comm.get().get_rank()
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"rank": rank, "runs": [[s, st] for s, st in runs], "setup": setup, "cold": cold}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--shape", nargs="+", type=int, required=True, help="input shape including the batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parties", type=int, default=2)
    ap.add_argument("--provider", choices=("TFP", "TTP"), default="TFP")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _shim_torch_onnx()
    import crypten
    from crypten.config import cfg
    from crypten.mpc.context import run_multiprocess

    cfg.mpc.provider = args.provider  # the launcher starts a TTP process when the provider needs one
    with tempfile.TemporaryDirectory() as tmp:
        out_path = f"{tmp}/crypten"
        run_multiprocess(world_size=args.parties)(_party)(args, out_path)
        per_party = []
        for rank in range(args.parties):
            with open(f"{out_path}.{rank}") as f:
                per_party.append(json.load(f))
    n = args.repeat
    seconds = [max(p["runs"][k][0] for p in per_party) for k in range(n)]
    k_med = sorted(range(n), key=lambda k: seconds[k])[n // 2]
    result = {
        "crypten": crypten.__version__,
        "parties": args.parties,
        "provider": args.provider,
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "rounds": max(p["runs"][k_med][1]["rounds"] for p in per_party),
        "bytes_per_party": [p["runs"][k_med][1]["bytes"] for p in per_party],
        "setup": {"rounds": max(p["setup"]["rounds"] for p in per_party),
                  "bytes_per_party": [p["setup"]["bytes"] for p in per_party]},
        "cold": {"rounds": max(p["cold"]["rounds"] for p in per_party),
                 "bytes_per_party": [p["cold"]["bytes"] for p in per_party]},
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
