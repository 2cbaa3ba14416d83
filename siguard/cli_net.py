"""CLI commands of the networked runtime: ``party``, ``query``, ``certs`` (thin: logic in runtime/)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from siguard.core.errors import InputError

__all__ = ["register", "cmd_party", "cmd_query", "cmd_certs", "keep_freed_memory"]


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise InputError(f"--threads must be at least 1, got {n}")
        import torch

        torch.set_num_threads(n)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep the memory a session frees for the next one, unless ``MALLOC_TRIM_THRESHOLD_``
    or ``MALLOC_MMAP_THRESHOLD_`` (which glibc reads at start) say otherwise. Returns whether it was set.

    By default glibc hands a thread's freed memory back to the kernel once more than twice its mmap threshold
    is free at the top of a heap, and serves blocks above that threshold (which it moves between 128 KiB and
    32 MiB as blocks are freed) by mmap: a session's re-randomised weight shares and convolution buffers (ResNet-34:
    hundreds of MB, each block under 32 MiB) were then faulted in afresh, in the first session and, in part, in
    every later one. A server keeps its memory instead (blocks under 32 MiB from the heaps; up to 1 GiB free
    kept per heap), so the session that :mod:`siguard.runtime.net.warmup` rehearses at start-up leaves the
    pages the first query uses (measured on the 2-core EPYC of issue 14, ResNet-34: a first query's page
    faults at P0 145k without the warm-up, 56k with it alone, 6k with both; later queries 40-48k, 0-14k).
    Called by :func:`cmd_party`; a no-op where the C library is not glibc."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _timeout(args: argparse.Namespace, config: Any) -> float:
    t = args.timeout if args.timeout is not None else (config.timeout or 30.0)
    if t <= 0:
        raise InputError(f"--timeout must be positive, got {t}")
    return float(t)


def cmd_party(args: argparse.Namespace) -> int:
    """A long-running compute server; exits 0 on SIGTERM/SIGINT, 3 when a peer fails."""
    from siguard.compiler.plan import Plan
    from siguard.runtime.net.config import load_config
    from siguard.runtime.net.server import PartyServer, ServerStopped

    keep_freed_memory()
    config = load_config(args.config)
    plan = Plan.load(args.plan)
    weights = plan.load_weights(args.weights) if args.id == 0 else None
    _set_threads(args.threads)
    if args.connect_timeout is not None and args.connect_timeout <= 0:
        raise InputError(f"--connect-timeout must be positive, got {args.connect_timeout}")
    server = PartyServer(plan, args.id, config, weights=weights, timeout=_timeout(args, config),
                         connect_timeout=args.connect_timeout, max_sessions=args.max_sessions,
                         step_delay=args.step_delay, warmup=not args.no_warmup)

    def on_signal(signum: int, _frame: Any) -> None:
        server.stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        server.serve_forever()
    except ServerStopped:
        pass
    print(f"P{args.id}: stopped ({server.sessions_done} queries served, {server.sessions_failed} failed)", flush=True)
    return 0


def _load_input(path: str) -> np.ndarray | dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {p} does not exist")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npy/.npz array ({exc})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {k: data[k] for k in data.files}
    return data


def cmd_query(args: argparse.Namespace) -> int:
    """One query: share the input, reconstruct the output, write it (numpy only: this process never imports
    torch)."""
    from siguard.runtime.net.client import QueryClient
    from siguard.runtime.net.config import load_config

    config = load_config(args.config)
    x = _load_input(args.input)
    timeout = _timeout(args, config)
    client = QueryClient(config, timeout=timeout, query_timeout=args.query_timeout or max(3600.0, timeout),
                         expected_hash=args.plan_hash)
    result = client.run(x)
    y = result.output
    if args.output:
        if args.output.endswith(".npz"):
            np.savez(args.output, **result.outputs)
        else:
            np.save(args.output, y.astype(np.float32))
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(
            {"session": result.session, "seconds": result.seconds, "plan_hash": result.plan_hash,
             "stats": result.stats}))
    from siguard.cli import print_result

    print_result(f"query {result.session}", next(iter(result.outputs)), y, result.seconds, args.output,
                 result.stats if args.stats else None)
    return 0


def _hosts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, addr = pair.partition("=")
        if not sep or not addr:
            raise InputError(f"--host expects NAME=ADDRESS (e.g. P0=10.0.0.1), got {pair!r}")
        out[name] = addr
    return out


def cmd_certs(args: argparse.Namespace) -> int:
    """A local CA and certificates for P0, P1, P2 and the client, plus a parties.toml."""
    from siguard.runtime.net.certs import make_certs, make_request, sign_request

    if args.request:  # on the party's own host: a key that never leaves it, and a request for the CA
        hosts = _hosts(args.host)
        paths = make_request(args.out, args.request, [hosts[args.request]] if args.request in hosts else [],
                             force=args.force)
        print(f"wrote {paths['key']} (private: keep it on this host) and {paths['csr']} (send it to the CA)")
        return 0
    if args.sign:  # at the CA: issue a certificate for a request
        cert = sign_request(args.out, args.sign, args.name, days=args.days, force=args.force)
        print(f"wrote {cert} (send it back; add it to parties.toml: a server's [Pi] cert, or a client under [clients])")
        return 0
    written = make_certs(args.out, _hosts(args.host), port_base=args.port_base, days=args.days, force=args.force)
    names = ", ".join(p.name for k, p in written.items() if not k.endswith("_key"))
    print(f"wrote {names} to {args.out} and each party's private key in its own directory (P0/, P1/, P2/, client/): "
          "give each party only its directory; keep ca.key offline")
    return 0


def register(sub: Any) -> None:
    """Add ``party``, ``query`` and ``certs`` to the CLI's subparsers."""
    p = sub.add_parser("party", help="run one compute server of the trio (P0 secret-shares the weights)")
    p.add_argument("plan", help="plan directory (P0 also reads its weights.npz)")
    p.add_argument("--id", type=int, choices=(0, 1, 2), required=True, help="which server this is")
    p.add_argument("--config", required=True, help="parties.toml (hosts, ports, certificates)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for each round's message and before a silent peer counts as dead "
                        "(default: the config's, else 30)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="seconds to wait at start for the other servers (default: the larger of --timeout and 60)")
    p.add_argument("--max-sessions", type=int, default=8, help="queries served at once (default 8)")
    p.add_argument("--weights", default=None, help="P0: the weights file (default PLAN/weights.npz)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready without first rehearsing a session alone (nothing sent, no data involved), "
                        "which makes the first query as fast as later ones")
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # testing aid
    p.set_defaults(func=cmd_party)

    q = sub.add_parser("query", help="secret-share an input to the servers and reconstruct the output")
    q.add_argument("--config", required=True, help="parties.toml (hosts, ports, certificates)")
    q.add_argument("--input", required=True, help=".npy input (or .npz with one array per plan input)")
    q.add_argument("--output", default=None, help="write the output here (.npy: first output as float32; "
                                                  ".npz: every output as float64)")
    q.add_argument("--timeout", type=float, default=None,
                   help="seconds for connecting and before a silent server counts as dead (default 30)")
    q.add_argument("--query-timeout", type=float, default=None,
                   help="longest wait for the output once the input is sent (default 3600)")
    q.add_argument("--plan-hash", default=None, help="insist on this plan hash (default: the config's plan_hash)")
    q.add_argument("--stats", action="store_true", help="print rounds and MB per party per step")
    q.add_argument("--stats-json", default=None, help="write session, seconds and statistics as JSON")
    q.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # accepted, unused: no torch here
    q.set_defaults(func=cmd_query)

    c = sub.add_parser("certs", help="create a local CA, certificates for P0, P1, P2 and the client, parties.toml")
    c.add_argument("--out", required=True, help="directory to write into")
    c.add_argument("--host", action="append", default=[], metavar="NAME=ADDRESS",
                   help="address of a party (P0, P1, P2, client), added to its certificate and parties.toml; "
                        "repeatable (default 127.0.0.1)")
    c.add_argument("--port-base", type=int, default=7400, help="P<i> listens on PORT_BASE + i (default 7400)")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.add_argument("--request", default=None, metavar="NAME",
                   help="on a party's host: write a fresh key NAME.key and a signing request NAME.csr into --out "
                        "(NAME: P0, P1, P2 or a client's name)")
    c.add_argument("--sign", default=None, metavar="FILE.csr",
                   help="at the CA (--out holds ca.pem and ca.key): issue NAME.pem for a signing request")
    c.add_argument("--name", default=None, help="with --sign: the role to certify (default: the request's file name)")
    c.set_defaults(func=cmd_certs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: siguard party|query|certs ...")
