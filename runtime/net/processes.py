"""``siguard run PLAN --mode processes``: the three servers and the client as separate processes.

:func:`run_processes` writes certificates (:func:`siguard.runtime.net.certs.make_certs`) and a loopback
``parties.toml`` with free ports into a temporary directory, starts ``siguard party`` three
times (:class:`Trio`), runs ``siguard query`` as a fourth process, reads its output and
statistics, and shuts the servers down (SIGTERM, then SIGKILL after a grace period). Everything
travels over TCP with mutual TLS exactly as between hosts.

:class:`Trio` is also what the tests and benchmarks use to run servers: one plan directory per
server (so one can be tampered with), extra arguments per server, a command prefix per server
(``ip netns exec NS``), logs in files, :meth:`Trio.wait_ready`, :meth:`Trio.kill`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.core.errors import RuntimeFault
from siguard.runtime.runs import RunResult, check_inputs

from .certs import make_certs
from .config import render_config

__all__ = ["Trio", "run_processes", "free_ports", "write_loopback_config", "siguard_command", "child_env"]

_ROOT = Path(__file__).resolve().parents[1]


def siguard_command() -> list[str]:
    """The command that runs the CLI with this interpreter."""
    return [sys.executable, "-m", "siguard.cli"]


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment for child processes: this checkout importable, unbuffered output, and
    optionally a thread budget for torch/OpenMP."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def default_threads() -> int:
    """torch threads per process when four processes share this machine."""
    return max(1, (os.cpu_count() or 1) // 3)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def write_loopback_config(directory: Path, cert_dir: Path | None = None, host: str = "127.0.0.1") -> Path:
    """Certificates (unless ``cert_dir`` holds them) and a ``parties.toml`` on ``host`` with
    free ports, in ``directory``. Returns the configuration's path."""

    directory.mkdir(parents=True, exist_ok=True)
    if cert_dir is None:
        cert_dir = directory / "certs"
        make_certs(cert_dir, write_config=False)
    ports = free_ports(3, host)
    path = directory / "parties.toml"
    path.write_text(render_config({f"P{i}": (host, ports[i]) for i in range(3)}, cert_dir=cert_dir))
    return path


class Trio:
    """Three ``siguard party`` processes (see the module docstring).

    ``plans``: one plan directory, or one per server. ``args``: extra CLI arguments for every
    server; ``party_args``: extra arguments per server index. ``prefix``: a command prefix per
    server index (e.g. ``["ip", "netns", "exec", "ns0"]``). Logs go to ``log_dir``/P<i>.out|err.
    """

    def __init__(
        self,
        plans: str | os.PathLike | Sequence[str | os.PathLike],
        config: str | os.PathLike,
        log_dir: str | os.PathLike,
        *,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        threads: int | None = None,
        args: Sequence[str] = (),
        party_args: dict[int, Sequence[str]] | None = None,
        prefix: dict[int, Sequence[str]] | None = None,
        parties: Sequence[int] = (0, 1, 2),
    ):
        if isinstance(plans, (str, os.PathLike)):
            plans = [plans] * 3
        self.plans = [str(p) for p in plans]
        self.config = str(config)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.threads = threads if threads is not None else default_threads()
        self.args = list(args)
        self.party_args = party_args or {}
        self.prefix = prefix or {}
        self.parties = list(parties)
        self.procs: dict[int, subprocess.Popen] = {}
        self._files: list[Any] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Trio:
        """Spawn the servers (does not wait for them to be ready)."""
        env = child_env(self.threads)
        for i in self.parties:
            cmd = [*self.prefix.get(i, ()), *siguard_command(), "party", self.plans[i], "--id", str(i),
                   "--config", self.config, "--timeout", str(self.timeout), "--threads", str(self.threads),
                   *(["--connect-timeout", str(self.connect_timeout)] if self.connect_timeout is not None else []),
                   *self.args, *self.party_args.get(i, ())]
            out = open(self.log_dir / f"P{i}.out", "wb")  # noqa: SIM115 - closed in close()
            err = open(self.log_dir / f"P{i}.err", "wb")  # noqa: SIM115
            self._files += [out, err]
            self.procs[i] = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        return self

    def __enter__(self) -> Trio:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self, i: int) -> str:
        """P<i>'s stdout and stderr so far."""
        parts = []
        for ext in ("out", "err"):
            p = self.log_dir / f"P{i}.{ext}"
            parts.append(p.read_text(errors="replace") if p.exists() else "")
        return "".join(parts)

    def stderr(self, i: int) -> str:
        p = self.log_dir / f"P{i}.err"
        return p.read_text(errors="replace") if p.exists() else ""

    def last_error(self, i: int) -> str:
        """The last line P<i> wrote to stderr (its one-line error), or ''."""
        lines = [ln for ln in self.stderr(i).splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every server logged that it is ready; raise RuntimeFault with a server's
        error if one exits first, or on timeout."""
        wait = self.connect_timeout if self.connect_timeout is not None else max(self.timeout, 60.0)
        deadline = time.monotonic() + (timeout if timeout is not None else wait + 60)
        while True:
            pending = []
            for i in self.parties:
                rc = self.procs[i].poll()
                if rc is not None:
                    raise RuntimeFault(f"P{i} exited with code {rc} before it was ready: "
                                       f"{self.last_error(i) or '(no message)'}")
                if f"P{i}: ready" not in self.log(i):
                    pending.append(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeFault(f"servers {', '.join(f'P{i}' for i in pending)} not ready in time")
            time.sleep(0.05)

    def pid(self, i: int) -> int:
        return self.procs[i].pid

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to P<i>."""
        self.procs[i].send_signal(sig)

    def wait(self, i: int, timeout: float) -> int:
        """P<i>'s exit code (raises subprocess.TimeoutExpired)."""
        return self.procs[i].wait(timeout)

    def stop(self, grace: float = 10.0) -> dict[int, int]:
        """SIGTERM every running server, wait up to ``grace`` s, SIGKILL the rest; exit codes."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:  # pragma: no cover
                    pass
        deadline = time.monotonic() + grace
        codes = {}
        for i, p in self.procs.items():
            try:
                codes[i] = p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[i] = p.wait()
        for f in self._files:
            f.close()
        self._files.clear()
        return codes


def _client_failure(rc: int, err: str) -> RuntimeFault:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    msg = lines[-1] if lines else f"exit code {rc}"
    return RuntimeFault(f"the client process failed (exit {rc}): {msg.removeprefix('siguard: error: ')}")


def run_processes(
    plan_dir: str | os.PathLike,
    inputs: dict[str, np.ndarray] | np.ndarray,
    timeout: float = 60.0,
    *,
    threads: int | None = None,
    keep: str | os.PathLike | None = None,
) -> RunResult:
    """Run ``plan_dir`` with three server processes and a client process on loopback over
    mutual TLS; same result as :func:`siguard.runtime.local.run_threads` up to truncation error.

    ``timeout`` is the servers' and the client's ``--timeout``. ``keep``: a directory to keep
    the certificates, configuration and logs in (default: a temporary directory, removed).
    ``seconds`` is the client's query time; ``stats`` the rounds and bytes per party per step.
    """
    plan = Plan.load(plan_dir)
    xs = check_inputs(plan, inputs)
    with tempfile.TemporaryDirectory(prefix="siguard-processes-") as tmp:
        work = Path(keep) if keep is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        certs = work / "certs"
        make_certs(certs, write_config=False, force=True)
        x_path, y_path, s_path = work / "input.npz", work / "output.npz", work / "query.json"
        np.savez(x_path, **xs)
        last: RuntimeFault | None = None
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            config = write_loopback_config(work, cert_dir=certs)
            # one query: a warm-up (a session rehearsed at each server) would cost more than the cold start it saves
            trio = Trio(plan_dir, config, work / "logs", timeout=timeout, threads=threads, args=["--no-warmup"])
            with trio:
                try:
                    trio.wait_ready()
                except RuntimeFault as exc:
                    last = exc
                    if "cannot listen" in str(exc):
                        continue
                    raise
                cmd = [*siguard_command(), "query", "--config", str(config), "--input", str(x_path),
                       "--output", str(y_path), "--timeout", str(timeout), "--stats-json", str(s_path),
                       "--threads", str(trio.threads), "--plan-hash", plan.plan_hash]
                proc = subprocess.run(cmd, env=child_env(trio.threads), capture_output=True, text=True,
                                      timeout=timeout * 20 + 60)
                if proc.returncode != 0:
                    raise _client_failure(proc.returncode, proc.stderr)
            info = json.loads(s_path.read_text())
            with np.load(y_path, allow_pickle=False) as z:
                outputs = {name: z[name].astype(np.float64) for name in z.files}
            return RunResult(outputs, float(info["seconds"]), info.get("stats") or {})
        assert last is not None
        raise last
