"""The ``siguard`` command line (thin: parsing, messages, exit codes; logic lives in the packages)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

import numpy as np

from siguard.core.errors import InputError, SiguardError

__all__ = ["main", "console_main", "build_parser"]


def _load_npy(path: str) -> np.ndarray:
    from siguard.compiler.arrays import load_npy

    return load_npy(path, "input")


class CodeDefault:
    """A default shown in ``--help``, read from the code's own default when the help is printed.

    ``source`` is ``"module:Class"`` (a dataclass, instantiated without arguments) and ``field`` the
    attribute: the help text never restates a default, so it cannot drift from the code (and the
    module is imported only when the help is shown)."""

    def __init__(self, source: str, field: str | None = None):
        self.source, self.field = source, field

    def value(self):
        import importlib

        module, _, name = self.source.partition(":")
        obj = getattr(importlib.import_module(module), name)()
        return obj if self.field is None else getattr(obj, self.field)

    def __str__(self) -> str:
        v = self.value()
        return f"{v:g}" if isinstance(v, float) else str(v)


def _code_default(action: argparse.Action, source: str, field: str | None = None) -> None:
    """Let ``action``'s help say ``%(code_default)s`` for the code's default (see :class:`CodeDefault`)."""
    action.code_default = CodeDefault(source, field)


# ---- commands ---------------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace) -> int:
    from siguard.pipeline import CompileOptions, compile_model, write_plan

    if not Path(args.model).exists():
        raise InputError(f"model file {args.model} does not exist")
    guard_config = {k: v for k, v in (("rounds", args.guard_rounds), ("steps", args.guard_steps), ("lr", args.guard_lr),
                                      ("lr_growth", args.guard_lr_growth), ("schedule", args.guard_schedule),
                                      ("validator", args.guard_validator), ("margin", args.guard_margin),
                                      ("sharpen_lr", args.guard_sharpen_lr),
                                      ("sharpen_margin", args.guard_sharpen_margin),
                                      ("release_bits", args.guard_release_bits))
                    if v is not None}
    if guard_config and not args.guard:
        raise InputError("--guard-* options need --guard DEFENDER.onnx")
    from siguard.core.config import parse_budget, parse_overrides

    mode, overrides = parse_overrides(args.approx)
    if args.calibration is not None and not Path(args.calibration).exists():
        raise InputError(f"calibration file {args.calibration} does not exist")
    given = {k: v for k, v in (("batch", args.batch), ("frac_bits", args.frac_bits), ("objective", args.objective))
             if v is not None}  # unset options keep CompileOptions' defaults (what --help shows)
    if any("=" not in item for item in args.approx or ()):
        given["approx"] = mode
    opts = CompileOptions(output=args.output, guard=args.guard, guard_config=guard_config,
                          calibration=args.calibration, overrides=overrides,
                          accuracy_budget=parse_budget(args.accuracy_budget), input_range=args.input_range, **given)
    result = compile_model(args.model, opts)
    out = write_plan(result, args.o)
    t = result.plan.totals
    print(f"compiled {args.model} -> {out} ({len(result.plan.steps)} steps, {t['rounds']} rounds, "
          f"{t['bytes'] / 1e6:.3f} MB per party; plan {result.plan.plan_hash[:16]})")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from siguard.compiler.plan import Plan
    from siguard.compiler.report import render

    plan = Plan.load(args.plan)
    text = render(plan, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from siguard.compiler.plan import Plan

    plan = Plan.load(args.plan)
    x = _load_npy(args.input)
    if args.mode == "reference":
        from siguard.runtime.local import run_reference

        with _guard_progress(plan):
            result = run_reference(plan, x)
    elif args.mode in ("threads", "lockstep"):
        from siguard.runtime.local import run_threads

        with _guard_progress(plan):
            result = run_threads(plan, x, timeout=args.timeout, scheduler=args.mode)
    elif args.mode == "processes":  # (this process does not import torch: the servers and the client do)
        from siguard.runtime.net.processes import run_processes

        result = run_processes(args.plan, x, timeout=args.timeout)
    else:  # argparse restricts the choices
        raise InputError(f"unknown mode {args.mode}")
    y = result.output
    if args.output:
        np.save(args.output, y.astype(np.float32))
    print_result(args.mode, plan.outputs[0]["name"], y, result.seconds, args.output,
                 result.stats if args.stats else None)
    return 0


@contextlib.contextmanager
def _guard_progress(plan):
    """The guard's iterations as progress on stderr while a guarded plan runs in this process (a tqdm bar
    on a terminal, a plain line every few seconds otherwise: :mod:`siguard.progress`); nothing otherwise."""
    step = next((s for s in plan.steps if s.op == "guard"), None)
    if step is None:
        yield
        return
    from siguard.progress import progress_bar
    from siguard.runtime.kernels.guard import guard_progress

    total = int(step.attrs["rounds"]) * (int(step.attrs["steps"]) + 1)
    with progress_bar(total, "guarded query") as bar, guard_progress(lambda done, _total: bar.update(1)):
        yield


def print_result(label: str, name: str, y: np.ndarray, seconds: float, output: str | None,
                 stats: dict | None) -> None:
    """The summary every command that runs a plan prints: output, time, top-1 labels, statistics."""
    print(f"{label}: output {name} {list(y.shape)} in {seconds:.3f} s" + (f" -> {output}" if output else ""))
    if y.ndim == 2:
        print("top-1:", " ".join(str(int(i)) for i in y.argmax(axis=1)[:32]) + (" …" if y.shape[0] > 32 else ""))
    if stats:
        from siguard.runtime.stats import format_stats

        print(format_stats(stats))


def cmd_demo(args: argparse.Namespace) -> int:
    from siguard.privacy.demo import run_demo

    run_demo(args.dataset, args.out, mode=args.mode, seed=args.seed, progress=not args.no_progress)
    return 0


#: modules with a ``register(subparsers)`` function adding their commands
_COMMAND_MODULES = ("siguard.cli_net", "siguard.cli_guard", "siguard.cli_audit", "siguard.cli_bench")


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siguard", description="Compile ONNX models to 3-party MPC plans with an "
                                "output guard against membership inference, and run them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model into a plan directory")
    c.add_argument("model", help="ONNX file (external data beside it is read too)")
    c.add_argument("-o", required=True, metavar="PLAN", help="output plan directory")
    opts = "siguard.pipeline:CompileOptions"
    _code_default(c.add_argument("--batch", type=int, default=None,
                                 help="fix a symbolic batch dimension to N (default %(code_default)s)"), opts, "batch")
    c.add_argument("--output", default=None, help="graph output to compile (default: the first float output)")
    _code_default(c.add_argument("--frac-bits", type=int, default=None,
                                 help="fixed-point fractional bits (default %(code_default)s)"), opts, "frac_bits")
    c.add_argument("--input-range", action="append", metavar="LO,HI|NAME=LO,HI", default=None,
                   help="declared input domain (write --input-range=-1,1; repeat NAME=LO,HI per input): compile fails "
                        "if an intermediate could overflow on it. Default: the largest safe [-2^k, 2^k] "
                        "(see the README's Numerical safety section)")
    a = c.add_argument_group("approximations (see the README's Approximations section)")
    a.add_argument("--calibration", metavar="X.npy", default=None,
                   help="calibration inputs (N, ...): onnxruntime records every value's range on them and the "
                        "approximation pass measures candidates on them (without: default ranges and implementations)")
    _code_default(a.add_argument(
        "--accuracy-budget", metavar="top1=F,prob=F", default=None,
        help="end-to-end budget on the calibration data against onnxruntime: top-1 agreement >= top1 and "
             "max absolute change of the revealed output <= prob (default %(code_default)s)"),
        "siguard.core.config:AccuracyBudget")
    _code_default(a.add_argument(
        "--approx", action="append", metavar="MODE|NODE=IMPL", default=None,
        help="auto (cheapest within the budget), exact (most accurate), crypten (CrypTen's defaults), default (the "
             "ops' defaults); NODE=IMPL (repeatable) overrides one node (default %(code_default)s)"), opts, "approx")
    _code_default(a.add_argument("--objective", choices=("rounds", "bytes"), default=None,
                                 help="what the approximation pass minimises (default %(code_default)s)"),
                  opts, "objective")
    g = c.add_argument_group("guard (SIGuard noise on the revealed probabilities)")
    g.add_argument("--guard", metavar="DEFENDER.onnx", default=None,
                   help="insert the guard with this defender (from `siguard guard train`)")
    from siguard.core.config import SCHEDULE_DEFAULTS

    guard = "siguard.core.config:GuardConfig"

    def sequential(key: str) -> str:  # the sequential schedules' own defaults (siguard.core.config.SCHEDULE_DEFAULTS)
        return ", ".join(f"{name} {v[key]}" for name, v in SCHEDULE_DEFAULTS.items() if name != "parallel")

    _code_default(g.add_argument("--guard-schedule", choices=tuple(SCHEDULE_DEFAULTS), default=None,
                                 help="parallel: the R rounds as R candidates of one batch, sign steps, the first "
                                      "success; freeze: sequential rounds, test every step, keep the first success; "
                                      "paper: sequential rounds, test at the end of each round (default "
                                      "%(code_default)s)"), guard, "schedule")
    _code_default(g.add_argument("--guard-rounds", type=int, default=None,
                                 help=f"rounds (candidates) R; {sequential('rounds')} (default %(code_default)s)"),
                  guard, "rounds")
    _code_default(g.add_argument("--guard-steps", type=int, default=None,
                                 help=f"steps per round T; {sequential('steps')} (default %(code_default)s)"),
                  guard, "steps")
    _code_default(g.add_argument("--guard-lr", type=float, default=None,
                                 help=f"the first round's step size; {sequential('lr')} (default %(code_default)s)"),
                  guard, "lr")
    _code_default(g.add_argument("--guard-lr-growth", type=float, default=None,
                                 help=f"each round's step size over the previous round's; {sequential('lr_growth')} "
                                      "(default %(code_default)s)"), guard, "lr_growth")
    _code_default(g.add_argument("--guard-validator", choices=("sign", "margin", "hybrid"), default=None,
                                 help="sign: the defender's decision flipped; margin: |h| within --guard-margin; "
                                      "hybrid (parallel only): the first flip, failing that the first |h| within the "
                                      f"margin; {sequential('validator')} (default %(code_default)s)"),
                  guard, "validator")
    _code_default(g.add_argument("--guard-margin", type=float, default=None,
                                 help="margin of the margin and hybrid validators (default %(code_default)s)"),
                  guard, "margin")
    _code_default(g.add_argument("--guard-sharpen-lr", type=float, default=None,
                                 help="parallel only: one more candidate round whose every step raises the label's "
                                      "logit by this and lowers the others by as much, for queries the search cannot "
                                      "bring to the defender's boundary; 0: none (default %(code_default)s)"),
                  guard, "sharpen_lr")
    _code_default(g.add_argument("--guard-sharpen-margin", type=float, default=None,
                                 help="the sharpening round keeps its first step with |h| within this, failing that "
                                      "its first flip (default %(code_default)s)"), guard, "sharpen_margin")
    _code_default(g.add_argument("--guard-release-bits", type=int, default=None,
                                 help="parallel only: release every probability but the label's rounded down to a "
                                      "multiple of 2^-B (the label takes the rest); 0: full precision (default "
                                      "%(code_default)s)"), guard, "release_bits")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="show a plan's steps, implementations and costs")
    i.add_argument("plan")
    i.add_argument("--format", choices=("text", "json", "html", "dot"), default="text")
    i.add_argument("--out", default=None, help="write to a file instead of stdout")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="run a plan on an input array")
    r.add_argument("plan")
    r.add_argument("--input", required=True, help=".npy input (shape as the plan's input)")
    r.add_argument("--output", default=None, help="write the revealed output to this .npy")
    r.add_argument("--mode", choices=("reference", "threads", "lockstep", "processes"), default="threads",
                   help="reference: fixed-point cleartext oracle; threads: three parties in this process, one "
                        "thread each; lockstep: the same parties in one thread, switched at every wait (rounds "
                        "cost about half: faster when rounds dominate, e.g. a guarded plan at a small batch); "
                        "processes: three server processes and a client process over TLS on loopback")
    r.add_argument("--stats", action="store_true", help="print rounds and MB per party per step")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds a party waits for a SILENT peer: one that "
                   "neither sends nor computes (no thread, no heartbeat); a live one is waited for (default 60)")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the whole story on bundled real data: train, guard, compile, run, audit",
                       description="Train an overfitting target and the guard's defender, compile with and without "
                                   "the guard, run secure inference between three parties and audit membership "
                                   "leakage of plaintext, secure and guarded outputs. No arguments needed.")
    d.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits",
                   help="digits (scikit-learn, default) or fashion-mnist (Debian's dataset-fashion-mnist)")
    d.add_argument("--out", default="siguard-demo", help="working directory for models, data, plans and the report")
    d.add_argument("--mode", choices=("threads", "lockstep", "processes", "reference"), default="threads",
                   help="how the plans run (default threads; lockstep: one thread, see siguard run --help)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split and training (default 0)")
    d.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, a plain line every few seconds otherwise)")
    d.set_defaults(func=cmd_demo)

    # command groups that live in their own modules (networked runtime, guard, audit, bench)
    import importlib

    for module in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)
    return p


def small_pages() -> bool:
    """Let numpy allocate big arrays without transparent huge pages, unless ``NUMPY_MADVISE_HUGEPAGE`` (which
    numpy reads at import) says otherwise. Returns whether huge pages are now off.

    numpy asks the kernel (madvise) to back every array of 4 MiB or more with 2 MiB pages. A query allocates
    its big protocol buffers fresh (for ResNet-34 the keystream that re-randomises the weights: 170 MB per
    party per query), and the first touch of a huge page is slow wherever the kernel must compact memory to
    find one or a VM backs its memory lazily: on the 2-core EPYC VM of issue 14 (load 3), ResNet-34's first
    query took 7.3-9.6 s with huge pages and 2.3-2.4 s without (system time 6.7-8.0 s against 1.6-1.7 s);
    the warm queries took the same 1.2 s either way. Called by :func:`main`, so every command's process
    (``run``, ``bench``, the servers of ``party``, the client of ``query``) allocates this way."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return os.environ["NUMPY_MADVISE_HUGEPAGE"].strip() in ("0", "")
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2, numpy 1
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:  # a numpy without the switch: nothing to turn off
        return False
    setter(False)
    return True


def main(argv: list[str] | None = None) -> int:
    small_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("SIGUARD_DEBUG"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # the passes' warnings are in the plan (``inspect`` lists them); `compile` prints each one once itself,
        # and the demo's compilations have none its user could act on
        logging.getLogger("siguard.passes").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except SiguardError as exc:
        if debug:
            raise
        print(f"siguard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("siguard: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal bug: still one line, with a way to see more
        if debug:
            raise
        print(f"siguard: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``siguard`` command and ``python -m siguard.cli``: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code``, skipping the interpreter's teardown where that is safe.

    A normal exit clears every module and runs the cyclic garbage collector over every object torch
    made at import (about 0.4-0.5 s on the 2-core EPYC of issue 14, as long as a third of a warm
    ResNet-34 query) only to free memory that the OS reclaims anyway. Here, the part of the teardown
    a command relies on runs as usual: threads that are not daemons (if any is alive, the normal exit
    joins it), the ``atexit`` handlers (logging's flush, ``tempfile``'s and ``multiprocessing``'s clean-up)
    and the flush of stdout and stderr (if it fails, e.g. a closed pipe, the normal exit reports it);
    then ``os._exit``. :func:`main` itself returns normally (tests and API users call it in-process)."""
    import atexit
    import threading

    main_thread = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_Finalize would run first (documented behaviour of the atexit module)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - let the normal exit report it as Python does
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    console_main()
