"""Running a plan locally: the fixed-point reference, and the three parties as threads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from siguard.compiler.plan import Plan
from siguard.core.errors import InputError
from siguard.runtime.kernels.plain import PlainEngine

from .executor import Executor
from .ring import MAX_ABS_REAL, decode, encode

__all__ = ["RunResult", "check_inputs", "run_reference", "run_threads", "op_breakdown", "format_breakdown"]


@dataclass
class RunResult:
    """Decoded outputs (float64 arrays by output name) and, for secure runs, statistics."""

    outputs: dict[str, np.ndarray]
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        return next(iter(self.outputs.values()))


def check_inputs(plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Validate user inputs against the plan: names, shapes, numeric dtype, finiteness, range.

    A single array is accepted for a single-input plan. Returns float64 arrays by input name."""
    specs = plan.inputs
    if not isinstance(inputs, dict):
        if len(specs) != 1:
            raise InputError(f"the plan has {len(specs)} inputs; pass a dict of name -> array")
        inputs = {specs[0]["name"]: inputs}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, shape = spec["name"], tuple(spec["shape"])
        if name not in inputs:
            raise InputError(f"missing input {name!r} (plan inputs: {', '.join(s['name'] for s in specs)})")
        a = np.asarray(inputs[name])
        if a.dtype.kind not in "fiu":
            raise InputError(f"input {name!r} has dtype {a.dtype}; expected a real numeric array (float32)")
        if a.shape != shape:
            hint = " (recompile with --batch N to change the batch size)" if a.shape[1:] == shape[1:] else ""
            raise InputError(f"input {name!r} has shape {a.shape}; the plan expects {shape}{hint}")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InputError(f"input {name!r} contains NaN or infinite values")
        # a product of two such values must stay below 2^62 ring units at scale 2f
        limit = MAX_ABS_REAL(plan.frac_bits) / 2**plan.frac_bits
        if a.size and np.abs(a).max() >= limit:
            raise InputError(
                f"input {name!r} has magnitude {np.abs(a).max():.3g}, beyond the fixed-point limit {limit:.3g}"
            )
        out[name] = a
    return out


def run_reference(
    plan: Plan, inputs: dict[str, np.ndarray] | np.ndarray, weights: dict[str, np.ndarray] | None = None
) -> RunResult:
    """Execute the plan on cleartext ring values with the secure runtime's arithmetic."""
    xs = check_inputs(plan, inputs)
    w = plan.load_weights() if weights is None else weights
    t0 = time.perf_counter()
    ex = Executor(plan, PlainEngine(plan.frac_bits))
    ex.share_weights(w)
    ring_inputs = {k: encode(v, plan.frac_bits) for k, v in xs.items()}
    revealed = ex.run(ring_inputs)
    outs = {k: decode(v, plan.frac_bits) for k, v in revealed.items()}
    return RunResult(outs, time.perf_counter() - t0)


def run_threads(
    plan: Plan,
    inputs: dict[str, np.ndarray] | np.ndarray,
    weights: dict[str, np.ndarray] | None = None,
    *,
    timeout: float = 60.0,
    queries: int = 1,
    scheduler: str = "threads",
) -> RunResult:
    """Execute the plan between three in-process parties and an in-process client.

    ``scheduler``: ``"threads"`` (one OS thread per party) or ``"lockstep"`` (all parties as greenlets
    in this thread, switched at every wait: a round costs less than half, the guard runs about twice
    as fast; see :func:`siguard.runtime.mpc.rss.run_threads`).

    ``queries`` > 1 runs the same input that many times after one key set-up and weight sharing
    (a server's life: set up once, then serve); the result and statistics are the last query's,
    and ``stats["query_seconds_all"]`` lists every query's time.

    P0 is the model owner's server: it alone reads the weights and secret-shares them. The client
    secret-shares the inputs and is the only one to receive the output. ``stats`` holds the
    rounds and bytes every party sent, per step (see :func:`siguard.runtime.stats.summarize`), each
    step's wall ``seconds`` (the slowest server's, communication included), and
    ``query_seconds``: the query alone, from the servers' first step to the reveal, without the
    key set-up and the weights' sharing that a server does once at start (``seconds`` has all)."""
    from siguard.runtime.mpc.rss import run_threads as run_parties

    from .stats import summarize

    xs = check_inputs(plan, inputs)
    w = plan.load_weights() if weights is None else weights
    f = plan.frac_bits
    ring_inputs = {k: encode(v, f) for k, v in xs.items()}

    if queries < 1:
        raise ValueError(f"queries must be at least 1, got {queries}")

    def party(engine) -> tuple[dict[str, float], list[float]]:
        ex = Executor(plan, engine)
        ex.share_weights(w if engine.party == 0 else None)
        times = []
        for q in range(queries):
            if q:
                engine.transport.reset_stats(keep_prefix="setup")
            t_query = time.perf_counter()
            ex.run(None)
            times.append(time.perf_counter() - t_query)
        return ex.step_seconds, times

    def client(c) -> dict[str, torch.Tensor]:
        for q in range(queries):
            if q:
                c.transport.reset_stats(keep_prefix="setup")
            for spec in plan.inputs:
                with c.transport.step(f"input:{spec['name']}"):
                    c.share_input(ring_inputs[spec["name"]])
            out = {}
            for spec in plan.outputs:
                with c.transport.step(f"reveal:{spec['name']}"):
                    out[spec["name"]] = c.receive_output(spec["shape"])
        return out

    t0 = time.perf_counter()
    timed, revealed, per_party = run_parties(party, client, frac_bits=f, timeout=timeout, scheduler=scheduler)
    seconds = time.perf_counter() - t0
    stats = summarize(per_party, [s["name"] for s in plan.steps])
    stats["step_seconds"] = {s["name"]: max(t[0].get(s["name"], 0.0) for t in timed) for s in plan.steps}
    for row in stats["steps"]:
        row["seconds"] = stats["step_seconds"].get(row["name"], 0.0)
    stats["query_seconds_all"] = [max(t[1][q] for t in timed) for q in range(queries)]
    stats["query_seconds"] = stats["query_seconds_all"][-1]
    outs = {k: decode(v, f) for k, v in revealed.items()}
    return RunResult(outs, seconds, stats)


def op_breakdown(plan: Plan, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a secure run's time goes: the per-step rows of ``stats`` (from :func:`run_threads`)
    summed per (op, impl) of the plan, slowest first. Each row: op, impl, steps, seconds, share
    (of the steps' total seconds), rounds, bytes (busiest party)."""
    comm = {row["name"]: row for row in stats.get("steps", [])}
    seconds = stats.get("step_seconds", {})
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for step in plan.steps:
        key = (step["op"], step.get("impl") or "")
        row = comm.get(step["name"], {})  # local steps have no communication row
        a = agg.setdefault(key, {"op": key[0], "impl": key[1], "steps": 0, "seconds": 0.0, "rounds": 0, "bytes": 0})
        a["steps"] += 1
        a["seconds"] += float(seconds.get(step["name"], row.get("seconds", 0.0)))
        a["rounds"] += int(row.get("rounds", 0))
        a["bytes"] += int(row.get("bytes", 0))
    total = sum(a["seconds"] for a in agg.values()) or 1.0
    rows = sorted(agg.values(), key=lambda a: -a["seconds"])
    for a in rows:
        a["share"] = a["seconds"] / total
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """:func:`op_breakdown` as a text table."""
    lines = [f"{'op':14s} {'impl':14s} {'steps':>5s} {'seconds':>9s} {'share':>6s} {'rounds':>7s} {'MB/party':>9s}"]
    for a in rows:
        lines.append(
            f"{a['op'][:14]:14s} {a['impl'][:14]:14s} {a['steps']:5d} {a['seconds']:9.3f} {100 * a['share']:5.1f}% "
            f"{a['rounds']:7d} {a['bytes'] / 1e6:9.3f}"
        )
    return "\n".join(lines)
