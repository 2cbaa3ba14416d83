"""Secure inference with every party in its own network namespace, over emulated LAN and WAN links.

    sudo python benchmarks/netns.py [--model resnet18|mlp] [--settings lan wan] [--queries 3] [--guard]
                                    [--emulator auto|netem|tun] [--out benchmarks/results/netns.json]

``--guard`` compiles the model with the guard (default counts, 6 x 49 steps) and a defender of random
weights: the guard's cost does not depend on the defender's values (its control flow is fixed).

Four namespaces ``sgbench-p0``, ``-p1``, ``-p2`` (the servers) and ``-c`` (the client) get the
addresses 10.77.0.10 .. 10.77.0.13 -- the project's own test hosts; nothing else is contacted.
Two settings: ``lan`` (0.5 ms RTT, 1 Gbit/s per host) and ``wan`` (40 ms RTT, 100 Mbit/s per host).
Every host's outgoing traffic is delayed by RTT/2 and paced at the rate, so a round trip between
any two hosts takes one RTT and each host sends at most ``rate``.

Link emulation, chosen by ``--emulator`` (``auto``: netem when the kernel has it):

* ``netem``: the namespaces hang off a bridge (in namespace ``sgbench-br``) by veth pairs, and
  ``tc qdisc ... netem delay RTT/2 rate R`` shapes each host's veth.
* ``tun``: for kernels without ``sch_netem`` (like the CI machine this was written on), each
  namespace gets a TUN device instead, and a forwarding process (in the root namespace, holding
  the TUN file descriptors) moves IPv4 packets between them, holding each packet for RTT/2 and
  pacing each host's packets at the rate. It adds ~50 us of its own per packet (measured RTT is
  reported) and competes with the parties for the CPU.

Per setting the script starts the trio (``siguard party`` in each server namespace), measures the
RTT and throughput between two namespaces, runs ``--queries`` queries with ``siguard query`` in
the client namespace, and stops the trio. Reported: weight-sharing set-up time, query wall time
(median; includes the client's three TLS connections), rounds, MB per party. Everything is
removed at the end, also after a failure or Ctrl-C. Needs root and ``ip`` (and ``tc`` for netem);
otherwise it says so and exits 0.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import multiprocessing as mp
import os
import platform
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX = "sgbench"
HOSTS = {"p0": "10.77.0.10", "p1": "10.77.0.11", "p2": "10.77.0.12", "c": "10.77.0.13"}
SETTINGS = {"lan": {"rtt_ms": 0.5, "rate_mbit": 1000.0}, "wan": {"rtt_ms": 40.0, "rate_mbit": 100.0}}
PORT = 7400
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def in_ns(name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns(name), *cmd, check=check)


# ---- the userspace link emulator (TUN) ------------------------------------------------------------
def _forward(fds: dict[str, int], delay: float, rate_bps: float, stop) -> None:
    """Move IPv4 packets between the TUN devices: each host's packets are paced at ``rate_bps``
    (its uplink) and delivered ``delay`` seconds after they left. Runs until ``stop`` is set."""
    by_addr = {bytes(int(x) for x in HOSTS[h].split(".")): fd for h, fd in fds.items()}
    free_at = dict.fromkeys(fds.values(), 0.0)
    heap: list = []
    seq = 0
    readers = list(fds.values())
    for fd in readers:
        os.set_blocking(fd, False)
    while not stop.is_set():
        now = time.monotonic()
        wait = 0.05 if not heap else min(max(heap[0][0] - now, 0.0), 0.05)
        try:
            ready, _, _ = select.select(readers, [], [], wait)
        except OSError:
            return
        for fd in ready:
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue  # not IPv4 (router solicitations and the like)
                dst = by_addr.get(pkt[16:20])
                if dst is None:
                    continue
                t = time.monotonic()
                depart = max(t, free_at[fd]) + len(pkt) * 8 / rate_bps
                free_at[fd] = depart
                heapq.heappush(heap, (depart + delay, seq, dst, pkt))
                seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(dst, pkt)
            except OSError:
                pass


class Network:
    """The four namespaces and their links (see the module docstring); a context manager that
    always cleans up."""

    def __init__(self, emulator: str):
        self.emulator = emulator
        self.tun_fds: dict[str, int] = {}
        self._forwarder: mp.Process | None = None
        self._stop = None

    def __enter__(self) -> Network:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.down()  # leftovers of an interrupted run
        for h in HOSTS:
            sh("ip", "netns", "add", ns(h))
            in_ns(h, "ip", "link", "set", "lo", "up")
        if self.emulator == "netem":
            sh("ip", "netns", "add", ns("br"))
            in_ns("br", "ip", "link", "add", "br0", "type", "bridge")
            in_ns("br", "ip", "link", "set", "br0", "up")
            for k, (h, addr) in enumerate(HOSTS.items()):
                in_ns("br", "ip", "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns(h))
                in_ns("br", "ip", "link", "set", f"v{k}", "master", "br0", "up")
                in_ns(h, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
                in_ns(h, "ip", "link", "set", "eth0", "up")
        else:
            for h, addr in HOSTS.items():
                name = f"{PREFIX}{h}"
                fd = os.open("/dev/net/tun", os.O_RDWR)
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
                self.tun_fds[h] = fd
                sh("ip", "link", "set", name, "mtu", "65000")
                sh("ip", "link", "set", name, "netns", ns(h))
                in_ns(h, "ip", "addr", "add", f"{addr}/24", "dev", name)
                in_ns(h, "ip", "link", "set", name, "up")

    def shape(self, rtt_ms: float, rate_mbit: float) -> None:
        """Apply a setting: one-way delay RTT/2 and rate on every host's outgoing traffic."""
        if self.emulator == "netem":
            for h in HOSTS:
                in_ns(h, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", f"{rtt_ms / 2}ms",
                      "rate", f"{rate_mbit}mbit", "limit", "100000")
            return
        self._stop_forwarder()
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._forwarder = ctx.Process(target=_forward, args=(self.tun_fds, rtt_ms / 2000, rate_mbit * 1e6, self._stop),
                                      daemon=True)
        self._forwarder.start()

    def _stop_forwarder(self) -> None:
        if self._forwarder is not None:
            self._stop.set()
            self._forwarder.join(5)
            if self._forwarder.is_alive():
                self._forwarder.kill()
            self._forwarder = None

    def down(self) -> None:
        self._stop_forwarder()
        for h in [*HOSTS, "br"]:
            sh("ip", "netns", "del", ns(h), check=False)
        for fd in self.tun_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.tun_fds.clear()


def netem_available() -> bool:
    probe = ns("probe")
    sh("ip", "netns", "del", probe, check=False)
    try:
        sh("ip", "netns", "add", probe)
        return sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", probe, check=False)


# ---- measurements -----------------------------------------------------------------------------------
_ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 7399)); s.listen()
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(1 << 20)
    if not d: break
    if d.endswith(b"p"): c.sendall(b"p")
"""
_PING = """
import socket, sys, time
for _ in range(100):
    try: c = socket.create_connection((sys.argv[1], 7399), timeout=5); break
    except OSError: time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ts = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); ts.append(time.perf_counter() - t)
n = int(float(sys.argv[3]) * 1e6); blob = b"x" * (1 << 20); t = time.perf_counter(); sent = 0
while sent < n: c.sendall(blob); sent += len(blob)
c.sendall(b"p"); c.recv(1)
print(sorted(ts)[len(ts) // 2], sent / (time.perf_counter() - t))
"""


def measure_link(rtt_ms: float, rate_mbit: float) -> dict[str, float]:
    """Median RTT (20+ pings) and bulk throughput from the client's namespace to P0's."""
    srv = subprocess.Popen(["ip", "netns", "exec", ns("p0"), sys.executable, "-c", _ECHO, HOSTS["p0"]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pings = 20 if rtt_ms > 10 else 200
        mb = max(2.0, rate_mbit / 8 * 0.5)  # about half a second of traffic
        out = in_ns("c", sys.executable, "-c", _PING, HOSTS["p0"], str(pings), str(mb)).stdout.split()
        return {"rtt_ms": float(out[0]) * 1e3, "throughput_mbit": float(out[1]) * 8 / 1e6}
    finally:
        srv.kill()
        srv.wait()


def build_plan(model: str, work: Path, guard: bool = False):
    import torch

    from siguard.compiler.plan import Plan
    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from tests.models import export, resnet_cifar, train_digits_mlp

    onnx = work / f"{model}.onnx"
    if model == "resnet18":
        export(resnet_cifar(18), onnx, torch.zeros(1, 3, 32, 32), opset=17)
        shape = (1, 3, 32, 32)
    else:
        export(train_digits_mlp(), onnx, torch.zeros(1, 64), opset=17, dynamic_batch=True)
        shape = (1, 64)
    defender = None
    if guard:
        from siguard.privacy.defender import DefenderWeights, make_defender

        torch.manual_seed(0)
        defender = DefenderWeights.from_module(make_defender(10))
    write_plan(compile_model(onnx, CompileOptions(batch=1, guard=defender)), work / "plan")
    return Plan.load(work / "plan"), shape


def run_setting(name: str, net: Network, plan_dir: Path, config: Path, x_path: Path, work: Path, queries: int,
                timeout: float) -> dict:
    from siguard.runtime.net.processes import Trio, child_env, siguard_command

    s = SETTINGS[name]
    net.shape(s["rtt_ms"], s["rate_mbit"])
    link = measure_link(s["rtt_ms"], s["rate_mbit"])
    print(f"[{name}] measured RTT {link['rtt_ms']:.3f} ms, throughput {link['throughput_mbit']:.0f} Mbit/s",
          flush=True)
    prefix = {i: ["ip", "netns", "exec", ns(f"p{i}")] for i in range(3)}
    trio = Trio(plan_dir, config, work / f"logs-{name}", timeout=timeout, connect_timeout=timeout, threads=1,
                prefix=prefix)
    rows = []
    with trio:
        t0 = time.monotonic()
        trio.wait_ready(timeout=timeout * 4)
        ready = time.monotonic() - t0
        setup = [float(trio.log(i).split("set-up ")[1].split(" s")[0]) for i in range(3)]
        for q in range(queries):
            stats_path = work / f"{name}-{q}.json"
            cmd = ["ip", "netns", "exec", ns("c"), *siguard_command(), "query", "--config", str(config), "--input",
                   str(x_path), "--output", str(work / f"{name}-{q}.npy"), "--timeout", str(timeout),
                   "--threads", "1", "--stats-json", str(stats_path)]
            proc = subprocess.run(cmd, env=child_env(1), capture_output=True, text=True, timeout=timeout * 10)
            if proc.returncode != 0:
                raise SystemExit(f"[{name}] query failed: {proc.stderr.strip()}")
            info = json.loads(stats_path.read_text())
            rows.append(info)
            print(f"[{name}] query {info['session']}: {info['seconds']:.3f} s", flush=True)
    t = rows[-1]["stats"]["totals"]
    secs = [r["seconds"] for r in rows]
    return {
        "setting": name,
        "target_rtt_ms": s["rtt_ms"],
        "target_rate_mbit": s["rate_mbit"],
        "measured_rtt_ms": link["rtt_ms"],
        "measured_throughput_mbit": link["throughput_mbit"],
        "servers_ready_s": ready,
        "setup_s": max(setup),
        "query_seconds": secs,
        "query_median_s": statistics.median(secs),
        "query_median_without_first_s": statistics.median(secs[1:]) if len(secs) > 1 else secs[0],
        "rounds": t["rounds"],
        "mb_per_party": [b / 1e6 for b in t["bytes_per_party"]],
        "client_mb": t["client_bytes"] / 1e6,
        "lower_bound_s": t["rounds"] * s["rtt_ms"] / 2000 + max(t["bytes_per_party"]) * 8 / (s["rate_mbit"] * 1e6),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("resnet18", "mlp"), default="resnet18")
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["lan", "wan"])
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--guard", action="store_true", help="compile with the guard (random defender weights)")
    ap.add_argument("--emulator", choices=("auto", "netem", "tun"), default="auto")
    ap.add_argument("--timeout", type=float, default=300.0, help="the parties' --timeout (default 300)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "netns.json"))
    args = ap.parse_args()
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("netns benchmark skipped: needs root on Linux (network namespaces)")
        return 0
    if shutil.which("ip") is None:
        print("netns benchmark skipped: the 'ip' command (iproute2) is missing")
        return 0
    emulator = args.emulator
    if emulator in ("auto", "netem"):
        ok = shutil.which("tc") is not None and netem_available()
        if not ok and emulator == "netem":
            print("netns benchmark skipped: tc netem is not available in this kernel (try --emulator tun)")
            return 0
        emulator = "netem" if ok else "tun"
    if emulator == "tun" and not os.path.exists("/dev/net/tun"):
        print("netns benchmark skipped: neither tc netem nor /dev/net/tun is available")
        return 0
    print(f"link emulation: {emulator}", flush=True)

    import numpy as np

    from siguard.runtime.net.certs import make_certs
    from siguard.runtime.net.config import render_config

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds through the cleanup of Network and the trio

    signal.signal(signal.SIGTERM, on_term)
    results = []
    with tempfile.TemporaryDirectory(prefix="siguard-netns-") as tmp:
        work = Path(tmp)
        plan, shape = build_plan(args.model, work, args.guard)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        if args.model == "mlp":
            x = np.abs(x) / 4
        np.save(work / "x.npy", x)
        certs = work / "certs"
        make_certs(certs, {f"P{i}": HOSTS[f"p{i}"] for i in range(3)} | {"client": HOSTS["c"]}, write_config=False)
        config = work / "parties.toml"
        config.write_text(render_config({f"P{i}": (HOSTS[f"p{i}"], PORT + i) for i in range(3)}, cert_dir=certs))
        print(f"plan {plan.plan_hash[:16]} ({args.model}{' + guard' if args.guard else ''}): "
              f"{plan.totals['rounds']} rounds, "
              f"{max(plan.totals['bytes_per_party']) / 1e6:.1f} MB per party per query", flush=True)
        with Network(emulator) as net:
            for name in args.settings:
                results.append(run_setting(name, net, plan.directory, config, work / "x.npy", work, args.queries,
                                           args.timeout))
    doc = {"model": args.model, "guard": args.guard, "emulator": emulator, "machine": platform.platform(),
           "cpus": os.cpu_count(),
           "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{'setting':8s} {'RTT ms':>8s} {'Mbit/s':>8s} {'set-up s':>9s} {'query s':>8s} {'bound s':>8s} "
          f"{'rounds':>7s} {'MB/party':>9s}")
    for r in results:
        print(f"{r['setting']:8s} {r['measured_rtt_ms']:8.3f} {r['measured_throughput_mbit']:8.0f} "
              f"{r['setup_s']:9.2f} {r['query_median_s']:8.2f} {r['lower_bound_s']:8.2f} {r['rounds']:7d} "
              f"{max(r['mb_per_party']):9.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
