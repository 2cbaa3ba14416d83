"""Running a plan in this process: the fixed-point reference, and the three parties as threads or in lockstep."""

from __future__ import annotations

import time

import numpy as np

from siguard.compiler.plan import Plan
from siguard.runtime.kernels.plain import PlainEngine
from siguard.runtime.mpc.inprocess import run_threads as run_parties

from .executor import Executor
from .ring import decode, encode
from .runs import RunResult, check_inputs
from .stats import summarize

__all__ = ["run_reference", "run_threads"]




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
    as fast; see :func:`siguard.runtime.mpc.inprocess.run_threads`).

    ``queries`` > 1 runs the same input that many times after one key set-up and weight sharing
    (a server's life: set up once, then serve); the result and statistics are the last query's,
    and ``stats["query_seconds_all"]`` lists every query's time.

    P0 is the model owner's server: it alone reads the weights and secret-shares them. The client
    secret-shares the inputs and is the only one to receive the output. ``stats`` holds the
    rounds and bytes every party sent, per step (see :func:`siguard.runtime.stats.summarize`), each
    step's wall ``seconds`` (the slowest server's, communication included), and
    ``query_seconds``: the query alone, from the servers' first step to the reveal, without the
    key set-up and the weights' sharing that a server does once at start (``seconds`` has all)."""

    xs = check_inputs(plan, inputs)
    w = plan.load_weights() if weights is None else weights
    f = plan.frac_bits
    ring_inputs = {k: encode(v, f) for k, v in xs.items()}

    if queries < 1:
        raise ValueError(f"queries must be at least 1, got {queries}")

    def party(engine) -> tuple[dict[str, float], list[float]]:
        ex = Executor(plan, engine)
        ex.share_weights(w if engine.party == 0 else None)
        shared = ex.weights
        times = []
        for q in range(queries):
            if q:
                engine.transport.reset_stats(keep_prefix="setup")
            t_query = time.perf_counter()
            # fresh weight share components for every query; the last one needs the set-up shares no more
            ex.use_weights(shared, release=q == queries - 1)
            ex.run(None)
            times.append(time.perf_counter() - t_query)
        return ex.step_seconds, times

    def client(c) -> dict[str, np.ndarray]:
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
