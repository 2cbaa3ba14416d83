"""``siguard guard train``: train the guard's defender on a model's outputs and export it to ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siguard.core.errors import InputError

__all__ = ["register", "cmd_guard_train"]

#: a defender whose validation accuracy is below this is reported as (nearly) useless
CHANCE_LEVEL = 0.55


def cmd_guard_train(args: argparse.Namespace) -> int:
    """Outputs of MODEL on members and non-members -> softmax -> defender -> ONNX file; prints its accuracy."""
    from siguard.api_guard import train_defender

    if not Path(args.model).exists():
        raise InputError(f"model file {args.model} does not exist")
    if args.epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {args.epochs}")
    report = train_defender(args.model, args.members, args.nonmembers, args.o, seed=args.seed, epochs=args.epochs,
                            output=args.output)
    out = args.o
    print(f"defender trained on {report.members_used} members and {report.nonmembers_used} non-members "
          f"({report.num_classes} classes, best epoch {report.best_epoch}/{report.epochs_run}): validation accuracy "
          f"{report.val_accuracy:.3f}, training accuracy {report.train_accuracy:.3f} -> {out}")
    if report.val_accuracy < CHANCE_LEVEL:
        print(f"warning: the defender is barely better than chance ({report.val_accuracy:.3f}): the model's outputs "
              "reveal little membership, or there are too few samples; the guard will accept few queries",
              file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``siguard guard {train}`` to the main parser's subcommands."""
    g = subparsers.add_parser("guard", help="the output guard: train its defender")
    gsub = g.add_subparsers(dest="guard_command", required=True)
    t = gsub.add_parser("train", help="train the defender h (k -> 128 -> 64 -> 1) on members vs non-members")
    t.add_argument("model", help="target ONNX model (outputs logits or probabilities; the output compile "
                   "uses, e.g. the probabilities feeding a skl2onnx classifier's ZipMap)")
    t.add_argument("--members", required=True, help=".npz with x (the model's training inputs) and y")
    t.add_argument("--nonmembers", required=True, help=".npz with x, y the owner holds out (reference non-members)")
    t.add_argument("-o", required=True, metavar="DEFENDER.onnx",
                   help="output ONNX file (input 'probs' (batch, k), output 'score' (batch, 1))")
    t.add_argument("--output", default=None, metavar="NAME",
                   help="graph output to train on, as `siguard compile --output` (default: the model's first output)")
    t.add_argument("--seed", type=int, default=0, help="seed for balancing, split and training (default 0)")
    t.add_argument("--epochs", type=int, default=300, help="at most this many epochs; early stopping on the "
                   "validation loss (default 300)")
    t.set_defaults(func=cmd_guard_train)
