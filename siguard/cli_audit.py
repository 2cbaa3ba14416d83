"""``siguard audit``: membership-inference attacks on plaintext, secure and guarded outputs of one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "cmd_audit"]


def cmd_audit(args: argparse.Namespace) -> int:
    from siguard.privacy.audit import AuditData, format_table, run_audit

    data = AuditData.from_files(args.members, args.nonmembers, args.shadow)
    doc = run_audit(args.model, args.plan, args.guarded_plan, data, report_dir=args.report, mode=args.mode,
                    shadow_epochs=args.shadow_epochs, seed=args.seed, timeout=args.timeout,
                    progress=not args.no_progress,
                    log=lambda m: print(m, file=sys.stderr))
    print(format_table(doc))
    if args.report:
        print(f"\nreport: {Path(args.report) / doc['files']['html']}  (data: {Path(args.report) / 'audit.json'})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``siguard audit`` to the main parser's subcommands."""
    a = subparsers.add_parser(
        "audit", help="membership-inference audit: plaintext vs secure vs guarded outputs",
        description="Run every membership-inference attack (fitted on the attacker's shadow data only) on the "
                    "model's plaintext outputs (onnxruntime), on secure outputs of PLAN, on guarded secure outputs "
                    "of GPLAN and on plaintext MemGuard; print a table, optionally write audit.json, ROC curves and "
                    "an HTML report.")
    a.add_argument("model", help="the target ONNX model both plans were compiled from")
    a.add_argument("--plan", required=True, help="plan directory compiled without --guard")
    a.add_argument("--guarded-plan", required=True, help="plan directory compiled with --guard DEFENDER.onnx")
    a.add_argument("--members", required=True, help=".npz with x, y: records of the model's training set")
    a.add_argument("--nonmembers", required=True, help=".npz with x, y: records the model never saw")
    a.add_argument("--shadow", required=True, help=".npz with x, y (optional bool 'member'): the attacker's own data; "
                   "without 'member' the first half are shadow members")
    a.add_argument("--report", metavar="DIR", help="write audit.json, ROC PNGs and index.html into DIR")
    a.add_argument("--mode", choices=("threads", "lockstep", "processes", "reference"), default="threads",
                   help="how the plans run (default threads; lockstep = the parties in one thread, faster when rounds "
                        "dominate; reference = fixed-point cleartext, for quick trials)")
    a.add_argument("--shadow-epochs", type=int, default=150, help="training epochs of the shadow model (default 150, "
                   "the recipe of siguard.privacy.targets)")
    a.add_argument("--seed", type=int, default=0, help="seed of the attacker's training (default 0)")
    a.add_argument("--timeout", type=float, default=600.0, help="seconds a party of a secure run waits for a "
                   "silent peer (a live one, computing, is waited for; default 600)")
    a.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, a plain line every few seconds otherwise)")
    a.set_defaults(func=cmd_audit)
